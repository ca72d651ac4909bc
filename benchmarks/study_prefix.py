"""Text-attack results of several models of a study on the examples every one of them has finished.

An attack step writes one JSON line per example as it goes (``steps/attack-<key>/attack/results.jsonl``)
and examples run in the same order for every model, so a study stopped before its attacks finished
still compares its models fairly on the examples they share. Metrics are TextAttack's: success rate =
succeeded / (succeeded + failed), examples the model already got wrong are skipped.

    python benchmarks/study_prefix.py studies/imdb.yaml runs/imdb textfooler baseline pruned30-int8 hardened
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tightrope.study.plan import plan_study
from tightrope.study.runner import plan_keys
from tightrope.study.spec import load_spec


def step_results(spec_path: str, run: Path, attack: str, model: str) -> dict[int, dict]:
    steps, _ = plan_study(load_spec(spec_path))
    keys = plan_keys(steps)
    name = f"attack/{attack}/{model}"
    if name not in keys:
        raise SystemExit(f"The study has no step {name}.")
    kind = next(s.kind for s in steps if s.name == name)
    path = run / "steps" / f"{kind}-{keys[name]}" / "attack" / "results.jsonl"
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["index"]: r for r in rows}


def summarize(rows: list[dict]) -> dict:
    succeeded = sum(r["status"] == "succeeded" for r in rows)
    failed = sum(r["status"] == "failed" for r in rows)
    attacked = [r for r in rows if r["status"] != "skipped"]
    return {"examples": len(rows), "succeeded": succeeded, "failed": failed, "skipped": len(rows) - succeeded - failed,
            "asr": succeeded / (succeeded + failed) if succeeded + failed else None,
            "queries": sum(r["queries"] for r in attacked) / len(attacked) if attacked else None,
            "perturbed": (sum(r["words_perturbed"] / max(r["words"], 1) for r in rows if r["status"] == "succeeded")
                          / succeeded if succeeded else None)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec")
    parser.add_argument("run", type=Path)
    parser.add_argument("attack")
    parser.add_argument("models", nargs="+")
    args = parser.parse_args()
    per_model = {m: step_results(args.spec, args.run, args.attack, m) for m in args.models}
    shared = sorted(set.intersection(*(set(r) for r in per_model.values())))
    print(f"{args.attack} on the {len(shared)} examples every model has finished "
          f"({', '.join(f'{m}: {len(r)}' for m, r in per_model.items())} finished in all)\n")
    print("| model | examples | succeeded / failed / skipped | attack success rate | avg queries | words changed (successes) |")
    print("|---|---|---|---|---|---|")
    for model, rows in per_model.items():
        s = summarize([rows[i] for i in shared])
        asr = "-" if s["asr"] is None else f"{100 * s['asr']:.1f}%"
        q = "-" if s["queries"] is None else f"{s['queries']:.0f}"
        p = "-" if s["perturbed"] is None else f"{100 * s['perturbed']:.1f}%"
        print(f"| {model} | {s['examples']} | {s['succeeded']} / {s['failed']} / {s['skipped']} | {asr} | {q} | {p} |")


if __name__ == "__main__":
    main()
