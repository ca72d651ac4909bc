"""The pipeline order: prune -> train -> quantize and the others, composed from compress_ and train."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tightrope import models
from tightrope.compress.prune import MagnitudePruning
from tightrope.compress.quant import Int8Dynamic
from tightrope.defenses.adversarial import FastAdversarial
from tightrope.defenses.pipeline import parse_order, run_pipeline
from tightrope.errors import TightropeError
from tightrope.train import TrainConfig


def _config(model_dir, task, **kw):
    return TrainConfig(**{**dict(model=str(model_dir), task=str(task), n_eval=8, max_length=16, batch_size=8,
                                 epochs=1, lr=5e-3, seed=0), **kw})


def _encoder_zeros(state):
    return {k: v == 0 for k, v in state.items() if k.endswith(".weight") and "encoder" in k and v.dim() == 2}


def test_prune_then_adversarial_recovery_keeps_pruned_weights_zero_then_quantizes(tiny_model_dir, tiny_task, tmp_path):
    loaded = models.load_classifier(str(tiny_model_dir), require_head=False)
    result = run_pipeline(loaded, "prune->train->quantize", tmp_path / "run", train_config=_config(tiny_model_dir, tiny_task),
                          objective=FastAdversarial(epsilon=0.01), prune=MagnitudePruning(sparsity=0.3),
                          quantize=Int8Dynamic(backend="torch"), progress=False)
    assert [s["step"] for s in result.steps] == ["prune", "train", "quantize"]
    assert result.steps[1]["sparsity_held"] and result.train_card["defense"]["defense"] == "fast"
    trained = load_file(tmp_path / "run" / "train" / "model.safetensors")
    zeros = _encoder_zeros(trained)
    share = sum(int(z.sum()) for z in zeros.values()) / sum(z.numel() for z in zeros.values())
    assert share == pytest.approx(0.3, abs=0.01)  # the pruned share is still exactly zero after training
    assert "Int8Dynamic" in json.dumps(result.steps[2]["summary"])
    assert any("quantized" in type(m).__module__ for m in loaded.model.modules())


def test_quantize_before_train_means_quantization_aware_training(tiny_model_dir, tiny_task, tmp_path):
    loaded = models.load_classifier(str(tiny_model_dir), require_head=False)
    result = run_pipeline(loaded, "prune,quantize,train", tmp_path / "run", train_config=_config(tiny_model_dir, tiny_task),
                          prune=MagnitudePruning(sparsity=0.2), quantize=Int8Dynamic(backend="torch", per_channel=True),
                          progress=False)
    train_step = result.steps[2]
    assert result.steps[1]["deferred"] and train_step["quantization_aware"] and "export" in train_step
    assert result.train_card["defense"]["fake_quant"] == "int8"
    zeros = _encoder_zeros(load_file(tmp_path / "run" / "train" / "model.safetensors"))
    assert sum(int(z.sum()) for z in zeros.values()) > 0


@pytest.mark.parametrize("order,match", [
    ("", "empty"),
    ("prune,distill", "Unknown pipeline step"),
    ("train,train", "twice"),
    ("quantize,noise", "before quantization"),
    ("quantize,prune", "cannot be pruned"),
])
def test_bad_orders_are_one_clear_sentence(order, match):
    with pytest.raises(TightropeError, match=match):
        parse_order(order)


def test_orders_parse_and_missing_settings_are_named(tiny_model_dir):
    assert parse_order("Prune -> Train -> Quantize") == ("prune", "train", "quantize")
    assert parse_order(["train", "prune", "quantize"]) == ("train", "prune", "quantize")
    loaded = models.load_classifier(str(tiny_model_dir), require_head=False)
    with pytest.raises(TightropeError, match="no prune settings"):
        run_pipeline(loaded, "prune,quantize", "unused", quantize=Int8Dynamic())
    with pytest.raises(TightropeError, match="has no 'noise' step"):
        run_pipeline(loaded, "quantize", "unused", quantize=Int8Dynamic(), noise={"sigma": 1e-3})


def test_noise_before_quantization_in_the_pipeline(tiny_model_dir, tmp_path):
    loaded = models.load_classifier(str(tiny_model_dir), require_head=False)
    before = loaded.model.bert.encoder.layer[0].output.dense.weight.detach().clone()
    result = run_pipeline(loaded, "noise", tmp_path, noise={"sigma": 0.5, "relative": True, "scheme": "llm-int8"})
    assert result.steps[0]["summary"]["relative"]
    assert not torch.equal(loaded.model.bert.encoder.layer[0].output.dense.weight, before)
