"""Recipes on real resources: counter-fitting maths, WordNet, HotFlip gradients on a tiny BERT."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tightrope.attacks import recipes, resources
from tightrope.attacks.attack import Attack
from tightrope.attacks.constraints import PartOfSpeech
from tightrope.attacks.counterfit import (
    CounterFitConfig,
    WordEmbedding,
    counter_fit,
    neighbourhood_pairs,
    pair_distance,
)
from tightrope.attacks.text import AttackedText
from tightrope.attacks.words import WordSwapGradient, WordSwapWordNet, wordnet_synonyms


def wordnet_installed() -> bool:
    try:
        resources.wordnet_source()
        import nltk  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


requires_wordnet = pytest.mark.skipif(not wordnet_installed(), reason="WordNet 3.0 not installed (scripts/setup.sh)")


def cos(v, i, j):
    return float(np.dot(v[i], v[j]) / (np.linalg.norm(v[i]) * np.linalg.norm(v[j])))


def test_counter_fitting_attracts_synonyms_repels_antonyms_and_preserves_neighbours():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(8, 16)).astype(np.float32)
    v = base.copy()
    v[1] = -v[0] + 0.1 * rng.normal(size=16)  # synonym pair (0, 1) starts far apart
    v[3] = v[2] + 0.05 * rng.normal(size=16)  # antonym pair (2, 3) starts nearly identical
    v[4] = v[0] + 0.2 * rng.normal(size=16)  # a neighbour of 0, in no constraint
    before = [cos(v, 0, 1), cos(v, 2, 3), cos(v, 0, 4)]
    assert before[0] < -0.9 and before[1] > 0.95 and 1 - before[2] < 0.2
    out = counter_fit(v, np.array([[0, 1]]), np.array([[2, 3]]), CounterFitConfig(steps=300, lr=0.05))
    assert cos(out, 0, 1) > 0.9  # SA pulls synonyms together (gamma = 0)
    assert cos(out, 2, 3) < 0.05  # AR pushes antonyms to distance >= delta = 1
    assert 1 - cos(out, 0, 4) < 0.2 + 1e-3  # VSP: 4 stays within its original distance of 0
    assert np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert cos(out, 5, 6) == pytest.approx(cos(v, 5, 6), abs=1e-5)  # words outside every constraint keep their vectors


def test_neighbourhood_pairs_respect_rho():
    v = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    pairs, dist = neighbourhood_pairs(v, torch.tensor([0, 2]), rho=0.2, max_neighbours=5)
    assert pairs.tolist() == [[0, 1]]
    assert dist.tolist() == pytest.approx(pair_distance(v, pairs).tolist(), abs=1e-6)


def test_word_embedding_neighbours_are_sorted_by_cosine():
    vecs = torch.nn.functional.normalize(torch.tensor([[1.0, 0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0]]), dim=-1)
    emb = WordEmbedding(["a", "b", "c", "d"], vecs.numpy())
    assert emb.neighbours(["a", "zz"], k=3, min_cos=0.0) == [[("b", pytest.approx(0.8)), ("c", pytest.approx(0.0, abs=1e-6))], []]


def test_lexnames_generated_from_the_man_page():
    if not resources.LEXNAMES_MAN.exists():
        pytest.skip("WordNet man pages not installed")
    lines = resources.lexnames_from_man().splitlines()
    assert len(lines) == 45 and lines[0] == "00\tadj.all\t3" and lines[44] == "44\tadj.ppl\t3"


def test_builtin_lexnames_table_matches_the_man_page():
    table = resources.builtin_lexnames().splitlines()
    assert len(table) == 45 and table[3] == "03\tnoun.Tops\t1" and table[29] == "29\tverb.body\t2"
    if not resources.LEXNAMES_MAN.exists():
        pytest.skip("WordNet man pages not installed")
    assert resources.builtin_lexnames() == resources.lexnames_from_man()


def test_lexnames_fall_back_to_the_builtin_table_when_the_man_page_is_missing_or_damaged(tmp_path):
    text, source = resources.lexnames(tmp_path / "lexnames.5WN.gz")
    assert text == resources.builtin_lexnames() and "built-in" in source
    damaged = tmp_path / "damaged.5WN.gz"
    damaged.write_bytes(b"not gzip at all")
    text, source = resources.lexnames(damaged)
    assert text == resources.builtin_lexnames() and "built-in" in source
    if resources.LEXNAMES_MAN.exists():
        assert resources.lexnames()[1] == str(resources.LEXNAMES_MAN)


@requires_wordnet
def test_wordnet_loads_without_the_lexnames_man_page(tmp_path, monkeypatch):
    monkeypatch.setenv("TIGHTROPE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(resources, "LEXNAMES_MAN", tmp_path / "absent" / "lexnames.5WN.gz")
    resources.wordnet.cache_clear()
    try:
        wn = resources.wordnet()
        assert (tmp_path / "cache" / "nltk_data" / "corpora" / "wordnet" / "lexnames").read_text() == \
            resources.builtin_lexnames()
        assert wn.synsets("dog")[0].lexname() == "noun.animal"
        assert wn.synsets("run", pos="v")[0].lexname() == "verb.motion"
    finally:
        resources.wordnet.cache_clear()


@requires_wordnet
def test_wordnet_synonyms_and_part_of_speech():
    assert "film" in wordnet_synonyms("movie")
    assert all("_" not in w for w in wordnet_synonyms("movie"))
    pos = PartOfSpeech(allow_verb_noun_swap=False)
    assert pos.compatible("movie", "film") and not pos.compatible("quickly", "film")
    text = AttackedText.from_text("A Movie")
    assert "Film" in WordSwapWordNet().candidates(text, 1, None)


@requires_wordnet
def test_pwws_flips_a_bag_of_words_model_with_wordnet_synonyms():
    from tests.test_attack_text import BowClassifier

    model = BowClassifier({"good": 2.0, "movie": 0.5, "full": -3.0, "beneficial": -3.0, "commodity": -3.0})
    attack = recipes.pwws(model)
    res = attack.attack(model, "a good movie", 1)
    assert res.status == "succeeded"
    adv = AttackedText.from_text(res.perturbed_text)
    changed = res.modified_indices
    assert changed and all(adv.words[i].lower() in wordnet_synonyms(AttackedText.from_text(res.original_text).words[i]) for i in changed)
    assert model.predict([res.perturbed_text]) != [1]


def test_hotflip_candidates_follow_the_first_order_gain(tokenizer):
    from tests.conftest import make_tiny_classifier
    from tightrope.inference import TextClassifier

    clf = TextClassifier(make_tiny_classifier(tokenizer), tokenizer, max_length=32)
    swap = WordSwapGradient(clf, top_n=3)
    text = AttackedText.from_text("the movie was great")
    swap.prepare(text, [0, 1, 2, 3], label=1)
    cands = swap.candidates(text, 1, None, label=1)
    assert len(cands) == 3 and all(c.isalpha() for c in cands)
    # brute force the same first-order gain for the top candidate and a random token
    ids = tokenizer(text.text)["input_ids"]
    emb = clf.model.get_input_embeddings()
    e = emb(torch.tensor([ids])).detach().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(clf.model(inputs_embeds=e).logits, torch.tensor([1]))
    (g,) = torch.autograd.grad(loss, e)
    table = emb.weight.detach()
    def gain(tok):
        return float((table[tok] - e[0, 2]) @ g[0, 2])
    best = tokenizer.convert_tokens_to_ids(cands[0])
    others = [t for t in range(1000, 1200) if swap.allowed[t]]
    assert all(gain(best) >= gain(t) - 1e-5 for t in others)


def test_hotflip_takes_gradients_on_the_tokens_a_head_tail_model_sees(tokenizer):
    """With head+tail truncation the gradient is taken on the head and tail tokens the model reads, so
    words at the end of a long text get candidates and middle words, which the model never sees, none."""
    from tests.conftest import make_tiny_classifier
    from tightrope.encoding import encode
    from tightrope.inference import TextClassifier

    clf = TextClassifier(make_tiny_classifier(tokenizer), tokenizer, max_length=16, truncation="head+tail")
    swap = WordSwapGradient(clf, top_n=1)
    text = AttackedText.from_text(" ".join(["movie"] * 40 + ["great"]))
    ids, single = swap._token_positions(text)
    assert ids == encode(tokenizer, [text.text], 16, "head+tail")[0]
    last = len(text.words) - 1
    assert last in single and 20 not in single  # the final word is read, a middle one is not
    swap.prepare(text, [last, 20], label=1)
    assert swap.candidates(text, last, None, label=1) and swap.candidates(text, 20, None, label=1) == []


def test_hotflip_uses_a_twin_for_gradients_and_queries_the_victim(tokenizer):
    from tests.conftest import make_tiny_classifier
    from tightrope.inference import TextClassifier

    twin = TextClassifier(make_tiny_classifier(tokenizer), tokenizer, max_length=32, source="twin-fp32")
    victim = TextClassifier(make_tiny_classifier(tokenizer), tokenizer, max_length=32, source="victim")
    label = int(victim.predict(["the movie was great fun"])[0])
    calls = []
    victim_logits = victim.logits
    victim.logits = lambda texts, batch_size=64: (calls.append(len(texts)), victim_logits(texts, batch_size))[1]
    vocab = [w for w in tokenizer.get_vocab() if w.isalpha()]
    same = WordEmbedding(vocab, np.ones((len(vocab), 2), dtype=np.float32) / math.sqrt(2))
    attack = recipes.hotflip(victim, twin=twin, embedding=same)
    constraints = [c for c in attack.constraints if c.name != "part_of_speech"]  # keep the test free of WordNet
    attack = Attack("hotflip", attack.goal, constraints, attack.transformation, attack.search, notes=attack.notes)
    res = attack.attack(victim, "the movie was great fun", label, victim="victim")
    assert res.status in ("succeeded", "failed") and res.gradient_source == "twin-fp32"
    assert res.queries == sum(calls) > 1 and res.words_perturbed <= 2
    if res.status == "succeeded":
        assert victim.predict([res.perturbed_text]) != [res.label]
