"""Embedding-space FGSM / PGD: properties that can fail."""

from __future__ import annotations

import pytest
import torch

from conftest import NEGATIVE, POSITIVE, make_tiny_classifier
from tightrope.attacks.embedding import (
    EmbeddingAttack,
    accuracy_under_attack,
    ascent_direction,
    perturb,
    project,
    random_start,
)
from tightrope.errors import TightropeError


def _batch(tokenizer, texts):
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def _per_example_l2(x):
    return x.flatten(1).norm(dim=1)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_projection_lands_in_the_ball_and_keeps_inside_points(norm):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 5, 3, generator=g) * 10
    p = project(x, 0.5, norm)
    size = p.abs().amax(dim=(1, 2)) if norm == "linf" else _per_example_l2(p)
    assert (size <= 0.5 + 1e-6).all()
    small = x * 1e-3
    assert torch.equal(project(small, 0.5, norm), small)


def test_ascent_direction_has_unit_size():
    grad = torch.randn(3, 4, 5)
    assert torch.equal(ascent_direction(grad, "linf"), grad.sign())
    assert torch.allclose(_per_example_l2(ascent_direction(grad, "l2")), torch.ones(3))


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_random_start_is_inside_the_ball_and_zero_on_padding(norm):
    mask = torch.ones(2, 6, 1)
    mask[1, 4:] = 0
    d = random_start(torch.Size((2, 6, 8)), 0.1, norm, mask, torch.Generator().manual_seed(1))
    assert (d[1, 4:] == 0).all()
    size = d.abs().amax(dim=(1, 2)) if norm == "linf" else _per_example_l2(d)
    assert (size <= 0.1 + 1e-6).all() and (size > 0).all()


@pytest.mark.parametrize("norm,eps", [("linf", 0.05), ("l2", 0.5)])
def test_pgd_never_leaves_its_ball_and_never_touches_padding(tokenizer, norm, eps):
    model = make_tiny_classifier(tokenizer)
    ids, mask = _batch(tokenizer, POSITIVE[:3] + NEGATIVE[:3])
    labels = torch.tensor([1, 1, 1, 0, 0, 0])
    # A step far larger than the ball: every iterate must be projected back.
    attack = EmbeddingAttack(epsilon=eps, steps=5, step_size=eps * 3, norm=norm)
    out = perturb(model, ids, mask, labels, attack, generator=torch.Generator().manual_seed(0), track=True)
    for delta in (out.delta, out.best):
        size = delta.abs().amax(dim=(1, 2)) if norm == "linf" else _per_example_l2(delta)
        assert (size <= eps * (1 + 1e-5)).all()
        assert (delta[mask == 0] == 0).all()
    assert all(p.grad is None for p in model.parameters())  # an attack never writes parameter gradients


def test_pgd_raises_the_loss_more_than_random_noise(tokenizer):
    model = make_tiny_classifier(tokenizer)
    ids, mask = _batch(tokenizer, POSITIVE + NEGATIVE)
    labels = torch.tensor([1] * 6 + [0] * 6)
    emb = model.get_input_embeddings()(ids).detach()
    attack = EmbeddingAttack(epsilon=0.5, steps=10, norm="linf")
    out = perturb(model, ids, mask, labels, attack, generator=torch.Generator().manual_seed(0))
    noise = random_start(emb.shape, 0.5, "linf", mask.unsqueeze(-1).float(), torch.Generator().manual_seed(0))

    def loss(d):
        logits = model(inputs_embeds=emb + d, attention_mask=mask).logits
        return torch.nn.functional.cross_entropy(logits, labels).item()

    assert loss(out.delta) > loss(noise) and loss(out.delta) > loss(torch.zeros_like(emb))


def _tiny_target(tokenizer):
    return make_tiny_classifier(tokenizer, seed=1), tokenizer, 32


def test_accuracy_under_attack_is_at_most_clean_and_falls_with_epsilon(tokenizer):
    texts, labels = POSITIVE + NEGATIVE, [1] * 6 + [0] * 6
    report = accuracy_under_attack(_tiny_target(tokenizer), texts, labels, [0.01, 0.1, 1.0],
                                   EmbeddingAttack(epsilon=0.01, steps=5), batch_size=5, progress=False)
    accs = [p.accuracy_under_attack for p in report.points]
    assert all(a <= report.original_accuracy for a in accs)
    assert accs[-1] <= accs[0]
    for p in report.points:
        assert p.succeeded + p.failed + p.skipped == len(texts)
        assert p.skipped == round((1 - report.original_accuracy) * len(texts))
    assert report.points[-1].attack_success_rate > 0  # a huge ball fools a random tiny model


def test_fixed_seed_gives_identical_results(tokenizer):
    texts, labels = POSITIVE + NEGATIVE, [1] * 6 + [0] * 6
    target = _tiny_target(tokenizer)
    attack = EmbeddingAttack(epsilon=0.2, steps=3, norm="l2", seed=7)
    a = accuracy_under_attack(target, texts, labels, [0.2, 0.5], attack, batch_size=4, progress=False)
    b = accuracy_under_attack(target, texts, labels, [0.2, 0.5], attack, batch_size=4, progress=False)
    assert a.points == b.points
    model, _, _ = target
    ids, mask = _batch(tokenizer, texts)
    y = torch.tensor(labels)
    d1 = perturb(model, ids, mask, y, attack, generator=torch.Generator().manual_seed(3)).delta
    d2 = perturb(model, ids, mask, y, attack, generator=torch.Generator().manual_seed(3)).delta
    assert torch.equal(d1, d2)


def test_fgsm_and_fast_presets_follow_their_papers():
    fgsm = EmbeddingAttack.fgsm(0.1)
    assert (fgsm.steps, fgsm.alpha, fgsm.random_start, fgsm.name) == (1, 0.1, False, "FGSM")
    fast = EmbeddingAttack.fast(0.1)
    assert fast.alpha == pytest.approx(0.125) and fast.random_start
    assert EmbeddingAttack(epsilon=0.1, steps=10).alpha == pytest.approx(0.025)


@pytest.mark.parametrize("kwargs,match", [
    (dict(epsilon=0.0), "epsilon is 0"),
    (dict(epsilon=-1.0), "positive"),
    (dict(epsilon=0.1, steps=0), "at least one step"),
    (dict(epsilon=0.1, norm="l1"), "norm"),
    (dict(epsilon=0.1, step_size=0.0), "step_size"),
])
def test_bad_attack_settings_are_one_clear_sentence(kwargs, match):
    with pytest.raises(TightropeError, match=match):
        EmbeddingAttack(**kwargs)


def test_bad_evaluation_input(tokenizer):
    target = _tiny_target(tokenizer)
    with pytest.raises(TightropeError, match="empty"):
        accuracy_under_attack(target, [], [], [0.1], progress=False)
    with pytest.raises(TightropeError, match="outside"):
        accuracy_under_attack(target, ["good"], [5], [0.1], progress=False)
    with pytest.raises(TightropeError, match="epsilon is 0"):
        accuracy_under_attack(target, ["good"], [1], [0.1, 0.0], progress=False)
    with pytest.raises(TightropeError, match="no input embeddings"):
        accuracy_under_attack((torch.nn.Linear(2, 2), tokenizer, 16), ["good"], [1], [0.1], progress=False)


@pytest.mark.slow
def test_pgd_on_the_real_minilm_respects_ball_and_bounds(data_dir):
    from tightrope import models
    from tightrope.data import load_task

    data = load_task("textfooler-imdb", "test", data_dir=data_dir, n=6, seed=0)
    loaded = models.load_classifier("minilm", label_names=list(data.label_names), require_head=False)
    target = (loaded.model, loaded.tokenizer, 64)
    attack = EmbeddingAttack(epsilon=0.01, steps=2, seed=0)
    report = accuracy_under_attack(target, data.texts, data.labels, [0.01, 0.05], attack, batch_size=6, progress=False)
    assert all(p.accuracy_under_attack <= report.original_accuracy for p in report.points)
    for p in report.points:
        assert p.succeeded + p.failed + p.skipped == 6
