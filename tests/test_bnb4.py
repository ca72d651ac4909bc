"""bitsandbytes' CPU 4-bit kernel is checked against a known answer, and routed around where faulty.

The fault (bitsandbytes 0.50.2 on AVX-512 CPUs: blocks that straddle two rows are scaled by the
wrong block's absmax) is simulated here, so these tests hold on CPUs that have it and on CPUs that
do not.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("bitsandbytes")

from conftest import POSITIVE, make_tiny_classifier  # noqa: E402
from tightrope.compress import bnb4  # noqa: E402
from tightrope.compress import primitives as P  # noqa: E402
from tightrope.compress.api import compress_  # noqa: E402
from tightrope.compress.quant import NF4, FP4  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_check():
    bnb4.kernel_check.cache_clear()
    yield
    bnb4.kernel_check.cache_clear()


@pytest.fixture
def faulty_kernel(monkeypatch):
    """bitsandbytes' dequantization replaced by the simulated fault, on any CPU."""
    monkeypatch.setattr(bnb4, "bitsandbytes_dequantize", bnb4.simulated_fault)


def test_reference_dequantization_uses_each_blocks_own_absmax():
    w = torch.randn(48, 96, generator=torch.Generator().manual_seed(0)) * 0.05
    import bitsandbytes.functional as F

    data, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4")
    got = bnb4.reference_dequantize(data, state)
    # The reproduction: every block's largest value comes back as that block's absmax.
    ratio = got.reshape(-1, 64).abs().amax(1) / w.reshape(-1, 64).abs().amax(1)
    assert torch.allclose(ratio, torch.ones_like(ratio))
    assert torch.equal(got, P.dequantize_4bit(P.unpack_4bit(data, w.shape), state.absmax, "nf4"))


def test_the_simulated_fault_is_detected_and_a_correct_kernel_is_not():
    assert bnb4.find_faults(bnb4.reference_dequantize) == []
    faults = bnb4.find_faults(bnb4.simulated_fault)
    assert faults and any("48x96" in f for f in faults)
    assert all("64x64" not in f and "2x384" not in f for f in faults)  # rows of whole blocks are right
    check = bnb4.check(bnb4.simulated_fault)
    assert check.path == "reference" and "failed its known-answer check" in check.line()
    assert bnb4.check(bnb4.reference_dequantize).path == "bitsandbytes"


def test_the_installed_kernel_check_states_its_path():
    check = bnb4.kernel_check()
    assert check.path in ("bitsandbytes", "reference")
    assert check.ok == (check.faults == ())
    assert "known-answer check" in check.line()


def _reference_twin(model: nn.Module) -> nn.Module:
    """``model`` with every 4-bit layer replaced by an fp32 Linear holding the reference dequantization."""
    for name, module in list(model.named_modules()):
        if isinstance(module, bnb4.CheckedLinear4bit):
            lin = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            lin.weight.data = bnb4.reference_dequantize(module.weight.data, module.weight.quant_state)
            if module.bias is not None:
                lin.bias.data = module.bias.data.float()
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, lin)
    return model


@pytest.mark.parametrize("config", [NF4(), FP4(), NF4(double_quant=True)], ids=repr)
def test_a_faulty_kernel_is_detected_and_routed_around(config, tokenizer, faulty_kernel):
    """With a faulty kernel installed, the 4-bit model still computes each block's own absmax."""
    enc = tokenizer(POSITIVE[:3], padding=True, return_tensors="pt")
    model = make_tiny_classifier(tokenizer)
    summary = compress_(model, config)
    assert bnb4.kernel_check().path == "reference"
    assert any("failed its known-answer check" in note for note in summary.notes)
    with torch.no_grad():
        got = model(**enc).logits
        bnb4.kernel_check.cache_clear()
        want = _reference_twin(model)(**enc).logits
    assert torch.equal(got, want)


def test_a_correct_kernel_is_used_and_agrees_with_the_reference(tokenizer):
    if bnb4.find_faults():
        pytest.skip("bitsandbytes' CPU kernel is faulty on this CPU (the routing is tested with a simulated fault)")
    enc = tokenizer(POSITIVE[:3], padding=True, return_tensors="pt")
    model = make_tiny_classifier(tokenizer)
    compress_(model, NF4())
    assert bnb4.kernel_check().path == "bitsandbytes"
    with torch.no_grad():
        assert torch.equal(model(**enc).logits, _reference_twin(model)(**enc).logits)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_the_layer_is_dequantize_then_fp32_linear(quant_type, faulty_kernel):
    """Whatever the CPU: fp32 ``linear`` with each block's own absmax (never bf16, never a wrong block)."""
    torch.manual_seed(0)
    lin = nn.Linear(96, 48)
    layer = bnb4.linear_4bit(lin, quant_type)
    x = torch.randn(5, 96)
    w = bnb4.reference_dequantize(layer.weight.data, layer.weight.quant_state)
    with torch.no_grad():
        assert torch.equal(layer(x), nn.functional.linear(x, w, lin.bias))


def test_the_path_is_recorded_in_the_environment():
    from tightrope.provenance import environment

    assert environment()["bitsandbytes_4bit"] == bnb4.kernel_check().path


def test_the_path_is_recorded_in_the_compressed_models_card(tiny_model_dir, tmp_path):
    import json

    from tightrope.workflows.compress import compress_model

    compress_model(str(tiny_model_dir), tmp_path / "nf4", quantize="nf4", progress=False)
    card = json.loads((tmp_path / "nf4" / "card.json").read_text())
    assert card["environment"]["bitsandbytes_4bit"] == bnb4.kernel_check().path
    assert any("known-answer check" in note for step in card["compression"] for note in step["notes"])
