"""Gaussian weight noise before quantization."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import make_tiny_classifier
from tightrope.compress import primitives as P
from tightrope.defenses.noise import add_weight_noise_, quantization_step
from tightrope.errors import TightropeError


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_absolute_noise_has_the_requested_spread_and_skips_the_head(tokenizer):
    model = make_tiny_classifier(tokenizer)
    before = _weights(model)
    summary = add_weight_noise_(model, 1e-3, seed=0)
    assert summary.modules and all("classifier" not in m and "pooler" not in m for m in summary.modules)
    diffs = torch.cat([(model.get_submodule(m).weight - before[f"{m}.weight"]).flatten() for m in summary.modules])
    assert diffs.std().item() == pytest.approx(1e-3, rel=0.05)
    assert summary.mean_abs_change == pytest.approx(1e-3 * math.sqrt(2 / math.pi), rel=0.05)
    assert torch.equal(model.classifier.weight, before["classifier.weight"])
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, before["bert.embeddings.word_embeddings.weight"])


def test_same_seed_same_noise_other_seed_other_noise(tokenizer):
    a, b, c = (make_tiny_classifier(tokenizer) for _ in range(3))
    add_weight_noise_(a, 1e-2, seed=1)
    add_weight_noise_(b, 1e-2, seed=1)
    add_weight_noise_(c, 1e-2, seed=2)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values()))


def test_step_of_int8_and_nf4():
    w = torch.tensor([[1.0, -2.54, 0.5], [0.1, 0.2, -0.3]])
    assert torch.allclose(quantization_step(w, "llm-int8"), torch.tensor([[2.54 / 127] * 3, [0.3 / 127] * 3]))
    w4 = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
    _, absmax = P.quantize_blockwise(w4, P.NF4_CODE, 64)
    step = quantization_step(w4, "nf4")
    assert torch.allclose(step.reshape(2, 64), (absmax * 2 / 15).unsqueeze(1).expand(2, 64))


def test_relative_noise_scales_with_each_layer_step(tokenizer):
    model = make_tiny_classifier(tokenizer)
    with torch.no_grad():
        model.bert.encoder.layer[0].attention.self.query.weight.mul_(100)  # a layer with a 100x wider range
    before = _weights(model)
    add_weight_noise_(model, 0.5, relative=True, scheme="llm-int8", seed=0)
    big = "bert.encoder.layer.0.attention.self.query.weight"
    small = "bert.encoder.layer.0.attention.self.key.weight"
    d_big = (model.get_parameter(big) - before[big]).std() / quantization_step(before[big]).mean()
    d_small = (model.get_parameter(small) - before[small]).std() / quantization_step(before[small]).mean()
    assert d_big.item() == pytest.approx(0.5, rel=0.1) and d_small.item() == pytest.approx(0.5, rel=0.1)


@pytest.mark.parametrize("kwargs,match", [
    (dict(sigma=0.0), "sigma is 0"),
    (dict(sigma=-1.0), "positive"),
    (dict(sigma=0.1, relative=True, scheme="int3"), "Unknown quantization scheme"),
    (dict(sigma=0.1, include=("nothing*",)), "match no"),
])
def test_bad_noise_settings(tokenizer, kwargs, match):
    with pytest.raises(TightropeError, match=match):
        add_weight_noise_(make_tiny_classifier(tokenizer), **kwargs)
