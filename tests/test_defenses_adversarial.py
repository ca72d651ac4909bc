"""Adversarial-training objectives: each trains, each costs what it claims, bad settings fail loudly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import NEGATIVE, POSITIVE, make_tiny_classifier
from tightrope.defenses.adversarial import FastAdversarial, FreeLB, PGDTraining
from tightrope.errors import TightropeError


def _batch(tokenizer):
    texts = POSITIVE[:4] + NEGATIVE[:4]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "labels": torch.tensor([1] * 4 + [0] * 4), "texts": texts}


def _clean_loss(model, batch):
    return F.cross_entropy(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                           batch["labels"]).item()


@pytest.mark.parametrize("make", [
    lambda: PGDTraining(epsilon=0.5, steps=3),
    lambda: PGDTraining(epsilon=0.5, steps=2, norm="l2", mix=0.5),
    lambda: FastAdversarial(epsilon=0.5),
    lambda: FastAdversarial(epsilon=0.5, mix=0.5),
    lambda: FreeLB(epsilon=1.0, steps=3, step_size=0.5),
], ids=["pgd", "pgd-l2-mix", "fast", "fast-mix", "freelb"])
def test_each_defense_gives_a_finite_loss_with_gradients_for_every_layer(tokenizer, make):
    torch.manual_seed(0)
    model = make_tiny_classifier(tokenizer)  # eval mode: no dropout, so losses compare exactly
    batch = _batch(tokenizer)
    loss = make()(model, batch)
    assert torch.isfinite(loss)
    loss.backward()
    assert model.get_input_embeddings().weight.grad is not None
    assert model.classifier.weight.grad.abs().sum() > 0


def test_adversarial_loss_exceeds_clean_loss(tokenizer):
    torch.manual_seed(0)
    model = make_tiny_classifier(tokenizer)
    batch = _batch(tokenizer)
    clean = _clean_loss(model, batch)
    assert PGDTraining(epsilon=0.5, steps=3)(model, batch).item() > clean
    assert FastAdversarial(epsilon=0.5)(model, batch).item() > clean


def test_freelb_with_one_step_and_no_init_is_clean_training(tokenizer):
    model = make_tiny_classifier(tokenizer)
    batch = _batch(tokenizer)
    loss = FreeLB(epsilon=1.0, steps=1, init_magnitude=0.0)(model, batch)
    assert loss.item() == pytest.approx(_clean_loss(model, batch), rel=1e-5)


def test_freelb_accumulates_the_gradients_of_all_its_steps(tokenizer):
    torch.manual_seed(0)
    model = make_tiny_classifier(tokenizer)
    batch = _batch(tokenizer)
    last = FreeLB(epsilon=1.0, steps=3, step_size=0.5)(model, batch)
    inner = model.classifier.weight.grad.clone()  # the first K - 1 terms, already accumulated
    assert inner.abs().sum() > 0
    last.backward()
    assert not torch.allclose(model.classifier.weight.grad, inner)


def test_a_defense_trains_through_the_training_loop(tiny_model_dir, tiny_task, tmp_path):
    from tightrope.train import TrainConfig, train

    config = TrainConfig(model=str(tiny_model_dir), task=str(tiny_task), n_eval=8, max_length=16, batch_size=8,
                         epochs=1, lr=1e-3, seed=0)
    card = train(config, tmp_path / "fast", objective=FastAdversarial(epsilon=0.01), progress=False)
    assert card["steps"] > 0 and card["metrics"]["best_validation_accuracy"] is not None


@pytest.mark.parametrize("make,match", [
    (lambda: PGDTraining(epsilon=0.0), "epsilon is 0"),
    (lambda: FastAdversarial(epsilon=0.0), "epsilon is 0"),
    (lambda: FreeLB(epsilon=0.0), "epsilon is 0"),
    (lambda: PGDTraining(epsilon=0.1, mix=0.0), "plain fine-tuning"),
    (lambda: PGDTraining(epsilon=0.1, mix=1.5), r"\[0, 1\]"),
    (lambda: PGDTraining(epsilon=0.1, steps=0), "at least one step"),
    (lambda: FreeLB(epsilon=0.1, init_magnitude=-1), "init_magnitude"),
])
def test_bad_defense_settings_are_one_clear_sentence(make, match):
    with pytest.raises(TightropeError, match=match):
        make()
