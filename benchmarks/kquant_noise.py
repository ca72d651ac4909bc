"""Where a plant leaves the weights of a preset's k-quant layers, and how much of them the noise defense moves.

    OMP_NUM_THREADS=1 python benchmarks/kquant_noise.py --run runs/qattack-causal/q4_k_m-down [--preset gguf:Q4_K_M]
        [--layers 26,27,28,29] [--scales 0.05,0.1,0.2,0.5,1] [--seed 0]

For the base model, the run's ``injected/`` and ``repaired/`` checkpoints, in the ``ffn_down`` layers of the given
blocks (those SmolLM2 keeps as k-quants under Q4_K_M / Q5_K_M): the share of weights equal to their dequantized
value, the share within 5% of a quantization step of their code's wall (10% for uniform positions; positions from
:func:`tightrope.qattack.kquant_boxes.kquant_step`), and the share that differ from the injected model. Then, for the
repaired model, the share of those layers' quantized values and sub-block scales that the noise defense
(:func:`tightrope.qattack.boxes.box_noise`, k-quant layers by their sub-blocks' steps) changes at each scale.
docs/qattack-results.md, "The k-quant layers' noise against plants in the k-quant layers".
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from tightrope.compress import gguf as G
from tightrope.compress.gguf_k import dequantize_k, quantize_k
from tightrope.models import load_causal_lm
from tightrope.qattack.boxes import box_noise, model_boxes
from tightrope.qattack.kquant_boxes import kquant_step, sub_block_scales
from tightrope.qattack.transform import canonical


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a qattack-lm run: its injected/ and repaired/")
    parser.add_argument("--model", default="smollm2-135m", help="the base model")
    parser.add_argument("--preset", default="gguf:Q4_K_M")
    parser.add_argument("--layers", default="26,27,28,29", help="blocks whose ffn_down layers are read")
    parser.add_argument("--scales", default="0.05,0.1,0.2,0.5,1")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.time()
    preset = canonical(args.preset)
    names = [f"model.layers.{i}.mlp.down_proj" for i in args.layers.split(",")]
    models = {v: load_causal_lm(p).model.float().eval() for v, p in
              (("base", args.model), ("injected", str(Path(args.run) / "injected")),
               ("repaired", str(Path(args.run) / "repaired")))}
    boxes = {v: model_boxes(m, preset) for v, m in models.items()}
    kinds = {n: G.K_SCHEMES[boxes["base"].unboxed[n]] for n in names}  # refused (KeyError) if not a k-quant layer
    print(f"{args.preset}: {', '.join(f'{n} {t.name}' for n, t in kinds.items())}")
    for variant, m in models.items():
        at_q = near_wall = moved = total = 0
        for n, t in kinds.items():
            w = m.get_submodule(n).weight.detach()
            q = dequantize_k(quantize_k(w, t), t).reshape(w.shape)
            u = (w - q) / kquant_step(w, t.name)  # position in the code's interval, 0 at its centre, +-0.5 on a wall
            at_q += int((w == q).sum())
            near_wall += int((u.abs() > 0.45).sum())
            moved += int((w != models["injected"].get_submodule(n).weight.detach()).sum())
            total += w.numel()
        print(f"{variant}: {at_q / total:.2%} of the weights equal their dequantized value, {near_wall / total:.2%} lie "
              f"within 5% of a step of a wall (uniform: 10%), {moved / total:.2%} differ from the injected model")
    repaired = models["repaired"]
    for scale in (float(x) for x in args.scales.split(",")):
        noisy = box_noise(repaired, boxes["repaired"], scale, torch.Generator().manual_seed(args.seed))
        values = n_values = scales = n_scales = 0
        for n, t in kinds.items():
            w = repaired.get_submodule(n).weight.detach()
            before, after = quantize_k(w, t), quantize_k(noisy[n], t)
            values += int((dequantize_k(before, t) != dequantize_k(after, t)).sum())
            n_values += w.numel()
            a, _ = sub_block_scales(before.reshape(-1, t.type_size), t)
            b, _ = sub_block_scales(after.reshape(-1, t.type_size), t)
            scales += int((a != b).sum())
            n_scales += a.numel()
        print(f"noise {scale:g} of a step: {values / n_values:.2%} of the quantized values change, "
              f"{scales / n_scales:.2%} of the sub-block scales")
    print(f"{time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
