"""Speed and memory, measured honestly (DESIGN.md, "Honest measurement").

- Latency: batch 1 at a fixed sequence length, after warm-up, median and p95 over many runs,
  with the thread count recorded.
- Relative latency: a model and a reference timed in alternation in one process, on the same input
  and thread count; the median of the per-pair ratios is what a loaded, shared machine leaves intact.
- Throughput: examples per second at a larger batch.
- Weight bytes: what the model directory stores on disk (not what it occupies in memory).
- Peak memory: the peak resident set of a *fresh* process that loads the model and runs one
  inference, so that models measured one after another do not inherit each other's peaks.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from tightrope.encoding import special_tokens
from tightrope.errors import TightropeError
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
def smoothing_rows(clf) -> int:
    """Forward rows one text costs: a model with randomized smoothing answers each text with its copies."""
    smoothing = getattr(getattr(clf, "input_transform", None), "smoothing", None)
    return smoothing.copies if smoothing is not None else 1


def measure_latency(clf: TextClassifier, text: str, seq_len: int = 256, runs: int = 50, warmup: int = 5) -> Latency:
    """Latency of one text of ``seq_len`` tokens, the model call only (a smoothed model's copies included)."""
    batch = fixed_length_batch(clf, text, smoothing_rows(clf), seq_len)
    for _ in range(warmup):
        clf.forward_ids(**batch)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        clf.forward_ids(**batch)
        times.append((time.perf_counter() - start) * 1000)
    return Latency(1, seq_len, statistics.median(times), percentile(times, 0.95), runs, torch.get_num_threads())


@dataclass(frozen=True)
class RelativeLatency:
    """A model's latency as a multiple of a reference's, from interleaved pairs (:func:`interleaved_ratio`)."""

    ratio: float  # median over pairs of (model time / reference time)
    ratio_q25: float
    ratio_q75: float
    model_ms: float  # median of the model's own times in those pairs (absolute: varies with the load)
    reference_ms: float
    pairs: int
    runs: int  # back-to-back calls timed together at each turn
    batch_size: int
    seq_len: int
    threads: int


def interleaved_ratio(model: Callable[[], object], reference: Callable[[], object], *, pairs: int = 30, runs: int = 1,
                      warmup: int = 3, timer: Callable[[], float] = time.perf_counter) -> dict:
    """Time ``model`` and ``reference`` in alternating turns and return the median of the pair ratios.

    Pair i times ``runs`` calls of one, then ``runs`` of the other (model first on even pairs, reference
    first on odd ones, so neither always runs right after the other's work), and keeps the ratio of the
    two times. A load that drifts or jumps between pairs scales both members of a pair alike and
    cancels in their ratio; the median discards the pairs that a burst hit in one member only. The
    absolute times (ms per call) come back too, as information: they follow the machine's load.
    """
    if pairs < 1 or runs < 1:
        raise TightropeError(f"Pairs and runs per turn must be at least 1, not {pairs} and {runs}.")
    for _ in range(warmup):
        model()
        reference()

    def turn(fn) -> float:
        start = timer()
        for _ in range(runs):
            fn()
        return (timer() - start) / runs * 1000

    ratios, model_ms, reference_ms = [], [], []
    for i in range(pairs):
        if i % 2 == 0:
            m = turn(model)
            r = turn(reference)
        else:
            r = turn(reference)
            m = turn(model)
        if r <= 0:
            raise TightropeError("The reference model's time was not positive; the timer cannot measure it.")
        ratios.append(m / r)
        model_ms.append(m)
        reference_ms.append(r)
    return {"ratio": statistics.median(ratios), "ratio_q25": percentile(ratios, 0.25),
            "ratio_q75": percentile(ratios, 0.75), "model_ms": statistics.median(model_ms),
            "reference_ms": statistics.median(reference_ms), "pairs": pairs, "runs": runs}


def relative_latency(clf: TextClassifier, reference: TextClassifier, text: str, seq_len: int = 256, pairs: int = 30,
                     runs: int = 1, warmup: int = 3) -> RelativeLatency:
    """Batch-1 latency of ``clf`` relative to ``reference``, both in this process and at this thread count,
    on the same text cut to ``seq_len`` tokens (each through its own tokenizer; a smoothed model's copies
    included), timed in interleaved pairs (:func:`interleaved_ratio`)."""
    batch = fixed_length_batch(clf, text, smoothing_rows(clf), seq_len)
    reference_batch = fixed_length_batch(reference, text, smoothing_rows(reference), seq_len)
    with torch.inference_mode():
        timed = interleaved_ratio(lambda: clf.forward_ids(**batch), lambda: reference.forward_ids(**reference_batch),
                                  pairs=pairs, runs=runs, warmup=warmup)
    return RelativeLatency(**timed, batch_size=1, seq_len=seq_len, threads=torch.get_num_threads())


def round_orders(names: list[str], rounds: int, seed: int = 0) -> list[list[str]]:
    """The order of each round: every name once, shuffled afresh each round (seeded)."""
    rng = random.Random(seed)
    orders = []
    for _ in range(rounds):
        order = list(names)
        rng.shuffle(order)
        orders.append(order)
    return orders


def _latency_worker(conn, build: Callable[[], TextClassifier], text: str, seq_len: int, threads: int, warmup: int) -> None:
    """One model in its own process: build it, warm it up, then time ``runs`` back-to-back forward
    passes each time the parent asks, until it sends None."""
    try:
        torch.set_num_threads(threads)
        clf = build()
        batch = fixed_length_batch(clf, text, 1, seq_len)
        with torch.inference_mode():
            for _ in range(warmup):
                clf.forward_ids(**batch)
    except Exception as err:  # noqa: BLE001 - reported to the parent, which raises it as one sentence
        conn.send(("error", f"{type(err).__name__}: {err}"))
        return
    conn.send(("ready", None))
    with torch.inference_mode():
        while (runs := conn.recv()) is not None:
            clf.forward_ids(**batch)  # not timed: wakes this runtime's threads after its idle turn
            times = []
            for _ in range(runs):
                start = time.perf_counter()
                clf.forward_ids(**batch)
                times.append((time.perf_counter() - start) * 1000)
            conn.send(("times", times))


def _receive(conn, proc, name: str):
    while not conn.poll(1.0):
        if not proc.is_alive():
            raise TightropeError(f"The latency worker of {name!r} died (exit code {proc.exitcode}).")
    kind, payload = conn.recv()
    if kind == "error":
        raise TightropeError(f"Could not run {name!r} for the latency measurement: {payload}")
    return payload


def isolated_latency(builders: dict[str, Callable[[], TextClassifier]], text: str, seq_len: int = 256, rounds: int = 20,
                     runs: int = 3, warmup: int = 5, threads: int | None = None, gap_s: float = 0.05,
                     seed: int = 0) -> dict[str, list[float]]:
    """Batch-1 latencies (ms) of several models, each in its own process, taken in interleaved rounds.

    Each round visits every model once in a fresh random order (:func:`round_orders`), so the slow
    drift of a shared machine falls on all of them alike; at each visit the model runs once untimed
    and then ``runs`` times back to back. ``builders`` are picklable zero-argument callables (e.g.
    ``functools.partial(inference.load, path)``) run in the worker.

    Why processes: with several runtimes in one process, each one's idle threads perturb the next
    one's timing. After a forward pass torch's OpenMP workers spin-wait for a while before they
    sleep, and on a 2-core machine that spinning takes a core from an ONNX Runtime session run right
    after; measured here on MiniLM at 1 x 256, in one process, interleaving fp32 eager with the int8
    session gave 1.44x, with three more ONNX Runtime sessions in the rounds 1.92x, with
    ``OMP_WAIT_POLICY=PASSIVE`` 1.86x: the ratio depended on the neighbours, not on the models. In
    separate processes, with ``gap_s`` of quiet between visits, no model shares threads with another.
    """
    if not builders:
        raise TightropeError("No models were given to measure.")
    if rounds < 1 or runs < 1:
        raise TightropeError(f"Rounds and runs per visit must be at least 1, not {rounds} and {runs}.")
    ctx = mp.get_context("spawn")
    threads = threads or torch.get_num_threads()
    workers: dict[str, tuple] = {}
    try:
        for name, build in builders.items():
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_latency_worker, args=(child, build, text, seq_len, threads, warmup), daemon=True)
            proc.start()
            child.close()
            workers[name] = (proc, parent)
            _receive(parent, proc, name)  # built one at a time: loading does not overlap the others
        times: dict[str, list[float]] = {name: [] for name in builders}
        for order in round_orders(list(builders), rounds, seed):
            for name in order:
                time.sleep(gap_s)
                proc, conn = workers[name]
                conn.send(runs)
                times[name].extend(_receive(conn, proc, name))
        return times
    finally:
        for proc, conn in workers.values():
            try:
                conn.send(None)
            except OSError:
                pass
        for proc, _ in workers.values():
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()


@torch.inference_mode()
def measure_throughput(clf: TextClassifier, text: str, batch_size: int = 32, seq_len: int = 128, runs: int = 5) -> Throughput:
    batch = fixed_length_batch(clf, text, batch_size * smoothing_rows(clf), seq_len)  # texts, or their copies
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
    cmd = [sys.executable, "-m", "tightrope.workflows.memprobe", model, "--seq-len", str(seq_len)]
    if threads:
        cmd += ["--threads", str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"memory probe failed for {model}: {tail[0]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
