"""Speed and memory, measured honestly (DESIGN.md, "Honest measurement").

- Latency: batch 1 at a fixed sequence length, after warm-up, median and p95 over many runs,
  with the thread count recorded.
- Throughput: examples per second at a larger batch.
- Weight bytes: what the model directory stores on disk (not what it occupies in memory).
- Peak memory: the peak resident set of a *fresh* process that loads the model and runs one
  inference, so that models measured one after another do not inherit each other's peaks.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tightrope.encoding import special_tokens
from tightrope.inference import TextClassifier

WEIGHT_SUFFIXES = (".safetensors", ".onnx", ".bin", ".pt", ".gguf", ".data")


@dataclass(frozen=True)
class Latency:
    batch_size: int
    seq_len: int
    median_ms: float
    p95_ms: float
    runs: int
    threads: int


@dataclass(frozen=True)
class Throughput:
    batch_size: int
    seq_len: int
    examples_per_s: float
    threads: int


def fixed_length_batch(clf: TextClassifier, text: str, batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
    """A batch of real tokens exactly ``seq_len`` long (the text is repeated until long enough)."""
    ids = clf.tokenizer(text, add_special_tokens=False)["input_ids"] or [clf.pad_id]
    prefix, suffix = special_tokens(clf.tokenizer)
    body = (ids * (seq_len // len(ids) + 1))[: seq_len - len(prefix) - len(suffix)]
    row = prefix + body + suffix
    input_ids = torch.tensor([row] * batch_size, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


@torch.inference_mode()
def measure_latency(clf: TextClassifier, text: str, seq_len: int = 256, runs: int = 50, warmup: int = 5) -> Latency:
    batch = fixed_length_batch(clf, text, 1, seq_len)
    for _ in range(warmup):
        clf.forward_ids(**batch)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        clf.forward_ids(**batch)
        times.append((time.perf_counter() - start) * 1000)
    return Latency(1, seq_len, statistics.median(times), percentile(times, 0.95), runs, torch.get_num_threads())


@torch.inference_mode()
def interleaved_latency(clfs: dict[str, TextClassifier], batch: dict[str, torch.Tensor], rounds: int = 40,
                        warmup: int = 5, seed: int = 0) -> dict[str, list[float]]:
    """Batch latencies (ms) of several models taken in rounds: each round runs every model once, in
    a fresh random order. Slow drift of a shared machine then falls on all models alike, and no model
    always runs right after the same other one (the first run after a different runtime was measured
    slower here, cold caches and parked threads)."""
    import random  # noqa: PLC0415

    for clf in clfs.values():
        for _ in range(warmup):
            clf.forward_ids(**batch)
    rng = random.Random(seed)
    times: dict[str, list[float]] = {name: [] for name in clfs}
    for _ in range(rounds):
        order = list(clfs)
        rng.shuffle(order)
        for name in order:
            start = time.perf_counter()
            clfs[name].forward_ids(**batch)
            times[name].append((time.perf_counter() - start) * 1000)
    return times


@torch.inference_mode()
def measure_throughput(clf: TextClassifier, text: str, batch_size: int = 32, seq_len: int = 128, runs: int = 5) -> Throughput:
    batch = fixed_length_batch(clf, text, batch_size, seq_len)
    clf.forward_ids(**batch)  # warm-up
    start = time.perf_counter()
    for _ in range(runs):
        clf.forward_ids(**batch)
    elapsed = time.perf_counter() - start
    return Throughput(batch_size, seq_len, batch_size * runs / elapsed, torch.get_num_threads())


def weight_bytes(model_dir: str | Path) -> int | None:
    """Bytes of weight files stored in a model directory (None for a hub id)."""
    path = Path(model_dir)
    if not path.is_dir():
        return None
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.suffix in WEIGHT_SUFFIXES)


def peak_memory(model: str, seq_len: int = 256, threads: int | None = None) -> dict:
    """Peak RSS of a fresh process that imports tightrope, loads ``model`` and runs one batch-1 inference.

    Returns ``{"peak_rss_bytes", "baseline_rss_bytes"}``; the difference is what the model added.
    """
    cmd = [sys.executable, "-m", "tightrope.evaluate.memprobe", model, "--seq-len", str(seq_len)]
    if threads:
        cmd += ["--threads", str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"memory probe failed for {model}: {tail[0]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
