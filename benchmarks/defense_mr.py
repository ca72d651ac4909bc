"""Synonym-encoding defense on MR, measured adaptively (docs/results.md, "Synonym encoding on MR").

Steps (each resumable; run from the repository root with $TIGHTROPE_DATA_DIR set):

    python benchmarks/defense_mr.py prepare --out runs/defense-mr
        writes runs/defense-mr/mr-train.jsonl.gz: MR's train split (tightrope's seeded carve) minus every
        sentence of TextFooler's MR attack sample, so that no attacked sentence was trained on
        (90% of the sample lies in MR's train carve otherwise).
    python benchmarks/defense_mr.py attack --out runs/defense-mr --n 100 MODEL_DIR...
        TextFooler, PWWS and DeepWordBug on the first N sentences of TextFooler's MR sample (the same
        sentences for every model), each attack querying the loaded model, whose TextClassifier applies
        the model's own input transform: the attack targets the whole defended pipeline.
    python benchmarks/defense_mr.py table --out runs/defense-mr MODEL_DIR...
        clean accuracy on MR's test carve (1,066 sentences) and the ASR of each recipe with Wilson 95%
        intervals, as a Markdown table.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
from pathlib import Path

RECIPES = ("textfooler", "pwws", "deepwordbug")


def _norm(text: str) -> str:
    return re.sub(r"[^a-z]", "", text.lower())


def prepare(out: Path) -> Path:
    from tightrope.data import load_task

    train = load_task("mr", "train")
    sample = {_norm(t) for t in load_task("textfooler-mr", "test").texts}
    keep = [(t, y) for t, y in zip(train.texts, train.labels) if _norm(t) not in sample]
    out.mkdir(parents=True, exist_ok=True)
    file = out / "mr-train.jsonl.gz"
    with gzip.open(file, "wt", encoding="utf-8") as f:
        for text, label in keep:
            f.write(json.dumps({"text": text, "label": label}) + "\n")
    print(f"wrote {file}: {len(keep)} of {len(train)} train sentences ({len(train) - len(keep)} in the attack sample dropped)")
    return file


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=("prepare", "attack", "table"))
    parser.add_argument("models", nargs="*")
    parser.add_argument("--out", type=Path, default=Path("runs/defense-mr"))
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.step == "prepare":
        prepare(args.out)
    elif args.step == "attack":
        attack(args.models, args.out, args.n, args.recipes.split(","), args.threads)
    else:
        table(args.models, args.out, args.recipes.split(","), args.threads)


if __name__ == "__main__":
    sys.exit(main())
