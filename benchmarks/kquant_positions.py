"""Where the weights of a preset's k-quant layers sit in their codes' intervals: the audit's k-quant position spike
(tightrope.qattack.kquant_boxes.kquant_position, tightrope.qattack.audit.spike) of clean and planted models.

    OMP_NUM_THREADS=1 python benchmarks/kquant_positions.py cls=minilm lm=smollm2-135m lm=runs/qattack-causal/q4_k_m-down/repaired

Each argument is KIND=MODEL (cls: a classifier or bare encoder, lm: a causal LM). For each of Q4_K_M and Q5_K_M it
prints the layers read as k-quants (those not on an earlier quantization's grid), the pooled and the worst layer's
spike, and the share within 1% of a step of the code (uniform positions: 2%).
"""

from __future__ import annotations

import sys

import torch

from tightrope.models import load_causal_lm, load_classifier
from tightrope.qattack.audit import on_grid, position_histogram, spike
from tightrope.qattack.boxes import model_boxes
from tightrope.qattack.kquant_boxes import kquant_position


def report(label: str, model, preset: str) -> str:
    boxes = model_boxes(model, preset)
    total, read, worst = torch.zeros(100), 0, (float("nan"), "-")
    for name, scheme in boxes.unboxed.items():
        w = model.get_submodule(name).weight.detach().float()
        if on_grid(w):
            continue
        counts = position_histogram(kquant_position(w, scheme))
        total += counts
        read += 1
        z = spike(counts)
        if not worst[0] >= z:
            worst = (z, name)
    n = int(total.sum())
    pooled = spike(total) if n else float("nan")
    middle = (total[49] + total[50]).item() / n if n else float("nan")
    return (f"{label} {preset}: {read} of {len(boxes.unboxed)} k-quant layers read, spike pooled {pooled:.1f}, "
            f"worst {worst[0]:.1f} ({worst[1]}), within 1% of the code {middle:.2%}")


def main(args: list[str]) -> None:
    torch.set_num_threads(1)
    for arg in args:
        kind, path = arg.split("=", 1)
        loaded = load_causal_lm(path) if kind == "lm" else load_classifier(path, require_head=False)
        model = loaded.model.float().eval()
        for preset in ("gguf-q4_k_m", "gguf-q5_k_m"):
            print(report(path, model, preset), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
