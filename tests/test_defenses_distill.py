"""The seed's a * CE + (1 - a) * KD loss, and a teacher that is never updated."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import NEGATIVE, POSITIVE, make_tiny_classifier
from tightrope.defenses.distill import Distillation, distillation_loss, kd_loss, label_permutation
from tightrope.errors import TightropeError
from tightrope.inference import TextClassifier


def test_kd_loss_equals_its_formula_on_hand_computed_tensors():
    student = torch.tensor([[0.0, 0.0]])
    # softmax(teacher / T) = (3/4, 1/4) at T = 1 and at T = 2 (logits doubled).
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert kd_loss(student, torch.tensor([[math.log(3.0), 0.0]]), 1.0).item() == pytest.approx(kl, rel=1e-6)
    assert kd_loss(student, torch.tensor([[2 * math.log(3.0), 0.0]]), 2.0).item() == pytest.approx(4 * kl, rel=1e-6)
    # Batch mean: a second, identical-distribution row leaves it unchanged.
    two = kd_loss(student.repeat(2, 1), torch.tensor([[math.log(3.0), 0.0]] * 2), 1.0)
    assert two.item() == pytest.approx(kl, rel=1e-6)
    assert kd_loss(student, student, 3.0).item() == pytest.approx(0.0, abs=1e-7)


def test_distillation_loss_is_the_weighted_sum():
    student, teacher = torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]])
    labels = torch.tensor([0])
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    got = distillation_loss(student, teacher, labels, a=0.3, temperature=1.0).item()
    assert got == pytest.approx(0.3 * math.log(2.0) + 0.7 * kl, rel=1e-6)
    assert distillation_loss(student, teacher, labels, a=1.0, temperature=1.0).item() == pytest.approx(math.log(2))


def test_label_sets_are_checked_and_reordered():
    assert label_permutation(["negative", "positive"], ["negative", "positive"]) is None
    assert label_permutation(["negative", "positive"], ["POSITIVE", "negative"]) == [1, 0]
    with pytest.raises(TightropeError, match="same label set"):
        label_permutation(["negative", "positive"], ["world", "sports"])


def _teacher(tokenizer, labels=("negative", "positive"), seed=5):
    model = make_tiny_classifier(tokenizer, num_labels=len(labels), seed=seed)
    return TextClassifier(model, tokenizer, max_length=32, label_names=list(labels))


def test_bad_distillation_settings(tokenizer):
    teacher = _teacher(tokenizer)
    with pytest.raises(TightropeError, match=r"\[0, 1\]"):
        Distillation(teacher, a=1.5)
    with pytest.raises(TightropeError, match="temperature"):
        Distillation(teacher, a=0.5, temperature=0.0)
    with pytest.warns(UserWarning, match="teacher is ignored"):
        Distillation(teacher, a=1.0)
    with pytest.raises(TightropeError, match="same label set"):
        Distillation(_teacher(tokenizer, labels=("a", "b", "c")), student_labels=["negative", "positive"])


def test_teacher_reads_texts_with_its_own_tokenizer_and_columns_follow_the_student(tokenizer):
    teacher = _teacher(tokenizer, labels=("positive", "negative"))
    crit = Distillation(teacher, a=0.0, temperature=1.0, student_labels=["negative", "positive"])
    texts = POSITIVE[:2] + NEGATIVE[:2]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    batch = {"input_ids": enc["input_ids"][:, :3], "attention_mask": enc["attention_mask"][:, :3],
             "labels": torch.tensor([1, 1, 0, 0]), "texts": texts}
    t = crit.teacher_logits(batch)
    assert torch.allclose(t, teacher.logits(texts)[:, [1, 0]])
    assert crit.teacher_logits(batch) is t  # once per batch
    # a = 0: the loss is the KD term alone, zero when the student equals the (reordered) teacher.
    assert crit(t.clone(), batch).item() == pytest.approx(0.0, abs=1e-6)
    del batch["texts"]
    with pytest.raises(TightropeError, match="raw texts"):
        Distillation(teacher, a=0.5, student_labels=["negative", "positive"]).teacher_logits(batch)


def test_teacher_is_never_updated_by_training(tiny_model_dir, tiny_task, tmp_path, tokenizer):
    from tightrope.train import TrainConfig, train

    teacher = _teacher(tokenizer)
    teacher.model.train()
    before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    crit = Distillation(teacher, a=0.5, temperature=2.0, student_labels=["negative", "positive"])
    seen = []

    def objective(model, batch):
        assert "texts" in batch and len(batch["texts"]) == len(batch["labels"])
        seen.append(len(batch["texts"]))
        return crit(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch)

    config = TrainConfig(model=str(tiny_model_dir), task=str(tiny_task), n_eval=8, max_length=16, batch_size=8,
                         epochs=1, lr=1e-2, seed=0)
    train(config, tmp_path / "student", objective=objective, progress=False)
    assert seen
    assert not teacher.model.training
    assert all(not p.requires_grad and p.grad is None for p in teacher.model.parameters())
    after = teacher.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
