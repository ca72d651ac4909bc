"""Synonym encoding (Wang et al. 2021) with word recognition (Pruthi et al. 2019): one representative per
synonym set, a transform that is part of the saved model and that every query goes through."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import grouped_embedding, make_tiny_classifier
from typer.testing import CliRunner

from tightrope import inference, models
from tightrope.attacks.counterfit import WordEmbedding
from tightrope.cli import app
from tightrope.defenses import canonical
from tightrope.defenses.canonical import SynonymEncoding, build, edits1, sem_encoding
from tightrope.errors import TightropeError

# Synonym sets share a direction (cosine about 0.98 inside a set); sets are orthogonal to each other.
SETS = [["wonderful", "marvelous", "superb", "great", "excellent", "brilliant"],
        ["dull", "boring", "tedious", "lifeless"],
        ["film", "movie", "picture"],
        ["acting", "performance"]]
LONELY = ["watch", "direction", "good"]
TEXTS = ["a wonderful film with great acting", "a dull movie , boring acting", "good direction , a superb picture",
         "tedious and lifeless , watch something else"]


def _embedding() -> WordEmbedding:
    return grouped_embedding(SETS, LONELY)


@pytest.fixture
def encoding() -> SynonymEncoding:
    return build(neighbours=10, min_cos=0.5, wordnet=False, spelling_vocab=100, embedding=_embedding())


def _save_defended(tokenizer, transform, out):
    model = make_tiny_classifier(tokenizer, seed=3)
    card = {"kind": "tightrope.model", "tokenization": {"max_length": 32, "truncation": "head"},
            **inference.transform_card(transform)}
    return models.save_model((model, tokenizer), out, extra={**inference.transform_files(transform), "card.json": card})


def test_every_member_of_a_synonym_set_maps_to_one_representative(encoding):
    reps = []
    for group in SETS:
        mapped = {encoding.canonical_word(w) for w in group}
        assert len(mapped) == 1, (group, mapped)
        (rep,) = mapped
        assert rep in group
        reps.append(rep)
    assert len(set(reps)) == len(SETS)  # distinct sets keep distinct representatives
    assert [encoding.canonical_word(w) for w in LONELY] == LONELY
    # Case is kept, and a text keeps its separators
    assert encoding.canonical_word("Movie") == encoding.canonical_word("film").capitalize()
    assert encoding(["a boring movie, really"]) == [f"a {encoding.canonical_word('dull')} "
                                                    f"{encoding.canonical_word('film')}, really"]


def test_sem_algorithm_gives_a_word_the_code_of_its_closest_encoded_synonym():
    near = {"good": ["fine", "nice"], "fine": ["good", "okay"], "okay": ["fine", "alright"], "bad": ["poor"],
            "alright": ["okay"]}
    code = sem_encoding(["good", "bad", "okay", "fine", "alright"], lambda w: near.get(w, []))
    assert code["good"] == code["fine"] == code["nice"] == "good"
    assert code["okay"] == "good"  # its closest encoded synonym, fine, carries good's code
    assert code["alright"] == "good" and code["bad"] == code["poor"] == "bad"


def test_word_recognition_undoes_one_character_edits(encoding):
    # DeepWordBug's four edits (swap, substitute, delete, insert) of words the recogniser knows
    for typo, word in [("flim", "film"), ("boxing", "boring"), ("dul", "dull"), ("superbb", "superb"),
                       ("acitng", "acting")]:
        assert typo in edits1(word)
        assert encoding.canonical_word(typo) == encoding.canonical_word(word), typo
    assert encoding.canonical_word("zzzzqq") == "zzzzqq"  # nothing within one edit: passed through
    off = SynonymEncoding(encoding.table, [], encoding.params)
    assert off.canonical_word("flim") == "flim"  # spelling_vocab 0: no recognition


def test_the_table_is_deterministic_and_json(encoding, tmp_path):
    again = build(neighbours=10, min_cos=0.5, wordnet=False, spelling_vocab=100, embedding=_embedding())
    assert again.to_json() == encoding.to_json() and again.digest() == encoding.digest()
    text = json.dumps(encoding.to_json())  # JSON, not pickle
    assert SynonymEncoding.from_json(json.loads(text)).table == encoding.table


def test_a_defended_model_saved_and_reloaded_predicts_the_same(tokenizer, encoding, tmp_path):
    model_dir = _save_defended(tokenizer, encoding, tmp_path / "defended")
    card = json.loads((model_dir / "card.json").read_text())
    assert card["input_transform"]["kind"] == "synonym-encoding" and (model_dir / canonical.FILE).exists()
    before = inference.TextClassifier(models.load_classifier(str(model_dir)).model, tokenizer, max_length=32,
                                      input_transform=encoding)
    clf = inference.load(str(model_dir))
    assert isinstance(clf.input_transform, SynonymEncoding) and clf.input_transform.table == encoding.table
    assert torch.allclose(clf.logits(TEXTS), before.logits(TEXTS), atol=1e-6)
    # the transform is applied by the reloaded model itself: a synonym swap changes nothing it sees
    assert torch.equal(clf.logits(["a wonderful film"]), clf.logits(["a brilliant movie"]))
    plain = inference.TextClassifier(clf.model, tokenizer, max_length=32)
    assert not torch.equal(plain.logits(["a wonderful film"]), plain.logits(["a brilliant movie"]))


def test_an_attack_on_a_defended_model_goes_through_the_defense(tokenizer, encoding, tmp_path):
    from tightrope.attacks import Attacker, recipes
    from tightrope.data import TaskData

    clf = inference.load(str(_save_defended(tokenizer, encoding, tmp_path / "defended")))
    transform = clf.input_transform
    data = TaskData("t", "test", TEXTS, [1, 0, 1, 0], ("negative", "positive"))
    calls, texts = transform.calls, transform.texts
    report = Attacker(recipes.build("deepwordbug", clf), out=tmp_path / "attack", seed=0).run(clf, data)
    assert transform.calls > calls
    assert transform.texts - texts >= report.examples  # every query went through the transform
    results = sorted((r for r in _results(tmp_path / "attack")), key=lambda r: r.index)
    for r in results:  # successes are judged on the pipeline: the defended model flips on the perturbed text
        if r.status == "succeeded":
            assert clf.predict([r.perturbed_text])[0] == r.perturbed_prediction != r.label


def _results(folder):
    from tightrope.attacks.attacker import read_results

    return [r for f in sorted(folder.glob("results*.jsonl")) for r in read_results(f)]


def test_a_randomized_attack_on_a_defended_model_is_deterministic_with_a_fixed_seed(tokenizer, encoding, tmp_path):
    from tightrope.attacks import Attacker, recipes
    from tightrope.data import TaskData

    data = TaskData("t", "test", TEXTS, [1, 0, 1, 0], ("negative", "positive"))
    runs = []
    for k in range(2):
        clf = inference.load(str(_save_defended(tokenizer, encoding, tmp_path / f"d{k}")))
        Attacker(recipes.build("deepwordbug", clf), out=tmp_path / f"a{k}", seed=7).run(clf, data)
        runs.append([(r.status, r.perturbed_text, r.queries) for r in sorted(_results(tmp_path / f"a{k}"), key=lambda r: r.index)])
    assert runs[0] == runs[1]


def test_a_defense_whose_table_is_missing_is_one_sentence(tokenizer, encoding, tmp_path):
    model_dir = _save_defended(tokenizer, encoding, tmp_path / "defended")
    (model_dir / canonical.FILE).unlink()
    with pytest.raises(TightropeError, match="synonym encoding, but its table input_transform.json is missing"):
        inference.load(str(model_dir))
    result = CliRunner().invoke(app, ["eval", str(model_dir), "--task", "rotten-tomatoes", "--n", "4", "--no-speed",
                                      "--no-memory"])
    assert result.exit_code == 2 and "missing" in result.output and "Traceback" not in result.output


def test_a_damaged_or_foreign_table_is_one_sentence(tokenizer, encoding, tmp_path):
    model_dir = _save_defended(tokenizer, encoding, tmp_path / "defended")
    (model_dir / canonical.FILE).write_text(json.dumps({**encoding.to_json(), "clusters": {"film": ["film", "dull"]}}))
    with pytest.raises(TightropeError, match="does not match"):
        inference.load(str(model_dir))
    card = json.loads((model_dir / "card.json").read_text())
    card["input_transform"]["kind"] = "smoothing"
    (model_dir / "card.json").write_text(json.dumps(card))
    with pytest.raises(TightropeError, match="does not know"):
        inference.load(str(model_dir))


@pytest.fixture
def fake_resources(monkeypatch):
    """``build`` from the hand-made vectors, so that the CLI and study paths need no GloVe or WordNet."""
    real = canonical.build

    def fake(neighbours=50, min_cos=0.5, wordnet=True, spelling_vocab=50_000, embedding=None, progress=None):
        return real(neighbours, min_cos, False, spelling_vocab, embedding=_embedding())

    monkeypatch.setattr(canonical, "build", fake)


def test_train_defense_canonical_saves_the_transform_and_compression_keeps_it(tiny_model_dir, tiny_task, tmp_path,
                                                                               fake_resources):
    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--model", str(tiny_model_dir), "--task", str(tiny_task), "--out", str(run),
                                      "--n-eval", "8", "--max-length", "16", "--batch-size", "8", "--lr", "1e-3",
                                      "--defense", "canonical", "--synonym-neighbours", "10", "--spelling-vocab", "100"])
    assert result.exit_code == 0, result.output
    card = json.loads((run / "card.json").read_text())
    assert card["defense"]["kind"] == "canonical" and card["defense"]["synonym_neighbours"] == 10
    assert card["input_transform"]["params"]["neighbours"] == 10 and (run / canonical.FILE).exists()
    clf = inference.load(str(run))
    assert clf.input_transform is not None
    assert clf.predict(["a wonderful film"]) == clf.predict(["a superb movie"])
    small = tmp_path / "int8"
    result = CliRunner().invoke(app, ["compress", str(run), "--quantize", "int8", "--out", str(small)])
    assert result.exit_code == 0, result.output
    assert json.loads((small / "card.json").read_text())["input_transform"] == card["input_transform"]
    assert inference.load(str(small)).input_transform.table == clf.input_transform.table

    # Pruning with recovery, and plain fine-tuning of the defended model, train through its transform and keep it.
    seen = []
    original = SynonymEncoding.__call__

    def counted(self, texts):
        seen.extend(texts)
        return original(self, texts)

    SynonymEncoding.__call__ = counted
    try:
        pruned = tmp_path / "s30"
        result = CliRunner().invoke(app, ["compress", str(run), "--prune", "structured:heads=0.25,ffn=0.25",
                                          "--recover-steps", "2", "--recover-task", str(tiny_task), "--out", str(pruned)])
        assert result.exit_code == 0, result.output
        assert "a wonderful, moving film" in seen  # the recovery's training texts went through the defense
        assert json.loads((pruned / "card.json").read_text())["input_transform"] == card["input_transform"]
        seen.clear()
        more = tmp_path / "more"
        result = CliRunner().invoke(app, ["train", "--model", str(run), "--task", str(tiny_task), "--out", str(more),
                                          "--n-eval", "8", "--max-length", "16", "--batch-size", "8", "--epochs", "1"])
        assert result.exit_code == 0, result.output
        assert "a wonderful, moving film" in seen
        assert json.loads((more / "card.json").read_text())["input_transform"] == card["input_transform"]
    finally:
        SynonymEncoding.__call__ = original


def test_a_study_file_can_name_the_canonical_defense(tiny_model_dir, fake_resources):
    from tightrope.defenses.config import build_objective
    from tightrope.study.steps import defense_of

    config = defense_of({"method": "canonical", "params": {"synonym_neighbours": 10, "spelling_vocab": 0}},
                        str(tiny_model_dir))
    objective = build_objective(config)
    assert isinstance(objective.input_transform, SynonymEncoding)
    assert objective.input_transform.params["neighbours"] == 10 and objective.input_transform.vocabulary == []
    with pytest.raises(TightropeError, match="canonical defense does not use --epsilon"):
        build_objective(defense_of({"method": "canonical", "params": {"epsilon": 0.1}}, str(tiny_model_dir)))


def test_settings_of_another_defense_are_refused_in_one_sentence(tiny_model_dir, tiny_task, tmp_path):
    result = CliRunner().invoke(app, ["train", "--model", str(tiny_model_dir), "--task", str(tiny_task),
                                      "--out", str(tmp_path / "r"), "--defense", "pgd", "--synonym-neighbours", "10"])
    assert result.exit_code == 2 and "does not use --synonym-neighbours" in " ".join(result.output.split())


def test_random_substitution_is_seeded_and_draws_only_the_attacks_candidates(tokenizer, encoding):
    from tightrope.attacks.text import AttackedText
    from tightrope.defenses.canonical import SynonymEncodingTraining

    objective = SynonymEncodingTraining(substitution_rate=0.5, tokenizer=tokenizer, max_length=32,
                                        transform=encoding, embedding=_embedding())
    runs = []
    for _ in range(2):
        torch.manual_seed(11)
        runs.append([objective.substitute(t) for t in TEXTS * 3])
    assert runs[0] == runs[1] and runs[0] != TEXTS * 3  # deterministic, and it does swap words
    for old, new in zip(TEXTS * 3, runs[0]):
        for a, b in zip(AttackedText.from_text(old).words, AttackedText.from_text(new).words):
            assert a == b or b in objective.candidates(a.lower())
    model = make_tiny_classifier(tokenizer)
    enc = tokenizer(TEXTS, padding=True, return_tensors="pt")
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
             "labels": torch.tensor([1, 0, 1, 0]), "texts": TEXTS}
    loss = objective(model, batch)
    assert torch.isfinite(loss) and loss.requires_grad
    with pytest.raises(TightropeError, match="needs the student's tokenizer"):
        SynonymEncodingTraining(substitution_rate=0.5, transform=encoding)
