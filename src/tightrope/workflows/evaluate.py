"""Evaluate one model variant on a task: quality, speed, size and memory in one frozen record."""

from __future__ import annotations

import time

import torch

from tightrope import inference, workflows
from tightrope.compress.quant import parameter_counts
from tightrope.data import load_task
from tightrope.errors import TightropeError
from tightrope.evaluate import perf
from tightrope.evaluate.metrics import classification_metrics
from tightrope.evaluate.results import EvalResult
from tightrope.progress import Reporter, tracked
from tightrope.provenance import environment


def evaluate_model(
    model: str,
    task: str,
    split: str = "test",
    *,
    n: int | None = None,
    seed: int = 0,
    data_dir: str | None = None,
    batch_size: int = 64,
    max_length: int | None = None,
    speed: bool = True,
    memory: bool = True,
    latency_seq_len: int = 256,
    latency_runs: int = 50,
    progress: bool | Reporter = True,
    clf: inference.TextClassifier | None = None,
) -> EvalResult:
    """Score ``model`` on ``task``/``split`` and measure it. ``clf`` skips loading (already in memory)."""
    started = time.perf_counter()
    data = load_task(task, split, n=n, seed=seed, data_dir=data_dir)
    clf = clf or workflows.load(model, max_length=max_length)
    if data.num_labels > clf.num_labels:
        raise TightropeError(f"{task} has {data.num_labels} labels but {model} predicts {clf.num_labels}.")
    with tracked(progress, f"eval {model}", len(data.texts)) as bar:
        logits = clf.logits(data.texts, batch_size, progress=bar.advance)  # through the whole defended pipeline
    metrics = classification_metrics(data.labels, logits.argmax(-1).tolist(), list(clf.label_names))
    # a model with a shorter position table (a small or custom encoder) is timed at its longest input
    positions = getattr(getattr(getattr(clf, "model", None), "config", None), "max_position_embeddings", None)
    if isinstance(positions, int) and positions < latency_seq_len:
        latency_seq_len = positions
    latency = throughput = None
    if speed:
        sample = max(data.texts, key=len)
        latency = perf.measure_latency(clf, sample, seq_len=latency_seq_len, runs=latency_runs)
        throughput = perf.measure_throughput(clf, sample)
    mem = perf.peak_memory(model, seq_len=latency_seq_len) if memory else {}
    params = nonzero = None
    if isinstance(getattr(clf, "model", None), torch.nn.Module):
        # quantized modules (packed 4-bit, torch's packed int8) count by their logical weight count

        params, nonzero = parameter_counts(clf.model)
    return EvalResult(
        model=model, task=task, split=split, metrics=metrics, latency=latency, throughput=throughput,
        weight_bytes=perf.weight_bytes(model), peak_rss_bytes=mem.get("peak_rss_bytes"),
        baseline_rss_bytes=mem.get("baseline_rss_bytes"), parameters=params, nonzero_parameters=nonzero,
        compression=clf.card.get("compression"), seconds=time.perf_counter() - started, environment=environment(),
    )
