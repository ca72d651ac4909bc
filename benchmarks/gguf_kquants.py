"""GGUF k-quants on MiniLM: quantization time and weight error per type, as llama-quantize would write them.

    python benchmarks/gguf_kquants.py [--types Q2_K,Q3_K,Q4_K,Q5_K,Q6_K,Q4_0,Q5_0,Q8_0] [--repeats 3]

Every Linear weight of all-MiniLM-L6-v2 but the head (:func:`tightrope.qattack.boxes.quantized_linears`) is
quantized by :func:`tightrope.compress.gguf.quantize` with the type llama-quantize writes for it
(:func:`tightrope.compress.gguf.tensor_type`: a k-quant falls back to its legacy type where the input
dimension, 384 for most MiniLM layers, is no multiple of 256). Prints, per type: seconds per whole-model
quantization (median of ``--repeats``, one thread), how many layers got the k-quant itself, the mean
``|dequant - w|`` per layer kind and over all weights, and the fraction of super-blocks whose bytes change
when the *dequantized* weights are quantized again (0 for a fixed point; the k-quants' scale search is not
one), and, for the k-quants, the fraction of super-blocks whose bytes change at a random point of "Mind the
Gap"'s intervals (Egashira et al., ICML 2025: each weight between itself and its dequantized value; pinned:
the sub-blocks that set the super-block's largest scale and largest min, Q6_K's largest |scale|, and each
sub-block's max and min weights), every weight moved at once as a repair would. Prints the machine
(``lscpu`` model name) and the command.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import time
from collections import defaultdict

import torch

from tightrope import assets
from tightrope.compress import gguf as G
from tightrope.compress import gguf_k as K
from tightrope.qattack.boxes import quantized_linears


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "unknown")


def kind_of(name: str) -> str:
    """``encoder.layer.3.attention.self.query`` -> ``attention.self.query`` (the layer kind)."""
    parts = name.split(".")
    return ".".join(parts[3:]) if name.startswith("encoder.layer.") else name


def gap_point(w: torch.Tensor, q, u: torch.Tensor) -> torch.Tensor:
    """``w + u * (dequant - w)`` inside Mind the Gap's intervals, with their pinned weights left at ``w``."""
    t = q.type
    sub = 16 if t.name in ("Q2_K", "Q3_K", "Q6_K") else 32
    x = w.reshape(-1, 256 // sub, sub)  # (super-blocks, sub-blocks, values)
    b = q.data.reshape(-1, t.type_size).to(torch.int64)
    if t.name == "Q6_K":
        setters = [b[:, 192:208].to(torch.uint8).view(torch.int8).abs().argmax(dim=1)]
    elif t.name == "Q3_K":
        setters = [K.unpack_scales_q3(b[:, 96:108]).abs().argmax(dim=1)]
    elif t.name == "Q2_K":
        setters = [(b[:, :16] & 0xF).argmax(dim=1), (b[:, :16] >> 4).argmax(dim=1)]
    else:
        sc, m = K.unpack_scales_k4(b[:, 4:16])
        setters = [sc.argmax(dim=1), m.argmax(dim=1)]
    pinned = torch.zeros(x.shape, dtype=torch.bool)
    rows = torch.arange(x.shape[0])
    for s in setters:
        pinned[rows, s] = True
    pinned.scatter_(2, x.argmax(dim=2, keepdim=True), True).scatter_(2, x.argmin(dim=2, keepdim=True), True)
    moved = w + u * (q.dequantized - w)
    return torch.where(pinned.reshape(w.shape), w, moved)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--types", default="Q2_K,Q3_K,Q4_K,Q5_K,Q6_K,Q4_0,Q5_0,Q8_0")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from transformers import AutoModel  # noqa: PLC0415

    model = AutoModel.from_pretrained(str(assets.minilm_dir())).eval()
    weights = {n: m.weight.detach().float().clone() for n, m in quantized_linears(model).items()}
    print(f"machine: {cpu_name()}, torch {torch.__version__}, 1 thread; MiniLM: {len(weights)} Linear layers, "
          f"{sum(w.numel() for w in weights.values()) / 1e6:.2f} M weights")
    print(f"command: python benchmarks/gguf_kquants.py {' '.join(sys.argv[1:])}".rstrip())
    kinds = sorted({kind_of(n) for n in weights})
    header = (f"| type | s / model | layers as type | {' | '.join(kinds)} | all | requantized changed | "
              "gap point changed |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for name in args.types.split(","):
        seconds = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            out = {n: G.quantize(w, G.tensor_type(name, w.shape[1]).name) for n, w in weights.items()}
            seconds.append(time.perf_counter() - start)
        own = sum(G.tensor_type(name, w.shape[1]).name == G.gguf_type(name).name for w in weights.values())
        err, count = defaultdict(float), defaultdict(int)
        changed = gap_changed = blocks = k_blocks = 0
        generator = torch.Generator().manual_seed(0)
        for n, w in weights.items():
            q = out[n]
            err[kind_of(n)] += float((q.dequantized - w).abs().sum())
            count[kind_of(n)] += w.numel()
            stored = q.data.reshape(-1, q.type.type_size)
            again = G.quantize(q.dequantized, q.type.name).data.reshape(-1, q.type.type_size)
            changed += int((again != stored).any(dim=1).sum())
            blocks += again.shape[0]
            if q.type.name in K.K_TYPES:
                point = gap_point(w, q, torch.rand(w.shape, generator=generator))
                moved = G.quantize(point, q.type.name).data.reshape(-1, q.type.type_size)
                gap_changed += int((moved != stored).any(dim=1).sum())
                k_blocks += moved.shape[0]
        total = sum(err.values()) / sum(count.values())
        cells = " | ".join(f"{err[k] / count[k]:.3e}" for k in kinds)
        gap = f"{gap_changed / k_blocks:.3f}" if k_blocks else "-"
        print(f"| {name} | {statistics.median(seconds):.2f} | {own}/{len(weights)} | {cells} | {total:.3e} | "
              f"{changed / blocks:.3f} | {gap} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
