"""FGWS (Mozes et al. 2021): rare words become their most frequent synonym; joined to the saved transform."""

from __future__ import annotations

import pytest

from tightrope.defenses.fgws import fgws_table, with_fgws, word_frequencies
from tightrope.errors import TightropeError
from tightrope.transforms import SynonymEncoding

SYNONYMS = {"precipitous": ["steep", "sharp", "abrupt"], "pump": ["heart", "ticker"], "sharp": ["precipitous", "keen"],
            "ticker": ["heart", "pump"], "gem": ["jewel"], "steep": ["sharp"]}
TRAIN = ["a sharp , funny film with heart", "sharp writing and a big heart", "a steep climb", "heart heart"]


def test_word_frequencies_count_lower_case_words():
    freq = word_frequencies(["A Sharp film", "sharp-eyed sharp"])
    assert freq["sharp"] == 2 and freq["a"] == 1 and freq["sharp-eyed"] == 1


def test_rare_words_take_their_most_frequent_synonym_and_frequent_words_stay():
    freq = word_frequencies(TRAIN)  # heart 4, sharp 2, steep 1
    table = fgws_table(list(SYNONYMS), lambda w: SYNONYMS.get(w, []), freq, delta=2)
    assert table == {"precipitous": "sharp", "pump": "heart", "ticker": "heart", "steep": "sharp"}  # sharp (2) stays
    assert "gem" not in table  # no synonym seen in training: left alone
    assert "sharp" not in fgws_table(["sharp"], SYNONYMS.get, freq, delta=3)  # rare, but no synonym is more frequent
    assert "steep" not in fgws_table(list(SYNONYMS), lambda w: SYNONYMS.get(w, []), freq, delta=1)  # seen once: not rare
    with pytest.raises(TightropeError, match="at least 1"):
        fgws_table([], lambda w: [], freq, delta=0)


def test_fgws_joins_the_encoding_before_it_and_is_saved_with_it():
    encoding = SynonymEncoding({"heart": "core"}, ["sharp", "heart"], {"neighbours": 10})
    joined = with_fgws(encoding, {"pump": "heart", "precipitous": "sharp"}, {"delta": 2})
    assert joined(["a precipitous pump"]) == ["a sharp core"]  # FGWS, then the synonym encoding
    assert joined(["a HEART"]) == ["a CORE"]
    again = SynonymEncoding.from_json(joined.to_json())
    assert again.table == joined.table and again.params["fgws"] == {"delta": 2}
    assert again.digest() == joined.digest() != encoding.digest()


def test_fgws_keeps_the_smoothing_of_the_transform_it_joins():
    from tightrope.transforms import Smoothing

    smoothing = Smoothing({"sharp": ["keen"]}, 0.5, 4, seed=1)
    encoding = SynonymEncoding({"heart": "core"}, [], {}, smoothing)
    joined = with_fgws(encoding, {"pump": "heart"}, {"delta": 2})
    assert joined.smoothing is smoothing
    assert SynonymEncoding.from_json(joined.to_json()).smoothing.to_json() == smoothing.to_json()
