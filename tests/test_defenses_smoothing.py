"""Randomized smoothing over the attacks' candidate sets (SAFER, Ye et al. 2020): part of the saved model,
deterministic for a fixed seed, the mean probability over its copies, and every query goes through it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import make_tiny_classifier
from test_defenses_canonical import TEXTS, _embedding, _results, _save_defended
from typer.testing import CliRunner

from tightrope import inference
from tightrope.cli import app
from tightrope.defenses import canonical
from tightrope.defenses.canonical import build, with_smoothing
from tightrope.errors import TightropeError
from tightrope.transforms import Smoothing, SynonymEncoding, smoothed_log_probs

CANDIDATES = {"wonderful": ["marvelous", "superb"], "film": ["movie", "picture"], "dull": ["boring", "tedious"],
              "acting": ["performance"], "good": ["fine", "decent", "nice"], "watch": ["see"]}


@pytest.fixture
def smoothed() -> SynonymEncoding:
    encoding = build(neighbours=10, min_cos=0.5, wordnet=False, spelling_vocab=100, embedding=_embedding())
    return with_smoothing(encoding, rate=0.5, copies=4, seed=0, candidates=CANDIDATES)


def test_copies_are_deterministic_for_a_seed_and_draw_only_the_candidates(smoothed):
    s = smoothed.smoothing
    first, again = s.expand(TEXTS), s.expand(TEXTS)
    assert first == again and len(first) == 4 * len(TEXTS)
    assert first != [t for t in TEXTS for _ in range(4)]  # it does swap words
    other = Smoothing(CANDIDATES, 0.5, 4, seed=1).expand(TEXTS)
    assert other != first  # the seed matters
    # a text's copies depend on that text only, not on the batch it came in
    assert s.expand(TEXTS[1:2]) == first[4:8]
    for text, copies in zip(TEXTS, (first[i:i + 4] for i in range(0, len(first), 4))):
        for copy in copies:
            for a, b in zip(text.split(), copy.split()):
                assert a == b or b in CANDIDATES[a.lower()], (a, b)


def test_smoothed_logits_are_the_log_of_the_mean_probability_over_the_copies(tokenizer, smoothed):
    clf = inference.TextClassifier(make_tiny_classifier(tokenizer, seed=3), tokenizer, max_length=32,
                                   input_transform=smoothed)
    copies = smoothed.smoothing.expand(TEXTS)
    unsmoothed = inference.TextClassifier(clf.model, tokenizer, max_length=32,
                                          input_transform=SynonymEncoding(smoothed.table, smoothed.vocabulary))
    expected = unsmoothed.logits(copies).softmax(-1).view(len(TEXTS), 4, -1).mean(1)
    assert torch.allclose(clf.logits(TEXTS).exp(), expected, atol=1e-6)
    # the numpy path of the torch-free runtime gives the same numbers
    raw = unsmoothed.logits(copies)
    assert np.allclose(smoothed_log_probs(raw.numpy(), 4), smoothed_log_probs(raw, 4).numpy(), atol=1e-6)


def test_a_smoothed_model_saved_and_reloaded_predicts_the_same_and_attacks_query_the_copies(tokenizer, smoothed,
                                                                                               tmp_path):
    from tightrope.attacks import Attacker, recipes
    from tightrope.data import TaskData

    model_dir = _save_defended(tokenizer, smoothed, tmp_path / "smoothed")
    card = json.loads((model_dir / "card.json").read_text())
    assert card["input_transform"]["smoothing"]["copies"] == 4 and card["input_transform"]["smoothing"]["rate"] == 0.5
    clf = inference.load(str(model_dir))
    assert clf.input_transform.smoothing.candidates == CANDIDATES
    before = inference.TextClassifier(clf.model, tokenizer, max_length=32, input_transform=smoothed)
    assert torch.allclose(clf.logits(TEXTS), before.logits(TEXTS), atol=1e-6)

    data = TaskData("t", "test", TEXTS, [1, 0, 1, 0], ("negative", "positive"))
    texts = clf.input_transform.texts
    report = Attacker(recipes.build("deepwordbug", clf), out=tmp_path / "attack", seed=0).run(clf, data)
    # every query went through the smoothing: 4 copies of each text reached the encoding
    assert clf.input_transform.texts - texts >= 4 * report.examples
    for r in _results(tmp_path / "attack"):
        if r.status == "succeeded":  # judged on the smoothed pipeline
            assert clf.predict([r.perturbed_text])[0] == r.perturbed_prediction != r.label


def test_progress_counts_texts_not_copies(tokenizer, smoothed):
    clf = inference.TextClassifier(make_tiny_classifier(tokenizer), tokenizer, max_length=32, input_transform=smoothed)
    seen = []
    clf.logits(TEXTS, batch_size=3, progress=seen.append)
    assert sum(seen) == len(TEXTS)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"rate": 0.0, "copies": 4}, "probability per word"),
    ({"rate": 0.5, "copies": 0}, "1 to 64 copies"),
    ({"rate": 1.5, "copies": 4}, "probability per word"),
])
def test_bad_smoothing_settings_are_one_sentence(kwargs, message):
    with pytest.raises(TightropeError, match=message):
        Smoothing(CANDIDATES, **kwargs)


def test_a_damaged_smoothing_section_is_one_sentence(smoothed):
    payload = smoothed.to_json()
    del payload["smoothing"]["candidates"]
    with pytest.raises(TightropeError, match="damaged smoothing section"):
        SynonymEncoding.from_json(payload)


@pytest.fixture
def fake_candidates(monkeypatch):
    real = canonical.build
    monkeypatch.setattr(canonical, "candidate_table", lambda *a, **k: dict(CANDIDATES))
    monkeypatch.setattr(canonical, "build", lambda neighbours=50, min_cos=0.5, wordnet=True, spelling_vocab=50_000,
                        embedding=None, progress=None: real(neighbours, min_cos, False, spelling_vocab,
                                                            embedding=_embedding()))


def test_train_with_smoothing_saves_it_and_compression_keeps_it(tiny_model_dir, tiny_task, tmp_path, fake_candidates):
    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--model", str(tiny_model_dir), "--task", str(tiny_task), "--out", str(run),
                                      "--n-eval", "8", "--max-length", "16", "--batch-size", "8", "--lr", "1e-3",
                                      "--defense", "canonical", "--synonym-neighbours", "10", "--spelling-vocab", "100",
                                      "--substitution-rate", "0.5", "--smoothing", "copies=3,seed=2"])
    assert result.exit_code == 0, result.output
    card = json.loads((run / "card.json").read_text())
    assert card["defense"]["smoothing"] == {"copies": 3, "rate": None, "seed": 2}
    entry = card["input_transform"]["smoothing"]
    assert (entry["copies"], entry["rate"], entry["seed"], entry["words"]) == (3, 0.5, 2, len(CANDIDATES))
    clf = inference.load(str(run))
    assert clf.input_transform.smoothing.copies == 3
    small = tmp_path / "int8"
    result = CliRunner().invoke(app, ["compress", str(run), "--quantize", "int8", "--out", str(small)])
    assert result.exit_code == 0, result.output
    assert json.loads((small / "card.json").read_text())["input_transform"] == card["input_transform"]
    assert inference.load(str(small)).input_transform.smoothing.copies == 3


@pytest.mark.parametrize(("flags", "message"), [
    (["--smoothing", "copies=4,rate=0.3,sed=1"], "sed"),
    (["--smoothing", "4"], "give one of them"),
    (["--smoothing", "copies=0,rate=0.5"], "copies"),
    (["--defense", "pgd", "--smoothing", "4"], "does not use --smoothing"),
])
def test_bad_smoothing_settings_on_the_command_line_are_one_sentence(tiny_model_dir, tiny_task, tmp_path, flags,
                                                                     message):
    defense = [] if "--defense" in flags else ["--defense", "canonical"]
    result = CliRunner().invoke(app, ["train", "--model", str(tiny_model_dir), "--task", str(tiny_task),
                                      "--out", str(tmp_path / "r"), *defense, *flags])
    assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output


def test_latency_and_throughput_count_a_smoothed_models_copies(tokenizer, smoothed):
    from tightrope.evaluate import perf

    clf = inference.TextClassifier(make_tiny_classifier(tokenizer), tokenizer, max_length=32, input_transform=smoothed)
    rows = []
    forward = clf.forward_ids
    clf.forward_ids = lambda input_ids, attention_mask: rows.append(len(input_ids)) or forward(input_ids, attention_mask)
    perf.measure_latency(clf, "a wonderful film", seq_len=16, runs=2, warmup=1)
    assert set(rows) == {4}  # one text, its 4 copies
    rows.clear()
    result = perf.measure_throughput(clf, "a wonderful film", batch_size=3, seq_len=16, runs=1)
    assert set(rows) == {12} and result.batch_size == 3
