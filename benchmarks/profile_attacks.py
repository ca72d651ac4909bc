"""Where a text attack spends its time: model forward, tokenization, the sentence encoder and other
constraint checks, candidate generation, and the Python around them (issue 24's profile).

    python benchmarks/profile_attacks.py --model runs/defense-mr/base --task textfooler-mr --n 100 \\
        --recipes deepwordbug,pwws,textfooler --max-length 64 --json runs/profile-mr.json
    python benchmarks/profile_attacks.py --model runs/defense-mr/base --task textfooler-imdb --n 5 \\
        --recipes deepwordbug,pwws,textfooler --max-length 256 --truncation head+tail --json runs/profile-imdb.json
    python benchmarks/profile_attacks.py --model runs/defense-mr/base --task textfooler-mr --n 256 --forward \\
        --bundle runs/mr-fp32-bundle      # the bundle from: tightrope export MODEL --precision fp32 --out ...

Each recipe runs under cProfile in this process (one thread by default); the categories are the
cumulative times of the functions that do that work, so they do not overlap:

- model forward: ``TextClassifier.forward_ids`` (the victim's forward passes);
- tokenization: ``TextClassifier.encode`` (the victim's tokenizer, windowing included);
- sentence encoder: ``SentenceEncoder.encode`` (TextFooler's similarity constraint, its own model);
- other constraints: every constraint's ``check`` minus the sentence encoder inside it;
- candidates: the transformation's ``candidates`` and ``prepare`` (neighbour look-ups, WordNet, edits);
- Python and the rest: the attack's wall time minus the above (search loop, goal bookkeeping, caching).

cProfile adds a per-call cost, which inflates the last row most; the shares, not the absolute
seconds, are what the table is for.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import platform
import pstats
import time
from pathlib import Path

CATEGORIES = {
    "model forward": [("inference.py", "forward_ids")],
    "tokenization": [("inference.py", "encode")],
    "sentence encoder": [("similarity.py", "encode")],
    "constraint checks": [("constraints.py", "check")],
    "candidates": [("words.py", "candidates"), ("words.py", "prepare"), ("chars.py", "candidates")],
}


def cumulative(stats: pstats.Stats, where: list[tuple[str, str]]) -> float:
    """Cumulative seconds of the functions named ``where`` (file suffix, function name), counting a
    function once even when it calls itself or an overriding method calls its base."""
    total = 0.0
    for (file, _, name), (_, _, _, cum, callers) in stats.stats.items():
        if any(file.endswith(f) and name == n for f, n in where):
            outer = [c for c in callers if any(c[0].endswith(f) and c[2] == n for f, n in where)]
            if not outer:  # not called from another function of the same category
                total += cum
    return total


def profile(recipe: str, victim, data, seed: int) -> dict:
    from tightrope.attacks import Attacker, recipes

    attack = recipes.build(recipe, victim)
    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.enable()
    report = Attacker(attack, seed=seed).run(victim, data)
    profiler.disable()
    wall = time.perf_counter() - started
    stats = pstats.Stats(profiler)
    seconds = {name: cumulative(stats, where) for name, where in CATEGORIES.items()}
    seconds["constraint checks"] = max(0.0, seconds["constraint checks"] - seconds["sentence encoder"])
    seconds["Python and the rest"] = max(0.0, wall - sum(seconds.values()))
    return {"recipe": recipe, "examples": report.examples, "wall_seconds": wall,
            "examples_per_minute_profiled": 60 * report.examples / wall, "attack_success_rate": report.attack_success_rate,
            "average_queries": report.average_queries, "seconds": seconds,
            "shares": {k: v / wall for k, v in seconds.items()}}


def table(rows: list[dict], title: str) -> str:
    names = list(rows[0]["shares"])
    lines = [f"### {title}", "", "| recipe | examples | wall s (profiled) | " + " | ".join(names) + " |",
             "|---|---|---|" + "---|" * len(names)]
    for r in rows:
        lines.append(f"| {r['recipe']} | {r['examples']} | {r['wall_seconds']:.1f} | "
                     + " | ".join(f"{100 * r['shares'][n]:.0f}% ({r['seconds'][n]:.1f} s)" for n in names) + " |")
    return "\n".join(lines)


def forward_sweep(args, victim, data) -> list[dict]:
    """Milliseconds per text of the victim's forward pass by batch size, and of an ONNX Runtime fp32
    bundle of the same model (``tightrope export MODEL --precision fp32``) with its largest logit gap."""
    import numpy as np

    rows = []
    runners = {"torch": lambda t, bs: victim.logits(t, batch_size=bs).numpy()}
    if args.bundle:
        from tightrope.serving import Bundle

        bundle = Bundle(args.bundle, threads=args.threads)
        runners["onnxruntime fp32"] = lambda t, bs: bundle.logits(t, batch_size=bs)
    texts = data.texts
    for bs in (1, 4, 32):
        for name, run in runners.items():
            run(texts[:bs], bs)  # warm-up
            started = time.perf_counter()
            for i in range(0, len(texts), bs):
                run(texts[i:i + bs], bs)
            rows.append({"runtime": name, "batch": bs, "ms_per_text": 1000 * (time.perf_counter() - started) / len(texts)})
    if args.bundle:
        gap = float(np.abs(runners["torch"](texts, 32) - runners["onnxruntime fp32"](texts, 32)).max())
        rows.append({"runtime": "max |logit difference|, onnxruntime fp32 vs torch", "value": gap})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--task", default="textfooler-mr")
    parser.add_argument("--split", default="test")
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--recipes", default="deepwordbug,pwws")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--truncation", default="head", choices=["head", "head+tail"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--forward", action="store_true", help="only time the victim's forward pass by batch size")
    parser.add_argument("--bundle", help="an fp32 ONNX Runtime bundle of the model, timed beside torch (--forward)")
    args = parser.parse_args()

    import torch

    from tightrope import quiet, workflows
    from tightrope.data import load_task
    from tightrope.provenance import environment

    quiet.configure()
    torch.set_num_threads(args.threads)
    victim = workflows.load(args.model, max_length=args.max_length)
    victim.truncation = args.truncation
    data = load_task(args.task, args.split, n=args.n, seed=args.seed)
    if args.forward:
        for row in forward_sweep(args, victim, data):
            print(json.dumps(row))
        return
    rows = []
    for recipe in args.recipes.split(","):
        rows.append(profile(recipe, victim, data, args.seed))
        print(json.dumps(rows[-1]), flush=True)
    title = (f"{data.name}, {len(data)} examples, {args.max_length} tokens {args.truncation}, {args.threads} thread(s), "
             f"{environment()['processor']} ({platform.machine()})")
    print(table(rows, title))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"command": vars(args) | {"json": str(args.json)}, "rows": rows,
                                         "environment": environment()}, indent=2, default=str))


if __name__ == "__main__":
    main()
