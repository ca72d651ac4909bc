"""How free and how safe the error-based k-quant boxes are (:mod:`tightrope.qattack.kquant_boxes`, "Mind the Gap").

    OMP_NUM_THREADS=1 python benchmarks/kquant_boxes.py [--seed 0] [--points 4] [--rounds 6]

For Gaussian and heavy-tailed weights of rows 256 ... 1536, per k-quant type: the fraction of weights whose box
is not a point and their mean width relative to the same weights' boxes under the legacy types of similar bits;
then the super-blocks whose bytes change when the weights are moved inside the box (its hi and lo corners, the
corner towards every dequantized value, a random corner, a uniform sample), before and after the box is
narrowed by :func:`~tightrope.qattack.kquant_boxes.check_kquant_box` (the narrowed box is tried on fresh points);
and what :func:`~tightrope.qattack.kquant_boxes.settle_kquant_` restores of a uniform sample (always every byte).
"""

from __future__ import annotations

import argparse
import time

import torch

from tightrope.compress.gguf_k import K_TYPES, dequantize_k, quantize_k
from tightrope.qattack.boxes import box_gguf
from tightrope.qattack.kquant_boxes import box_kquant, changed_sub_blocks, check_kquant_box, settle_kquant_

LEGACY = {"Q2_K": ("gguf-q4_0",), "Q3_K": ("gguf-q4_0",), "Q4_K": ("gguf-q4_0", "gguf-q4_1"),
          "Q5_K": ("gguf-q5_0", "gguf-q5_1"), "Q6_K": ("gguf-q8_0",)}
SHAPES = ((96, 256), (64, 768), (48, 1536))


def weights(kind: str, shape: tuple[int, int], g: torch.Generator) -> torch.Tensor:
    z = torch.randn(shape, generator=g)
    if kind == "normal":
        return 0.02 * z
    chi = torch.randn((3, *shape), generator=g).pow(2).sum(0) / 3  # Student-t with 3 degrees of freedom
    return 0.02 * z / chi.sqrt()


def changed(p: torch.Tensor, ref: torch.Tensor, t) -> tuple[int, int]:
    raw = quantize_k(p, t)
    moved = changed_sub_blocks(raw, ref, t)
    return int(moved.any(dim=1).sum()), int(moved.sum())


def points(w, lo, hi, ref, t, g) -> dict[str, torch.Tensor]:
    q = dequantize_k(ref, t).reshape(w.shape)
    u = torch.rand(w.shape, generator=g)
    return {"hi": hi, "lo": lo, "toward": torch.where(q > w, hi, lo),
            "corner": torch.where(u < 0.5, lo, hi), "uniform": lo + torch.rand(w.shape, generator=g) * (hi - lo)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--points", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread; shapes {SHAPES}; check_kquant_box points={args.points} rounds={args.rounds}")
    head = ("type", "weights", "free", "width/legacy", "super-blocks", "changed of super-blocks (sub-blocks) at hi / lo / "
            "toward / corner / uniform", "checked: free", "fresh points", "settle restores", "s")
    print(" | ".join(head))
    for name, t in K_TYPES.items():
        for kind in ("normal", "heavy"):
            g = torch.Generator().manual_seed(args.seed)
            w = torch.cat([weights(kind, s, g).reshape(-1, 256) for s in SHAPES])  # rows of whole super-blocks
            t0 = time.perf_counter()
            ref = quantize_k(w, t)
            lo, hi = box_kquant(w, name)
            free = hi > lo
            widths = []
            for legacy in LEGACY[name]:
                llo, lhi = box_gguf(w, legacy)
                widths.append(f"{legacy[5:]} {float((hi - lo).mean() / (lhi - llo).mean()):.2f}")
            before = {k: changed(p, ref, t) for k, p in points(w, lo, hi, ref, t, g).items()}
            clo, chi, report = check_kquant_box(w, name, lo, hi, points=args.points, rounds=args.rounds,
                                                generator=torch.Generator().manual_seed(args.seed + 1))
            after = {k: changed(p, ref, t) for k, p in points(w, clo, chi, ref, t, torch.Generator().manual_seed(99)).items()}
            moved = lo + torch.rand(w.shape, generator=g) * (hi - lo)
            settled = settle_kquant_(moved, w, name)
            assert torch.equal(quantize_k(moved, t), ref)
            print(" | ".join((
                f"{name} {kind}", f"{w.numel():,}", f"{float(free.float().mean()):.3f}", ", ".join(widths), str(w.shape[0]),
                " / ".join(f"{a} ({b})" for a, b in before.values()), f"{report.free:.3f} {report.changed}",
                " / ".join(f"{a} ({b})" for a, b in after.values()),
                f"{settled.changed} changed: {settled.restored_sub_blocks} sub-blocks + {settled.restored_super_blocks} whole",
                f"{time.perf_counter() - t0:.0f}")))


if __name__ == "__main__":
    main()
