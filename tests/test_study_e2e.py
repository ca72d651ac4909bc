"""A real (tiny) study end to end with MiniLM: train -> int8 -> evaluate -> report, then fully cached."""

from __future__ import annotations

import json

import pytest

from tightrope.study.plan import run_study
from tightrope.study.spec import parse_spec

TINY = {
    "name": "tiny-e2e",
    "model": {"source": "minilm"},
    "data": {"task": "rotten-tomatoes", "n_train": 16, "n_eval": 16, "n_test": 16, "max_length": 16},
    "train": {"epochs": 1, "batch_size": 8, "lr": 1e-4},
    "compress": [{"name": "int8", "steps": [{"method": "Int8Dynamic", "params": {"backend": "torch"}}]}],
    "evaluate": {"speed": False, "memory": False},
    "report": {"after": "int8"},
}


@pytest.mark.slow
def test_tiny_study_runs_end_to_end_then_is_fully_cached(tmp_path):
    spec = parse_spec(TINY)
    first = run_study(spec, tmp_path / "run", progress=False)
    assert not any(r.cached for r in first.records.values())
    ev = first.result("evaluate/int8")
    assert 0.0 <= ev["metrics"]["accuracy"] <= 1.0
    page = (tmp_path / "run" / "report.html").read_text()
    assert "Table I" in page and "int8" in page
    again = run_study(spec, tmp_path / "run", progress=False)
    assert all(r.cached for r in again.records.values())
    assert again.result("evaluate/int8")["metrics"] == ev["metrics"]
    assert json.loads((tmp_path / "run" / "study.json").read_text())["name"] == "tiny-e2e"
