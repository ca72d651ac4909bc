"""Frozen result records and their JSON form. Raw fractions and milliseconds; reports round."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from tightrope.atomic import write_json_atomic  # noqa: F401 - re-exported for callers
from tightrope.evaluate.metrics import ClassificationMetrics
from tightrope.evaluate.perf import Latency, Throughput


@dataclass(frozen=True)
class EvalResult:
    model: str
    task: str
    split: str
    metrics: ClassificationMetrics
    latency: Latency | None = None
    throughput: Throughput | None = None
    weight_bytes: int | None = None  # the weight files on disk
    peak_rss_bytes: int | None = None  # resident memory of a fresh process that loaded the model and predicted
    baseline_rss_bytes: int | None = None  # ... of the same process before loading (the difference is the model's)
    parameters: int | None = None
    nonzero_parameters: int | None = None  # what pruning left
    compression: dict | None = None  # the model card's record of how it was compressed
    seconds: float | None = None  # the whole evaluation, wall clock
    environment: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "EvalResult":
        data = dict(data)
        data["metrics"] = ClassificationMetrics(**data["metrics"])
        if data.get("latency"):
            data["latency"] = Latency(**data["latency"])
        if data.get("throughput"):
            data["throughput"] = Throughput(**data["throughput"])
        return cls(**data)
