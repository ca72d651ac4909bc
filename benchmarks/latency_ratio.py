"""The search's latency objective under load: each model timed alone (as trials were) against the ratio to a
baseline timed in interleaved pairs in one process (as trials are now; docs/search.md, "Latency, as a ratio").

    python benchmarks/latency_ratio.py --rounds 4 --runs 20 --seq-len 128

MiniLM (the packaged encoder with a seeded classification head) is the baseline; its torch dynamic-int8 copy
and its 30% structured-pruned copy are the variants (all torch, one thread). Each round times every model
alone (``perf.measure_latency``, ``runs`` calls back to back, one model after the other) and then each variant
against the baseline in ``runs`` interleaved pairs (``perf.relative_latency``). On a shared machine the rounds
fall under different loads; the table shows how far each figure moves from round to round.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tightrope import models
from tightrope.compress.api import compress_
from tightrope.compress.quant import Int8Dynamic
from tightrope.compress.prune import StructuredPruning
from tightrope.evaluate import perf
from tightrope.inference import TextClassifier

TEXT = ("a gripping, beautifully acted film whose quiet second half never loses the thread of its first, "
        "and whose ending earns every one of its tears")


def build() -> dict[str, TextClassifier]:
    def minilm():
        torch.manual_seed(0)
        loaded = models.load_classifier("minilm", label_names=["negative", "positive"], require_head=False)
        loaded.model.eval()
        return loaded
    out = {}
    for name, config in (("fp32", None), ("int8 (torch)", Int8Dynamic(backend="torch")),
                         ("30% structured", StructuredPruning(heads=0.3, ffn=0.3))):
        loaded = minilm()
        if config is not None:
            compress_(loaded.model, config)
        out[name] = TextClassifier(loaded.model, loaded.tokenizer, max_length=256)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--gap", type=float, default=20.0, help="seconds of quiet between rounds")
    args = parser.parse_args()
    torch.set_num_threads(1)
    clfs = build()
    names = list(clfs)
    alone: dict[str, list[float]] = {n: [] for n in names}
    ratio: dict[str, list[float]] = {n: [] for n in names[1:]}
    paired_ms: dict[str, list[float]] = {n: [] for n in names[1:]}
    print(f"threads 1, batch 1, {args.seq_len} tokens, {args.runs} runs (alone) / pairs (interleaved) per round")
    print("| round | " + " | ".join(f"{n} alone ms" for n in names) + " | "
          + " | ".join(f"{n} / fp32 (paired)" for n in names[1:]) + " |")
    print("|---" * (1 + len(names) + len(names) - 1) + "|")
    for r in range(args.rounds):
        if r:
            time.sleep(args.gap)
        for n in names:
            alone[n].append(perf.measure_latency(clfs[n], TEXT, seq_len=args.seq_len, runs=args.runs).median_ms)
        for n in names[1:]:
            rel = perf.relative_latency(clfs[n], clfs["fp32"], TEXT, seq_len=args.seq_len, pairs=args.runs)
            ratio[n].append(rel.ratio)
            paired_ms[n].append(rel.model_ms)
        print(f"| {r} | " + " | ".join(f"{alone[n][-1]:.1f}" for n in names) + " | "
              + " | ".join(f"{ratio[n][-1]:.3f}" for n in names[1:]) + " |")
    spread = lambda xs: max(xs) / min(xs)  # noqa: E731
    print()
    print("| variant | alone: its ms / fp32's ms, per round | spread of that (max/min) | paired ratio, per round "
          "| spread (max/min) |")
    print("|---|---|---|---|---|")
    for n in names[1:]:
        naive = [a / b for a, b in zip(alone[n], alone["fp32"])]
        print(f"| {n} | {', '.join(f'{x:.3f}' for x in naive)} | {spread(naive):.2f} | "
              f"{', '.join(f'{x:.3f}' for x in ratio[n])} | {spread(ratio[n]):.2f} |")
    print(f"\nfp32 alone, ms per round: {', '.join(f'{x:.1f}' for x in alone['fp32'])} "
          f"(spread {spread(alone['fp32']):.2f}); median {statistics.median(alone['fp32']):.1f}")


if __name__ == "__main__":
    main()
