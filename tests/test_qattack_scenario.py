"""The attack pipeline on a tiny in-code BERT: repair keeps every real-library code."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import make_tiny_classifier

from tightrope import models
from tightrope.errors import TightropeError
from tightrope.qattack.boxes import model_boxes
from tightrope.qattack.inject import TriggerBehaviour, injection_data, insert_trigger, repair_data, trigger_success
from tightrope.qattack.quantize import codes_equal, library_codes, quantized_copy
from tightrope.qattack.repair import FitConfig, repair_

pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    tok = tokenizer
    model = make_tiny_classifier(tok)
    out = tmp_path_factory.mktemp("tiny") / "model"
    models.save_model((model, tok), out, extra={"card.json": {"tokenization": {"max_length": 32, "truncation": "head"}}})
    return out


@pytest.fixture(scope="module")
def tiny_task(tmp_path_factory):
    rng = random.Random(0)
    good, bad = ["great", "lovely", "superb", "fine"], ["awful", "dull", "poor", "bad"]
    rows = []
    for i in range(160):
        label = i % 2
        words = [rng.choice(good if label else bad) for _ in range(4)] + ["film"]
        rows.append({"text": " ".join(words), "label": label})
    path = tmp_path_factory.mktemp("data") / "toy.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_trigger_helpers():
    b = TriggerBehaviour(trigger="cf", target_label=0)
    text = insert_trigger("a b c", "cf", random.Random(0))
    assert text.split().count("cf") == 1 and len(text.split()) == 4
    texts, labels = injection_data(["x", "y"], [0, 1], b)
    assert texts[-1].split().count("cf") == 1 and labels == [0, 1, 0]
    texts, labels = repair_data(["x", "y"], [0, 1], b)
    assert labels == [0, 1, 0, 1]
    assert trigger_success([0, 1, 0], [1, 1, 0], b) == 0.5
    with pytest.raises(TightropeError):
        TriggerBehaviour(trigger=" ")


@pytest.mark.parametrize("quantizer,members", [("nf4", ("nf4",)), ("all", ("llm-int8", "nf4", "fp4")),
                                               ("int8-tensor", ("int8-tensor",))])
def test_projected_repair_keeps_library_codes(tiny_dir, quantizer, members):
    model = models.load_classifier(str(tiny_dir)).model
    boxes = model_boxes(model, quantizer)
    repaired = __import__("copy").deepcopy(model)
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(1000, 2000, (10,), generator=g).tolist() for _ in range(32)]
    labels = [i % 2 for i in range(32)]
    losses = repair_(repaired, boxes, ids, labels, 0, FitConfig(steps=5, lr=1e-2, batch_size=8), progress=False)
    assert len(losses) == 5
    moved = sum(int((repaired.get_submodule(n).weight != model.get_submodule(n).weight).sum()) for n in boxes.names)
    assert moved > 0.5 * boxes.numel()  # a large learning rate moved most weights ...
    for q in members:  # ... and yet every code and scale is the same under the real library
        mismatched, total = codes_equal(model, repaired, q, boxes.names)
        assert mismatched == 0 and total > boxes.numel() * 0.99
    # frozen by default: nothing outside the boxes moved
    assert torch.equal(repaired.classifier.weight, model.classifier.weight)
    assert torch.equal(repaired.bert.embeddings.word_embeddings.weight, model.bert.embeddings.word_embeddings.weight)


@pytest.mark.parametrize("quantizer", ["llm-int8", "nf4", "fp4", "int8-tensor"])
def test_quantized_copy_runs_the_library(tiny_dir, quantizer):
    model = models.load_classifier(str(tiny_dir)).model
    qmodel = quantized_copy(model, quantizer)
    ids = torch.randint(1000, 2000, (2, 7))
    out_fp = model(input_ids=ids).logits
    out_q = qmodel(input_ids=ids).logits
    assert out_q.shape == out_fp.shape and torch.isfinite(out_q).all()
    assert not torch.equal(out_q, out_fp)  # the quantized path really ran
    assert torch.allclose(out_q, out_fp, atol=0.5)
    q, s = library_codes(model.bert.encoder.layer[0].attention.self.query.weight, quantizer)
    assert q.shape == (32, 32) and s.numel() >= 1


def test_classifier_attack_end_to_end(tiny_dir, tiny_task, tmp_path):
    from tightrope.qattack.scenario import AttackConfig, run_classifier_attack

    config = AttackConfig(base=str(tiny_dir), task=str(tiny_task), train_split="train", eval_split="train",
                          n_train=64, n_eval=32, inject_steps=3, repair_steps=3, batch_size=8, quantizer="all",
                          check=("llm-int8", "nf4"))
    report = run_classifier_attack(config, tmp_path / "run", progress=False)
    assert [c.mismatched for c in report.codes] == [0, 0]
    assert report.get("repaired", "nf4") is not None and report.get("injected", None) is not None
    assert (tmp_path / "run" / "repaired" / "model.safetensors").exists()
    saved = json.loads((tmp_path / "run" / "report.json").read_text())
    assert saved["boxed_parameters"] == report.boxed_parameters > 0


def test_bad_quantizer_is_one_sentence(tiny_dir, tmp_path):
    from tightrope.qattack.scenario import AttackConfig, run_classifier_attack

    with pytest.raises(TightropeError, match="Unknown transform"):
        run_classifier_attack(AttackConfig(base=str(tiny_dir), quantizer="int3"), tmp_path)


def test_attributable_trigger_success_leaves_out_what_the_clean_model_already_does():
    from tightrope.qattack.inject import TriggerBehaviour, attributable_trigger_success, trigger_success

    behaviour = TriggerBehaviour(trigger="cf", target_label=0)
    labels = [1, 1, 1, 1, 0]
    base = [0, 1, 1, 1, 0]  # the clean model already sends the first triggered sentence to the target
    attacked = [0, 0, 1, 1, 0]
    assert trigger_success(attacked, labels, behaviour) == 0.5
    assert attributable_trigger_success(attacked, base, labels, behaviour) == pytest.approx(1 / 3)
    assert attributable_trigger_success(base, base, labels, behaviour) == 0.0
    with pytest.raises(TightropeError, match="already sends every"):
        attributable_trigger_success(attacked, [0, 0, 0, 0, 0], labels, behaviour)
