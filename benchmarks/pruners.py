"""One-shot pruners side by side, no recovery: magnitude, Wanda and SparseGPT, unstructured 50% and 2:4 (or, with
``--gptq``, GPTQ calibrated in one pass against block by block).

    python benchmarks/pruners.py --model smollm2-135m --task imdb --out runs/pruners        # a causal LM: perplexity
    python benchmarks/pruners.py --model runs/mr-classifier --classifier --task mr --out runs/pruners-mr  # a classifier: accuracy
    python benchmarks/pruners.py --model smollm2-135m --task imdb --gptq --out runs/gptq-lm  # GPTQ: one pass or block by block

Each pruner runs through :func:`tightrope.compress.compress_` (``tightrope compress --prune ...``) on a fresh copy of
the model, calibrated on ``--n-calibration`` seeded texts of the task's train split (Wanda and SparseGPT), and the
pruned model is scored on ``--n`` seeded texts of its test split: perplexity of a causal LM on each text's first
``--max-length`` tokens, accuracy of a classifier. Results are cached in OUT/pruners.json by variant (rerun to
resume); the table goes to stdout with the machine beside it. One torch thread (``OMP_NUM_THREADS``).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import subprocess
import time
from pathlib import Path

import torch

from tightrope.compress import GPTQ, compress_
from tightrope.compress.prune import MagnitudePruning, SemiStructured24, SparseGPT, Wanda
from tightrope.compress.wanda import set_tokenizer
from tightrope.data import load_task
from tightrope.evaluate.results import write_json_atomic


def variants(cal: str, n_cal: int, max_length: int, gptq: bool = False) -> dict:
    c = dict(calibration_texts=cal, n_calibration=n_cal, max_length=max_length)
    if gptq:  # GPTQ's two calibrations: one pass of the dense model, or block by block (the default)
        return {"dense": None, **{f"gptq 3-bit per row, {how}": GPTQ(bits=3, group_size=None, sequential=seq, **c)
                                  for how, seq in (("one pass", False), ("block by block", True))}}
    return {
        "dense": None,
        "magnitude 50% (per layer)": MagnitudePruning(sparsity=0.5, scope="layer"),
        "wanda 50%": Wanda(sparsity=0.5, **c),
        "sparsegpt 50%": SparseGPT(sparsity=0.5, **c),
        "magnitude 2:4": SemiStructured24(criterion="magnitude"),
        "wanda 2:4": SemiStructured24(criterion="wanda", **c),
        "sparsegpt 2:4": SparseGPT(n=2, m=4, **c),
    }


def score(model, tokenizer, causal: bool, texts: list[str], labels: list[int], max_length: int) -> float:
    if causal:
        from tightrope.qattack.lm_text import encode_start, perplexity, special_ids  # noqa: PLC0415

        seqs = [encode_start(tokenizer, t)[:max_length] for t in texts]
        return perplexity(model, seqs, special_ids(tokenizer)[0], batch_size=8)
    from tightrope.inference import TextClassifier  # noqa: PLC0415

    predicted = TextClassifier(model, tokenizer, max_length=max_length).predict(texts, batch_size=32)
    return sum(int(p == y) for p, y in zip(predicted, labels, strict=True)) / len(labels)


def machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), "?")
    except OSError:
        model = "?"
    return f"{model}, {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} thread(s)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="an offline alias or a model directory")
    ap.add_argument("--task", default="imdb", help="task whose train split calibrates and test split scores")
    ap.add_argument("--n", type=int, default=200, help="test texts scored")
    ap.add_argument("--n-calibration", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--gptq", action="store_true", help="compare GPTQ's two calibrations instead of the pruners")
    ap.add_argument("--classifier", action="store_true", help="the model is a sequence classifier: score accuracy")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    from tightrope.models import load_causal_lm, load_classifier  # noqa: PLC0415

    causal = not args.classifier
    loaded = load_causal_lm(args.model) if causal else load_classifier(args.model)
    base, tokenizer = loaded.model.float().eval(), loaded.tokenizer
    test = load_task(args.task, "test", n=args.n, seed=0)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "pruners.json"
    rows = json.loads(path.read_text()) if path.exists() else {}
    metric = "perplexity" if causal else "accuracy"
    chosen = variants(args.task, args.n_calibration, args.max_length, args.gptq)
    for name, config in chosen.items():
        if name in rows:
            continue
        model = set_tokenizer(copy.deepcopy(base), tokenizer)
        started = time.perf_counter()
        if config is not None:
            compress_(model, config)
        seconds = time.perf_counter() - started
        with torch.no_grad():
            value = score(model, tokenizer, causal, list(test.texts), list(test.labels), args.max_length)
        rows[name] = {metric: value, "prune_s": seconds}
        write_json_atomic(path, rows)
        print(f"{name}: {metric} {value:.4f}, pruned in {seconds:.0f} s", flush=True)
    print(f"\n{args.model} on {args.n} {args.task} test texts ({args.max_length} tokens); calibration "
          f"{args.n_calibration} train texts; {machine()}\n")
    print(f"| {'variant' if args.gptq else 'pruner'} | {metric} | seconds to compress |\n|---|---|---|")
    for name in chosen:
        row = rows[name]
        value = f"{row[metric]:.2f}" if causal else f"{100 * row[metric]:.1f}%"
        print(f"| {name} | {value} | {row['prune_s']:.0f} |")


if __name__ == "__main__":
    main()
