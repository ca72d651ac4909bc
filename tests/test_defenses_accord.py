"""Gradient accord and Flooding-X's flood level (tightrope.accord)."""

import pytest
import torch
from safetensors.torch import load_file

from tightrope.accord import (batch_halves, ema, flood_level_from_accord, gradient_accord,
                                       gradient_cosine)
from tightrope.errors import TightropeError
from tightrope.train import TrainConfig, train


def test_gradient_cosine_of_aligned_opposite_and_zero_gradients():
    g = [torch.tensor([1.0, 2.0]), torch.tensor([[3.0]])]
    assert gradient_cosine(g, [2 * t for t in g]) == pytest.approx(1.0)
    assert gradient_cosine(g, [-t for t in g]) == pytest.approx(-1.0)
    assert gradient_cosine(g, [torch.tensor([2.0, -1.0]), torch.tensor([[0.0]])]) == pytest.approx(0.0)
    assert gradient_cosine(g, [torch.zeros(2), torch.zeros(1, 1)]) == 0.0


def test_batch_halves_interleave_tensors_and_lists_and_refuse_a_single_example():
    batch = {"input_ids": torch.arange(10).view(5, 2), "labels": torch.tensor([0, 1, 0, 1, 1]), "texts": list("abcde")}
    first, second = batch_halves(batch)
    assert first["texts"] == ["a", "c", "e"] and second["texts"] == ["b", "d"]
    assert first["labels"].tolist() == [0, 0, 1] and second["input_ids"].tolist() == [[2, 3], [6, 7]]
    with pytest.raises(TightropeError, match="at least 2 examples"):
        batch_halves({"labels": torch.tensor([1])})


def test_flood_level_is_the_smoothed_loss_where_the_accord_falls_to_zero_after_its_peak():
    # the accord starts near zero (a fresh head), rises to 0.5 at i = 3, then falls: 0 at i = 8
    accords = [-0.05, 0.2, 0.4, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0, -0.1, -0.2]
    trace = [{"step": 10 * i, "loss": 0.7 - 0.05 * i, "accord": a} for i, a in enumerate(accords)]
    level = flood_level_from_accord(trace, smoothing=0.0)  # no smoothing: the raw crossing, not the one at i = 0
    assert (level.peak_step, level.step, level.level) == (30, 80, pytest.approx(0.3))
    smoothed = flood_level_from_accord(trace, smoothing=0.5)  # smoothing lags the crossing
    assert smoothed.step > 80
    assert smoothed.level == pytest.approx(ema([r["loss"] for r in trace], 0.5)[smoothed.step // 10])


def test_a_run_whose_gradients_still_agree_gets_no_flood_level_and_bad_traces_are_one_sentence():
    trace = [{"step": i, "loss": 0.5, "accord": a} for i, a in enumerate([-0.1, 0.1, 0.3, 0.2, 0.1])]
    found = flood_level_from_accord(trace, smoothing=0.0)  # still positive past the peak: no level
    assert found.level is None and found.peak_step == 2
    with pytest.raises(TightropeError, match="--accord-every"):
        flood_level_from_accord([])
    with pytest.raises(TightropeError, match="smoothing"):
        flood_level_from_accord(trace, smoothing=1.0)


def test_accord_of_a_batch_against_itself_is_one_and_leaves_grads_and_mode_alone():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Dropout(0.5), torch.nn.Linear(4, 2))

    def objective(m, batch):
        return torch.nn.functional.cross_entropy(m(batch["x"]), batch["labels"])

    x = torch.randn(3)
    same = {"x": torch.stack([x, x, x * 2, x * 2]), "labels": torch.tensor([1, 1, 0, 0])}
    model.train()
    accord, loss = gradient_accord(model, objective, same)
    assert accord == pytest.approx(1.0, abs=1e-5) and loss > 0
    assert model.training and all(p.grad is None for p in model.parameters())
    opposed = {"x": torch.stack([x, x]), "labels": torch.tensor([1, 0])}  # the same input, both labels
    assert gradient_accord(model, objective, opposed)[0] < 0


def test_measuring_the_accord_leaves_the_trained_weights_unchanged_and_records_the_trace(tiny_model_dir, tiny_task, tmp_path):
    base = dict(model=str(tiny_model_dir), task=str(tiny_task), n_eval=8, max_length=16, batch_size=4, epochs=1,
                lr=1e-3, checkpoint_every=2, seed=3)
    train(TrainConfig(**base), tmp_path / "plain", progress=False)
    measured = TrainConfig(**base, accord_every=3)
    # killed after 4 steps and resumed: the trace survives the checkpoint
    assert train(measured, tmp_path / "measured", progress=False, stop_after_steps=4) == {"interrupted_at": 4}
    card = train(measured, tmp_path / "measured", progress=False)
    a, b = load_file(tmp_path / "plain" / "model.safetensors"), load_file(tmp_path / "measured" / "model.safetensors")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [r["step"] for r in card["gradient_accord"]] == [0, 3, 6, 9]
    assert all(-1 <= r["accord"] <= 1 for r in card["gradient_accord"])
    assert set(card["flooding_x"]) >= {"level", "step", "rule"}
    # a measurement is not a setting: the finished run is recognised without it
    assert train(TrainConfig(**base), tmp_path / "measured", progress=False)["steps"] == card["steps"]
