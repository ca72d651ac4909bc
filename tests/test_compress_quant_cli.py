"""`tightrope compress` on a tiny saved classifier: chainable, reloadable, one-sentence errors."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from tightrope import inference
from tightrope.cli import app
from tightrope.compress.specs import parse_spec, quant_config
from tightrope.compress.quant import GPTQ, NF4, Affine, Int8Dynamic
from tightrope.errors import TightropeError

runner = CliRunner()


def test_parse_spec_reads_typed_options():
    assert parse_spec("gptq:bits=4,group_size=none") == ("gptq", {"bits": 4, "group_size": None})
    assert parse_spec("nf4-dq") == ("nf4-dq", {})
    assert quant_config("nf4-dq") == NF4(double_quant=True)
    assert quant_config("int8-torch", include=("*.query",)) == Int8Dynamic(backend="torch", include=("*.query",))
    assert quant_config("affine:bits=3,granularity=tensor") == Affine(bits=3, granularity="tensor")
    assert quant_config("gptq8", calibration="imdb").calibration_texts == "imdb"
    assert isinstance(quant_config("gptq"), GPTQ)


@pytest.mark.parametrize("spec, message", [
    ("nf5", "Unknown quantization"), ("affine:bits=12", "bits"), ("nf4:colour=red", "does not take"),
    ("affine:bits", "key=value"), ("int8:backend=tensorrt", "backend"),
])
def test_bad_specs_are_one_sentence(spec, message):
    with pytest.raises(TightropeError, match=message):
        quant_config(spec)


def test_compress_quantize_then_reload(tiny_model_dir, tmp_path):
    out = tmp_path / "nf4"
    result = runner.invoke(app, ["compress", str(tiny_model_dir), "--out", str(out), "--quantize", "nf4"])
    assert result.exit_code == 0, result.output
    assert "NF4" in result.output
    clf = inference.load(str(out))
    assert clf.card["format"] == "tightrope-quant"
    logits = clf.logits(["a fine film", "a dull film"])
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()


def test_compress_chains_pruning_and_quantization(tiny_model_dir, tmp_path):
    out = tmp_path / "chain"
    result = runner.invoke(app, ["compress", str(tiny_model_dir), "--out", str(out), "--prune", "magnitude:sparsity=0.3",
                                 "--quantize", "int8-torch"])
    assert result.exit_code == 0, result.output
    clf = inference.load(str(out))
    assert [s["method"] for s in clf.card["compression"]] == ["MagnitudePruning", "Int8Dynamic"]
    assert clf.logits(["fine"]).shape == (1, 2)


def test_compress_recovers_between_pruning_and_quantization(tiny_model_dir, tiny_task, tmp_path):
    out = tmp_path / "recovered"
    result = runner.invoke(app, ["compress", str(tiny_model_dir), "--out", str(out), "--prune", "structured:heads=0.5,ffn=0.5",
                                 "--recover-steps", "2", "--recover-task", str(tiny_task), "--quantize", "int8-torch"])
    assert result.exit_code == 0, result.output
    clf = inference.load(str(out))
    assert clf.card["recovery"] == {"task": str(tiny_task), "steps": 2}
    assert [s["method"] for s in clf.card["compression"]] == ["StructuredPruning", "Recovery", "Int8Dynamic"]
    plain = tmp_path / "plain"
    assert runner.invoke(app, ["compress", str(tiny_model_dir), "--out", str(plain), "--prune", "structured:heads=0.5,ffn=0.5",
                               "--quantize", "int8-torch"]).exit_code == 0
    texts = ["a fine film", "a dull film"]
    assert not torch.allclose(clf.logits(texts), inference.load(str(plain)).logits(texts))  # the recovery trained
    result = runner.invoke(app, ["compress", str(tiny_model_dir), "--out", str(tmp_path / "q"), "--quantize", "nf4",
                                 "--recover-steps", "2"])
    assert result.exit_code != 0 and "give --prune too" in result.output


def test_compress_refuses_requantizing_a_saved_quantized_model(tiny_model_dir, tmp_path):
    out = tmp_path / "once"
    assert runner.invoke(app, ["compress", str(tiny_model_dir), "--out", str(out), "--quantize", "fp4"]).exit_code == 0
    result = runner.invoke(app, ["compress", str(out), "--out", str(tmp_path / "twice"), "--quantize", "nf4"])
    assert result.exit_code == 2
    assert "already quantized" in result.output and "Traceback" not in result.output


def test_compress_unknown_method_and_bad_pattern_exit_2(tiny_model_dir, tmp_path):
    result = runner.invoke(app, ["compress", str(tiny_model_dir), "--out", str(tmp_path / "x"), "--quantize", "int3"])
    assert result.exit_code == 2 and "Unknown quantization" in result.output
    result = runner.invoke(app, ["compress", str(tiny_model_dir), "--out", str(tmp_path / "y"), "--quantize", "nf4",
                                 "--include", "decoder.*"])
    assert result.exit_code == 2 and "match no" in result.output


def test_one_name_per_scheme_across_consumers():
    """compress, train's quantize step, fake quantization, the relative noise step, the boxes, the attacks'
    quantized copies, the causal-LM attack and the audit all name schemes from one table, QUANT_SCHEMES, and a
    name means the same quantizer (the same config class) wherever it is read."""
    from tightrope.compress.specs import QUANT_SCHEMES
    from tightrope.defenses import fakequant, noise
    from tightrope.defenses.run import QUANT_CHOICES
    from tightrope.qattack import audit, boxes, pruning, quantize, scenario, transform
    from tightrope.qattack.lm_training import THROUGH_SCHEMES

    from tightrope.compress.gguf_preset import PRESET_SCHEMES, PRESETS

    # llama-quantize presets (gguf-q4_k_m ...) are named beside the schemes: each layer takes one of its GGUF types
    registry = set(QUANT_SCHEMES) | set(PRESET_SCHEMES)
    assert {f"gguf-{PRESETS[p].lower()}" for p in PRESET_SCHEMES.values()} <= set(QUANT_SCHEMES)
    assert QUANT_CHOICES == tuple(QUANT_SCHEMES)
    consumers = {"noise.STEP_SCHEMES": set(noise.STEP_SCHEMES), "fakequant.QDQ": set(fakequant.QDQ),
                 "boxes.QUANTIZERS": set(boxes.QUANTIZERS), "quantize.CONFIGS": set(quantize.CONFIGS),
                 "boxes.GGUF_QUANTIZERS": set(boxes.GGUF_QUANTIZERS), "boxes.CHOICES": set(boxes.CHOICES) - {"all"},
                 "quantize.LIBRARIES": set(quantize.LIBRARIES),
                 "lm_training.THROUGH_SCHEMES": set(THROUGH_SCHEMES) | set(THROUGH_SCHEMES.values()),
                 "audit.AuditConfig": set(audit.AuditConfig().transforms) - {"all"} - set(pruning.PRUNINGS)
                                      - set(transform.BOXLESS),
                 "scenario.AttackConfig.check": set(scenario.AttackConfig.model_fields["check"].default)}
    assert {name: sorted(names - registry) for name, names in consumers.items() if names - registry} == {}
    assert {"llm-int8", "int8", "int8-tensor", "nf4", "fp4"} <= set(fakequant.QDQ)
    assert set(THROUGH_SCHEMES) <= set(boxes.QUANTIZERS) and set(boxes.QUANTIZERS) <= set(quantize.CONFIGS)
    # every name the attacks and the audit accept is quantized by a real library: compress_'s bitsandbytes / torch.ao
    # configs (classes checked below), or, for a GGUF type, llama.cpp's gguf.quants (checked right here)
    accepted = set(boxes.ATTACK_QUANTIZERS)
    assert set(boxes.CHOICES) == accepted | set(boxes.PRESET_QUANTIZERS) | {"all"}
    assert accepted == set(quantize.LIBRARIES) - set(quantize.K_QUANTIZERS) - set(boxes.PRESET_QUANTIZERS)
    assert set(quantize.LIBRARIES) == set(quantize.COPY_QUANTIZERS)  # k-quants: quantized copies, but no boxes
    assert accepted == set(quantize.CONFIGS) | set(boxes.GGUF_QUANTIZERS)
    gguf = pytest.importorskip("gguf")
    from gguf import quants

    lin = torch.nn.Linear(64, 8)
    for name in boxes.GGUF_QUANTIZERS:
        kind = gguf.GGMLQuantizationType[name.removeprefix("gguf-").upper()]
        expected = quants.dequantize(quants.quantize(lin.weight.detach().numpy(), kind), kind)
        assert torch.equal(quantize.quantized_copy(torch.nn.Sequential(lin), name)[0].weight, torch.from_numpy(expected))
    assert {n: type(make(())).__name__ for n, make in quantize.CONFIGS.items()} == {
        n: QUANT_SCHEMES[n][0] for n in quantize.CONFIGS}
    # the GGUF block types: boxes and fake quantization take them; compress / train refuse them in one sentence
    gguf_names = {n for n, (cls, _, _) in QUANT_SCHEMES.items() if cls == "GGUF"}
    assert gguf_names == {*boxes.GGUF_QUANTIZERS, *quantize.K_QUANTIZERS} and gguf_names <= set(fakequant.QDQ)
    for name in gguf_names:
        with pytest.raises(TightropeError, match="fake quantization(, qattack and audit| and quantized copies) only"):
            quant_config(name)


@pytest.mark.parametrize("old", ["int8-dynamic", "int8-llm"])
def test_old_spellings_are_refused_with_the_new_name(old):
    from tightrope.defenses.fakequant import fake_quantize
    from tightrope.errors import TightropeError

    with pytest.raises(TightropeError, match="is now called"):
        quant_config(old)
    with pytest.raises(TightropeError, match="is now called"):
        fake_quantize(torch.zeros(2, 2), old)


def test_the_audit_refuses_the_old_int8_dynamic_spelling_with_its_new_name():
    from tightrope.qattack.boxes import check_quantizer

    with pytest.raises(TightropeError, match="'int8-dynamic' is now called 'int8-tensor'"):
        check_quantizer("int8-dynamic")
