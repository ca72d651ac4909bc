import functools
import json

import pytest
import torch

from tightrope import inference
from tightrope.errors import TightropeError
from tightrope.evaluate import perf
from tightrope.evaluate.metrics import classification_metrics
from tightrope.evaluate.results import EvalResult, write_json_atomic
from tightrope.workflows.evaluate import evaluate_model


def test_metrics_match_hand_computation():
    m = classification_metrics([0, 0, 1, 1, 1], [0, 1, 1, 1, 0], ["neg", "pos"])
    assert m.accuracy == pytest.approx(3 / 5)
    # neg: P=1/2, R=1/2 -> F1 .5; pos: P=2/3, R=2/3 -> F1 2/3
    assert m.per_class_f1 == pytest.approx({"neg": 0.5, "pos": 2 / 3})
    assert m.macro_f1 == pytest.approx((0.5 + 2 / 3) / 2)
    assert m.confusion == [[1, 1], [1, 2]]


def test_percentile_and_fixed_length_batch(tiny_model_dir):
    assert perf.percentile([1, 2, 3, 4, 5], 0.5) == 3
    assert perf.percentile(list(range(101)), 0.95) == pytest.approx(95)
    clf = inference.load(str(tiny_model_dir))
    batch = perf.fixed_length_batch(clf, "a good film", 3, 40)
    assert batch["input_ids"].shape == (3, 40) and batch["attention_mask"].all()


def test_round_orders_visit_every_model_once_a_round_in_a_changing_seeded_order():
    orders = perf.round_orders(list("abcd"), rounds=6, seed=1)
    assert len(orders) == 6 and all(sorted(o) == list("abcd") for o in orders)
    assert len({tuple(o) for o in orders}) > 1  # the order changes between rounds
    assert orders == perf.round_orders(list("abcd"), rounds=6, seed=1)


def test_isolated_latency_times_each_model_in_its_own_process(tiny_model_dir):
    builders = {name: functools.partial(inference.load, str(tiny_model_dir)) for name in ("a", "b")}
    times = perf.isolated_latency(builders, "a good film", seq_len=16, rounds=3, runs=2, warmup=1, threads=1, gap_s=0)
    assert {n: len(t) for n, t in times.items()} == {"a": 6, "b": 6}
    assert all(t > 0 for ts in times.values() for t in ts)


def test_isolated_latency_refuses_nothing_to_measure_and_zero_runs(tiny_model_dir):
    with pytest.raises(TightropeError, match="No models"):
        perf.isolated_latency({}, "a good film")
    with pytest.raises(TightropeError, match="at least 1"):
        perf.isolated_latency({"a": functools.partial(inference.load, str(tiny_model_dir))}, "a good film", runs=0)


def test_isolated_latency_names_a_model_that_cannot_be_built(tmp_path):
    builders = {"missing": functools.partial(inference.load, str(tmp_path / "nowhere"))}
    with pytest.raises(TightropeError, match="Could not run 'missing' for the latency measurement"):
        perf.isolated_latency(builders, "a good film", seq_len=16, rounds=1, threads=1)


def test_length_sorted_batches_give_input_order_logits(tiny_model_dir):
    clf = inference.load(str(tiny_model_dir))
    texts = ["short", "a much longer text that has many more tokens in it than the others", "mid length text"]
    batched = clf.logits(texts, batch_size=2)
    one_by_one = torch.cat([clf.logits([t], batch_size=1) for t in texts])
    assert torch.allclose(batched, one_by_one, atol=1e-5)


def test_evaluate_model_and_json_round_trip(tiny_model_dir, tiny_task, tmp_path):
    result = evaluate_model(str(tiny_model_dir), str(tiny_task), latency_seq_len=32, latency_runs=3,
                            memory=True, progress=False)
    assert result.metrics.examples == 48
    assert result.latency.median_ms > 0 and result.latency.p95_ms >= result.latency.median_ms
    assert result.latency.threads == torch.get_num_threads()
    assert result.weight_bytes == sum(f.stat().st_size for f in tiny_model_dir.glob("*.safetensors"))
    assert result.peak_rss_bytes > result.baseline_rss_bytes > 0
    path = write_json_atomic(tmp_path / "r.json", result.to_dict())
    again = EvalResult.from_dict(json.loads(path.read_text()))
    assert again == result


def test_write_json_atomic_leaves_no_partial_file(tmp_path, monkeypatch):
    import errno
    import os

    target = tmp_path / "out.json"
    write_json_atomic(target, {"ok": 1})

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError):
        write_json_atomic(target, {"ok": 2, "big": list(range(1000))})
    assert json.loads(target.read_text()) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


@pytest.mark.slow
def test_minilm_on_real_data(data_dir):
    """The packaged MiniLM with an untrained head runs end to end on real IMDB reviews."""
    from tightrope import models

    loaded = models.load_classifier("minilm", num_labels=2, require_head=False)
    clf = inference.TextClassifier(loaded.model, loaded.tokenizer, max_length=64)
    result = evaluate_model("minilm", "imdb", "test", n=16, data_dir=data_dir, clf=clf, speed=False,
                            memory=False, progress=False)
    assert result.metrics.examples == 16 and sum(map(sum, result.metrics.confusion)) == 16
