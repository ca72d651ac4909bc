"""A2T discrete adversarial training: allowed swaps only, budgets held, a loss that trains, a frozen teacher."""

from __future__ import annotations

import pytest
import torch
from conftest import NEGATIVE, POSITIVE, grouped_embedding, make_tiny_classifier

from tightrope.attacks.counterfit import WordEmbedding
from tightrope.attacks.text import AttackedText
from tightrope.defenses.a2t import A2TTraining, encode_with_offsets, word_tokens
from tightrope.defenses.distill import Distillation
from tightrope.encoding import encode
from tightrope.errors import TightropeError
from tightrope.inference import TextClassifier

# Synonym groups share a direction (cosine about 0.98 inside a group); groups are orthogonal.
GROUPS = [["wonderful", "marvelous", "superb", "great", "excellent", "brilliant", "warm"],
          ["dull", "boring", "tedious", "lifeless", "cold", "stupid", "poor"],
          ["terrible", "awful", "dreadful", "bad"],
          ["film", "movie", "picture"],
          ["acting", "performance"],
          ["script", "screenplay"],
          ["loved", "adored", "liked", "enjoyed"],
          ["hated", "despised", "loathed"],
          ["minute", "moment", "second"],
          ["mess", "disaster"],
          ["joy", "delight", "pleasure"]]
LONELY = ["watch", "direction"]  # in the vocabulary, but no neighbour within cosine 0.5


def _embedding() -> WordEmbedding:
    return grouped_embedding(GROUPS, LONELY)


def _batch(tokenizer, texts, labels):
    enc = tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "labels": torch.tensor(labels), "texts": list(texts)}


TEXTS = POSITIVE + NEGATIVE
LABELS = [1] * len(POSITIVE) + [0] * len(NEGATIVE)


def _allowed(embedding, stopwords, old: str, new: str, min_cos: float) -> bool:
    cos = embedding.cosine(old.lower(), new.lower())
    return old.lower() not in stopwords and cos is not None and cos >= min_cos and old.lower() != new.lower()


def _attacked_both_ways(tokenizer, embedding, **kwargs):
    """Attack every text under both labels, so that some attack has something to gain on a random model."""
    model = make_tiny_classifier(tokenizer, seed=1)
    a2t = A2TTraining(tokenizer, embedding, max_length=32, **kwargs)
    results = a2t.perturb(model, TEXTS + TEXTS, LABELS + [1 - y for y in LABELS])
    return a2t, results


def test_adversarial_texts_differ_only_at_allowed_positions_by_allowed_synonyms(tokenizer):
    embedding = _embedding()
    a2t, results = _attacked_both_ways(tokenizer, embedding, max_share=1.0, min_words=10, query_budget=1000)
    assert sum(bool(r.changed) for r in results) >= 4  # the attack does change texts
    for r in results:
        clean, adv = AttackedText.from_text(r.text), AttackedText.from_text(r.adversarial)
        assert clean.seps == adv.seps and len(clean) == len(adv)  # only words change, punctuation stays
        assert clean.diff(adv) == list(r.changed)
        for i in r.changed:
            assert _allowed(embedding, a2t.stopwords, clean.words[i], adv.words[i], a2t.min_cos), (clean.words[i], adv.words[i])
        if r.skipped:
            assert r.adversarial == r.text and r.queries == 0
        if r.changed:
            assert r.p_adversarial < r.p_clean
    # Stopwords ("a", "of", "and", "it", "every") and words without close neighbours ("watch") never change.
    for r in results:
        clean = AttackedText.from_text(r.text)
        for i in r.changed:
            assert clean.words[i].lower() not in {"a", "of", "and", "it", "every", "i", "to", "watch", "direction"}


def test_query_budget_and_word_cap_are_respected(tokenizer):
    embedding = _embedding()
    _, results = _attacked_both_ways(tokenizer, embedding, query_budget=3, max_share=0.1, min_words=1)
    for r in results:
        assert r.queries <= 3
        assert r.max_changes == 1 and len(r.changed) <= 1
    _, loose = _attacked_both_ways(tokenizer, embedding, query_budget=1000, max_share=1.0, min_words=10)
    assert max(r.queries for r in loose) > 3  # the budget above was binding
    a2t = A2TTraining(tokenizer, embedding, max_share=0.1, min_words=4)
    assert [a2t.max_changes(n) for n in (2, 10, 45, 200)] == [2, 4, 5, 20]


def test_words_past_the_truncation_window_are_never_changed(tokenizer):
    embedding = _embedding()
    model = make_tiny_classifier(tokenizer, seed=1)
    text = "a dull boring mess and a terrible awful script with bad acting in a tedious film"
    a2t = A2TTraining(tokenizer, embedding, max_length=8, max_share=1.0, min_words=20, query_budget=1000)
    results = a2t.perturb(model, [text, text], [0, 1])
    ids, spans = encode_with_offsets(tokenizer, [text], 8)
    seen = set(word_tokens(AttackedText.from_text(text), spans[0]))
    assert seen == {0, 1, 2, 3, 4, 5}  # 6 word pieces between [CLS] and [SEP]
    assert any(r.changed for r in results)
    assert all(set(r.changed) <= seen for r in results)


@pytest.mark.parametrize("truncation", ["head", "head+tail"])
def test_offsets_encoding_matches_the_training_encoding(tokenizer, truncation):
    texts = TEXTS + ["a very long review " * 20 + "that ends well, really well."]
    ids, spans = encode_with_offsets(tokenizer, texts, 16, truncation)
    assert ids == encode(tokenizer, texts, 16, truncation)
    assert all(len(s) == len(i) for s, i in zip(spans, ids))


def test_the_loss_is_finite_and_backpropagates(tokenizer):
    torch.manual_seed(0)
    model = make_tiny_classifier(tokenizer)
    model.train()
    a2t = A2TTraining(tokenizer, _embedding(), adv_share=0.5, mix=0.5, max_length=32)
    batch = _batch(tokenizer, TEXTS, LABELS)
    loss = a2t(model, batch)
    assert torch.isfinite(loss)
    assert model.training  # the attack ran in eval mode and restored training mode
    loss.backward()
    assert model.get_input_embeddings().weight.grad is not None
    assert model.classifier.weight.grad.abs().sum() > 0
    assert len(a2t.last) == len(TEXTS) // 2 and a2t.stats["attacked"] == len(TEXTS) // 2
    # mix = 1: adversarial texts only.
    pure = A2TTraining(tokenizer, _embedding(), adv_share=1.0, mix=1.0, max_length=32)(model, batch)
    assert torch.isfinite(pure)


def test_a_teacher_reads_the_adversarial_texts_and_is_never_updated(tokenizer):
    torch.manual_seed(0)
    teacher_model = make_tiny_classifier(tokenizer, seed=7)
    teacher = TextClassifier(teacher_model, tokenizer, max_length=32, label_names=["negative", "positive"])
    seen: list[list[str]] = []
    original_logits = teacher.logits
    teacher.logits = lambda texts, *a, **k: (seen.append(list(texts)), original_logits(texts, *a, **k))[1]
    before = {k: v.clone() for k, v in teacher_model.state_dict().items()}
    kd = Distillation(teacher, a=0.5, temperature=2.0, student_labels=["negative", "positive"])
    student = make_tiny_classifier(tokenizer, seed=1)
    student.train()
    a2t = A2TTraining(tokenizer, _embedding(), adv_share=1.0, mix=0.5, max_length=32, max_share=1.0,
                      min_words=10, query_budget=1000, criterion=kd)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
    batch = _batch(tokenizer, TEXTS, [1 - y for y in LABELS])  # wrong labels: the attack finds swaps easily
    for _ in range(2):
        loss = a2t(student, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    adversarial = [r.adversarial for r in a2t.last]
    assert any(r.changed for r in a2t.last)
    assert adversarial in seen and list(batch["texts"]) in seen  # the teacher read both, through its tokenizer
    assert all(not p.requires_grad and p.grad is None for p in teacher_model.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher_model.state_dict().items())


@pytest.mark.parametrize("kwargs,match", [
    ({"adv_share": 0.0}, "adv_share"),
    ({"mix": 0.0}, "plain fine-tuning"),
    ({"query_budget": 0}, "query_budget"),
    ({"max_share": 0.0}, "max_share"),
    ({"max_candidates": 0}, "max_candidates"),
    ({"min_cos": 2.0}, "min_cos"),
    ({"truncation": "tail"}, "truncation"),
])
def test_bad_a2t_settings_are_one_sentence(tokenizer, kwargs, match):
    with pytest.raises(TightropeError, match=match):
        A2TTraining(tokenizer, _embedding(), **kwargs)


def test_a_batch_without_texts_is_refused(tokenizer):
    model = make_tiny_classifier(tokenizer)
    batch = _batch(tokenizer, TEXTS, LABELS)
    del batch["texts"]
    with pytest.raises(TightropeError, match="raw texts"):
        A2TTraining(tokenizer, _embedding())(model, batch)


def test_a_study_file_can_name_a2t(tiny_model_dir, tokenizer):
    from tightrope.defenses.config import build_objective
    from tightrope.study.steps import defense_of

    config = defense_of({"method": "a2t", "params": {"query_budget": 5, "adv_share": 0.25}}, str(tiny_model_dir))
    objective = build_objective(config, student_labels=["negative", "positive"], student_tokenizer=tokenizer)
    assert isinstance(objective, A2TTraining)
    assert objective.query_budget == 5 and objective.tokenizer.pad_token_id is not None
    with pytest.raises(TightropeError, match="a2t defense: nonsense"):
        defense_of({"method": "a2t", "params": {"nonsense": 1}}, str(tiny_model_dir))


def test_wordnet_candidates_follow_the_counter_fitted_ones(tokenizer, monkeypatch):
    from tightrope.defenses import a2t as a2t_module

    monkeypatch.setattr(a2t_module, "wordnet_synonyms", lambda w: ("precipitous", "great", "ice-cold") if w == "wonderful" else ())
    plain = A2TTraining(tokenizer, _embedding(), max_candidates=3)
    both = A2TTraining(tokenizer, _embedding(), max_candidates=3, wordnet=True)
    assert "precipitous" not in plain.synonyms("wonderful")
    found = both.synonyms("Wonderful")
    assert found[:len(plain.synonyms("Wonderful"))] == plain.synonyms("Wonderful")  # counter-fitted first
    assert "Precipitous" in found and "Ice-cold" not in found  # single alphabetic words, in the word's case
    assert len(found) == len(set(w.lower() for w in found))  # "great" (in both sources) once


def test_an_input_transform_rewrites_what_the_attack_scores_and_rides_along(tokenizer):
    calls = []

    def transform(texts):  # an input transform that the model reads through: here, "great" -> "wonderful"
        calls.append(len(texts))
        return [t.replace("great", "wonderful") for t in texts]

    transform.card_entry = lambda: {"kind": "test"}
    model = make_tiny_classifier(tokenizer, seed=1)
    a2t = A2TTraining(tokenizer, _embedding(), max_length=32, max_share=1.0, min_words=10, query_budget=1000,
                      input_transform=transform)
    results = a2t.perturb(model, TEXTS + TEXTS, LABELS + [1 - y for y in LABELS])
    assert calls and sum(calls) > len(TEXTS) * 2  # the originals and every scored candidate went through it
    assert all("great" not in r.text for r in results)  # the attack ran on the rewritten text
    assert a2t.input_transform is transform and a2t.describe()["input_transform"] == {"kind": "test"}
    ids = a2t._ids(["a great film"], 32)
    assert ids == encode(tokenizer, ["a wonderful film"], 32, "head")
