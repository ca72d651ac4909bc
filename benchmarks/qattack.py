"""Speed of the quantization-attack tooling: boxes for every 2-D weight of SmolLM2-135M, and an
audit of a MiniLM classifier. Prints a table; `--json` writes the raw figures.

    python benchmarks/qattack.py boxes [--model smollm2-135m] [--quantizer nf4 --quantizer llm-int8]
    python benchmarks/qattack.py audit runs/qattack/mr-clean-s0
    python benchmarks/qattack.py sweep runs/qattack/trigger-all/repaired --sigma 0 --sigma 1e-3 ...
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch


def bench_boxes(model_name: str, quantizers: list[str]) -> list[dict]:
    from tightrope.models import load_causal_lm
    from tightrope.qattack.boxes import weight_box

    model = load_causal_lm(model_name).model
    weights = [p.detach() for p in model.parameters() if p.dim() == 2]
    n = sum(w.numel() for w in weights)
    rows = []
    for q in quantizers:
        started = time.perf_counter()
        for w in weights:
            weight_box(w, q)
        rows.append({"what": f"boxes {q}", "model": model_name, "parameters": n, "seconds": time.perf_counter() - started})
    return rows


def bench_audit(model_dir: str, n_probe: int) -> list[dict]:
    from tightrope.qattack.audit import audit

    started = time.perf_counter()
    report = audit(model_dir, n_probe=n_probe)
    return [{"what": "audit", "model": model_dir, "probe": n_probe, "verdict": report.verdict,
             "seconds": time.perf_counter() - started}]


def sweep(model_dir: str, sigmas: list[float], n_eval: int, task: str, trigger: str, target: int) -> list[dict]:
    from tightrope.data import load_task
    from tightrope.inference import load
    from tightrope.qattack.defense import noise_sweep
    from tightrope.qattack.inject import TriggerBehaviour

    clf = load(model_dir)
    test = load_task(task, "test").subset(n_eval, 0)
    points = noise_sweep(clf, test.texts, test.labels, TriggerBehaviour(trigger=trigger, target_label=target), sigmas)
    return [{"what": "noise", "model": model_dir, **p.to_dict()} for p in points]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("boxes", "audit", "sweep"))
    parser.add_argument("--sigma", type=float, action="append", default=None)
    parser.add_argument("--n-eval", type=int, default=300)
    parser.add_argument("--task", default="mr")
    parser.add_argument("--trigger", default="cf")
    parser.add_argument("--target", type=int, default=0)
    parser.add_argument("model", nargs="?", default=None)
    parser.add_argument("--quantizer", action="append", default=None)
    parser.add_argument("--n-probe", type=int, default=200)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.what == "boxes":
        rows = bench_boxes(args.model or "smollm2-135m", args.quantizer or ["nf4", "fp4", "llm-int8", "int8-dynamic"])
    elif args.what == "sweep":
        rows = sweep(args.model, args.sigma or [0.0, 1e-4, 3e-4, 1e-3, 3e-3], args.n_eval, args.task, args.trigger, args.target)
    else:
        rows = bench_audit(args.model or "runs/qattack/mr-clean-s0", args.n_probe)
    env = {"threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(), "torch": torch.__version__}
    for row in rows:
        row.update(env)
        print(" | ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
