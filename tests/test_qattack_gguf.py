"""GGUF block types in the attack and the audit, checked against llama.cpp's own gguf.quants (tiny models, seconds)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import make_tiny_classifier, null_without
from typer.testing import CliRunner

from tightrope import models
from tightrope.cli import app
from tightrope.compress import gguf as G
from tightrope.errors import TightropeError
from tightrope.qattack import audit as A
from tightrope.qattack import boxes as B
from tightrope.qattack.quantize import (
    COPY_QUANTIZERS,
    K_QUANTIZERS,
    LIBRARIES,
    codes_equal,
    library_codes,
    missing_library,
    quantized_copy,
)
from tightrope.qattack.repair import FitConfig, repair_

gguf = pytest.importorskip("gguf")
Q = pytest.importorskip("gguf.quants")
runner = CliRunner()


def reference(w: torch.Tensor, scheme: str) -> tuple[np.ndarray, np.ndarray]:
    """llama.cpp's round trip of ``w`` as its converter writes a Linear weight: the array [out, in] as it is."""
    kind = gguf.GGMLQuantizationType(G.block_type(scheme).type_id)
    packed = Q.quantize(w.detach().float().numpy(), kind)
    return packed, Q.dequantize(packed, kind)


def tiny(seed=0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=200,
                     num_labels=2)
    return BertForSequenceClassification(cfg).eval()


def repaired(model, quantizer, steps=20, lr=3e-3):
    boxes = B.model_boxes(model, quantizer)
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(3)
    ids = [torch.randint(5, 200, (12,), generator=g).tolist() for _ in range(64)]
    repair_(out, boxes, ids, [i % 2 for i in range(64)], 0, FitConfig(steps=steps, lr=lr, batch_size=16), progress=False)
    return out, boxes


def test_every_accepted_quantizer_names_its_real_library():
    assert set(LIBRARIES) == set(COPY_QUANTIZERS)
    assert set(B.CHOICES) == {*B.ATTACK_QUANTIZERS, *B.PRESET_QUANTIZERS, "all"}  # presets: boxes per layer
    # k-quants: copies, no boxes; presets: copies, and boxes where a layer's type has them
    assert set(COPY_QUANTIZERS) - set(B.ATTACK_QUANTIZERS) == {*K_QUANTIZERS, *B.PRESET_QUANTIZERS}
    assert all(LIBRARIES[n].startswith("gguf.quants") for n in B.GGUF_QUANTIZERS)
    assert all(missing_library(n) is None for n in B.GGUF_QUANTIZERS)


@pytest.mark.parametrize("scheme", B.GGUF_QUANTIZERS)
def test_quantized_copy_holds_llama_cpps_dequantized_weights(scheme):
    model = tiny(0)
    qmodel = quantized_copy(model, scheme)
    names = list(B.quantized_linears(model))
    assert "classifier" not in names and any("pooler" in n for n in names)  # the same layers as every quantizer
    for name in names:
        w = model.get_submodule(name).weight
        packed, values = reference(w, scheme)
        assert torch.equal(qmodel.get_submodule(name).weight, torch.from_numpy(values))
        assert np.array_equal(library_codes(w, scheme)[0].numpy(), packed)
        assert np.array_equal(G.quantize(w, scheme).data.numpy(), packed)  # tightrope's own (the boxes') = llama.cpp's
        assert torch.equal(qmodel.get_submodule(name).bias, model.get_submodule(name).bias)
    assert torch.equal(qmodel.classifier.weight, model.classifier.weight)
    ids = torch.randint(5, 200, (2, 7))
    assert not torch.equal(qmodel(input_ids=ids).logits, model(input_ids=ids).logits)


def test_blocks_run_along_the_input_dimension_as_llama_cpp_lays_out_a_linear():
    torch.manual_seed(1)
    lin = torch.nn.Linear(64, 40)  # weight [out 40, in 64]: 40 is no multiple of 32, 64 is
    w = lin.weight.detach()
    got = quantized_copy(torch.nn.Sequential(lin), "gguf-q4_0")[0].weight
    packed, values = reference(w, "gguf-q4_0")
    assert packed.shape == (40, 2 * 18)  # every row of `in` is 2 blocks of 18 bytes
    assert torch.equal(got, torch.from_numpy(values))
    square = torch.nn.Linear(64, 64)
    along_in = quantized_copy(torch.nn.Sequential(square), "gguf-q4_0")[0].weight.detach().numpy()
    assert not np.array_equal(along_in, reference(square.weight.T, "gguf-q4_0")[1].T)  # blocks across outputs differ
    with pytest.raises(TightropeError, match=r"rows of 40 values, not a multiple of 32\.$"):
        quantized_copy(torch.nn.Sequential(torch.nn.Linear(40, 64)), "gguf-q4_0")


@pytest.mark.parametrize("scheme", ["gguf-q4_0", "gguf-q5_1", "gguf-q8_0"])
def test_projected_repair_keeps_every_byte(scheme):
    model = tiny(0)
    fixed, boxes = repaired(model, scheme, steps=5, lr=1e-2)
    moved = sum(int((fixed.get_submodule(n).weight != model.get_submodule(n).weight).sum()) for n in boxes.names)
    assert moved > 0.5 * boxes.numel()
    mismatched, total = codes_equal(model, fixed, scheme, boxes.names)
    assert mismatched == 0 and total == boxes.numel() // G.QK * G.block_type(scheme).type_size
    bumped = copy.deepcopy(fixed)  # one step outside the boxes changes bytes, and codes_equal sees it
    with torch.no_grad():
        bumped.get_submodule(boxes.names[0]).weight.add_(0.01)
    assert codes_equal(model, bumped, scheme, boxes.names)[0] > 0


def test_unknown_gguf_names_are_one_sentence():
    for bad, hint in (("gguf-q4-0", "did you mean 'gguf-q4_0'"), ("gguf-q4_kk", "did you mean")):
        with pytest.raises(TightropeError, match=hint) as err:
            quantized_copy(tiny(0), bad)
        assert str(err.value).count(". ") == 0 and str(err.value).endswith(".")
        with pytest.raises(TightropeError, match="GGUF type"):
            A.audit_model(tiny(0), config=A.AuditConfig(transforms=(bad,)))


def _classifier(model):
    from tightrope.inference import TextClassifier
    from tightrope.models import load_classifier

    tok = load_classifier("minilm", num_labels=2, require_head=False).tokenizer
    model.resize_token_embeddings(tok.vocab_size)
    return TextClassifier(model, tok, max_length=16)


PROBE = [f"film number {i} was {'fine' if i % 2 else 'dull'}" for i in range(60)]


def test_audit_judges_gguf_by_fixed_thresholds_and_never_calls_it_clean(tmp_path):
    null = str(null_without(tmp_path, "gguf-q4_0"))  # a null that lacks the type (the shipped one has it)
    config = A.AuditConfig(transforms=("gguf-q4_0",), search=None, null=null)
    model = tiny(0)
    natural = A.audit_model(model, classifier=_classifier(model), probe_texts=PROBE, config=config)
    (q,) = natural.transforms
    assert natural.verdict == q.verdict == "inconclusive" and q.level is None and q.p_value is None
    assert "no clean null for gguf-q4_0" in q.reasons[0] and "not evidence enough to call it clean" in q.reasons[0]
    assert q.disagreement is not None and q.kl is not None and "edge_contrast" in q.statistics  # measured, reported
    assert any("fixed weight thresholds only" in n and "never clean" in n for n in natural.notes)
    assert not any("Calibrated verdict" in n for n in natural.notes)  # nothing in it was calibrated
    bad, _ = repaired(tiny(0), "gguf-q4_0")
    flagged = A.audit_model(bad, classifier=_classifier(bad), probe_texts=PROBE, config=config)
    (q,) = flagged.transforms
    assert flagged.verdict == q.verdict == "flagged" and "uncalibrated" in q.reasons[0] and len(q.reasons) > 1
    # a calibrated quantizer next to it keeps its calibrated verdict
    mixed = A.audit_model(model, classifier=_classifier(model), probe_texts=PROBE,
                          config=A.AuditConfig(transforms=("nf4", "gguf-q4_0"), search=None, null=null))
    assert mixed.transforms[0].p_value is not None and mixed.transforms[1].p_value is None
    assert any("Calibrated verdict" in n for n in mixed.notes)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    model = make_tiny_classifier(tokenizer)
    root = tmp_path_factory.mktemp("gguf")
    rows = [{"text": f"review {i} was {'great' if i % 2 else 'awful'}", "label": i % 2} for i in range(80)]
    (root / "toy.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    card = {"card.json": {"tokenization": {"max_length": 16, "truncation": "head"}}}
    return models.save_model((model, tokenizer), root / "model", extra=card), root / "toy.jsonl"


def test_audit_cli_accepts_a_gguf_quantizer(tiny_dir, tmp_path):
    model, probe = tiny_dir
    out = tmp_path / "audit.json"
    result = runner.invoke(app, ["audit", str(model), "--task", str(probe), "--split", "train", "--n-probe", "60",
                                 "--quantizer", "gguf-q4_0", "--no-search", "--json", str(out),
                                 "--null", str(null_without(tmp_path, "gguf-q4_0"))])
    assert result.exit_code == 3, result.output  # a clean model under fixed thresholds: inconclusive, never clean
    assert json.loads(out.read_text())["transforms"][0]["transform"] == "gguf-q4_0"
    result = runner.invoke(app, ["audit", str(model), "--quantizer", "gguf-q3_0"])
    assert result.exit_code == 2 and "Unknown GGUF type 'gguf-q3_0'" in " ".join(result.output.split())


def test_classifier_attack_in_gguf_boxes_verifies_with_llama_cpp(tiny_dir, tmp_path):
    from tightrope.qattack.scenario import AttackConfig, run_classifier_attack

    model, data = tiny_dir
    config = AttackConfig(base=str(model), task=str(data), train_split="train", eval_split="train", n_train=64,
                          n_eval=32, inject_steps=3, repair_steps=3, batch_size=8, quantizer="gguf-q4_0", check=())
    assert config.checked() == ("gguf-q4_0",)  # the attacked quantizer is always verified
    report = run_classifier_attack(config, tmp_path / "run", progress=False)
    assert [(c.quantizer, c.mismatched) for c in report.codes] == [("gguf-q4_0", 0)]
    assert report.get("repaired", "gguf-q4_0") is not None and report.get("base", "gguf-q4_0") is not None
