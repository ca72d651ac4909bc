"""Fake quantization: forward values equal the real quantizer's, gradients pass straight through."""

from __future__ import annotations

import pytest
import torch

from conftest import POSITIVE, make_tiny_classifier
from tightrope.compress import primitives as P
from tightrope.defenses.adversarial import FreeLB, PGDTraining
from tightrope.defenses.fakequant import QDQ, QuantAware, fake_quantize, fake_quantized, quantize_dequantize
from tightrope.errors import TightropeError


@pytest.fixture
def weight():
    return torch.randn(48, 96, generator=torch.Generator().manual_seed(0)) * 0.05


def test_int8_dynamic_matches_torch_quantizer(weight):
    scale = weight.abs().amax(dim=1) / 127.5
    real = torch.quantize_per_channel(weight, scale, torch.zeros(48, dtype=torch.long), 0, torch.qint8).dequantize()
    assert torch.equal(fake_quantize(weight, "int8"), real)


def test_int8_tensor_matches_torch_quantizer(weight):
    real = torch.quantize_per_tensor(weight, float(weight.abs().max() / 127.5), 0, torch.qint8).dequantize()
    assert torch.equal(fake_quantize(weight, "int8-tensor"), real)


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
def test_4bit_matches_bitsandbytes(weight, kind):
    """bitsandbytes' codes, each block dequantized by its own absmax (what its GPU kernel computes;
    its CPU kernel is checked, and routed around where faulty, in test_bnb4.py)."""
    bnbf = pytest.importorskip("bitsandbytes.functional")
    packed, state = bnbf.quantize_4bit(weight, blocksize=64, quant_type=kind)
    real = P.dequantize_blockwise(P.unpack_4bit(packed, weight.shape), state.absmax, P.CODES_4BIT[kind], 64)
    assert torch.equal(fake_quantize(weight, kind), real)


def test_int8_matches_llm_int8_reference(weight):
    q, scale = P.quantize_rowwise_absmax_int8(weight)
    assert torch.equal(fake_quantize(weight, "llm-int8"), P.dequantize_rowwise_absmax_int8(q, scale))


@pytest.mark.parametrize("scheme", sorted(QDQ))
def test_gradient_passes_straight_through(weight, scheme):
    w = weight.clone().requires_grad_(True)
    g = torch.randn_like(w)
    (fake_quantize(w, scheme) * g).sum().backward()
    assert torch.equal(w.grad, g)
    # And it really quantizes: few distinct values per row for 4-bit, many fewer than fp32 for int8.
    assert not torch.equal(quantize_dequantize(weight, scheme), weight)


def test_model_forward_under_fake_quant_equals_the_really_quantized_model(tokenizer):
    model = make_tiny_classifier(tokenizer)
    enc = tokenizer(POSITIVE[:3], padding=True, return_tensors="pt")
    params = {n: p for n, p in model.named_parameters()}
    before = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad(), fake_quantized(model, "nf4") as names:
        fake = model(**enc).logits
    assert names and all("classifier" not in n and "pooler" not in n for n in names)
    # The model is back to its fp32 weights, with the same Parameter objects (the optimizer keeps them).
    assert {n: p for n, p in model.named_parameters()}.keys() == params.keys()
    assert all(p is params[n] and torch.equal(p, before[n]) for n, p in model.named_parameters())
    real = make_tiny_classifier(tokenizer)
    with torch.no_grad():
        for name in names:
            layer = real.get_submodule(name)
            layer.weight.copy_(P.dequantize_4bit(*P.quantize_4bit(layer.weight, "nf4"), "nf4"))
        assert torch.equal(fake, real(**enc).logits)
        assert not torch.allclose(fake, model(**enc).logits)


@pytest.mark.parametrize("inner", [None, lambda: PGDTraining(epsilon=0.1, steps=2), lambda: FreeLB(epsilon=1.0, steps=2)],
                         ids=["clean", "pgd", "freelb"])
def test_quant_aware_objective_trains_the_latent_weights(tokenizer, inner):
    model = make_tiny_classifier(tokenizer)
    enc = tokenizer(POSITIVE[:4], padding=True, return_tensors="pt")
    batch = {**enc, "labels": torch.tensor([1, 1, 0, 0])}
    loss = QuantAware(inner() if inner else None, scheme="llm-int8")(model, batch)
    loss.backward()
    layer = model.bert.encoder.layer[0].attention.self.query
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    assert "weight" in dict(layer.named_parameters())  # no parametrization left behind


def test_unknown_scheme_is_one_sentence():
    with pytest.raises(TightropeError, match="Unknown fake-quantization scheme"):
        QuantAware(scheme="int3")
