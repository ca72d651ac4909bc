"""Frequency-guided word substitutions (FGWS): rare words replaced by their most frequent synonym.

Mozes, Stenetorp, Kleinberg and Griffin, "Frequency-Guided Word Substitutions for Detecting Textual
Adversarial Examples", EACL 2021. Word-substitution attacks tend to swap in words that the model saw
rarely in training (PWWS's WordNet synonyms of other senses: "sharp" -> "precipitous", "heart" ->
"pump"). FGWS replaces every word ``w`` whose frequency in the training data is below ``delta`` by

    phi(w) = argmax_{w' in S(w) + {w}} freq(w')        (Sec. 3, "frequency-guided word substitutions")

where ``S(w)`` are the synonyms of ``w``. The paper uses FGWS to *detect* an adversarial example (the
prediction's confidence drops once the substitutions are made); tightrope uses the substituted text as
the model's input, as Mozes et al.'s "FGWS as a defense" discussion suggests, so that the model never
reads a rare synonym. ``S(w)`` are the attacker's own candidate sets (TextFooler's counter-fitted
neighbours, PWWS's WordNet synonyms, :func:`tightrope.defenses.canonical.neighbour_sets`); the paper
takes WordNet plus GloVe neighbours, the same two sources.

``delta`` is chosen on clean data only (the paper tunes it on validation data so that few clean
texts change; :func:`choose_delta` keeps the largest delta whose clean validation accuracy stays
within ``max_drop`` of the model's), never on attacks.

The result is a word table, so it joins the synonym encoding and word recognition in one
:class:`tightrope.transforms.SynonymEncoding` (recognise, then FGWS, then encode) that is saved with
the model and applied by every command.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping

from tightrope.attacks.recipes import default_embedding
from tightrope.attacks.words import wordnet_synonyms
from tightrope.defenses.canonical import neighbour_sets
from tightrope.errors import TightropeError
from tightrope.transforms import WORD, SynonymEncoding


def word_frequencies(texts: Iterable[str]) -> Counter:
    """Lower-case word counts, words as the attacks split them."""
    counts: Counter = Counter()
    for text in texts:
        counts.update(m.group().lower() for m in WORD.finditer(text))
    return counts


def fgws_table(words: Iterable[str], synonyms: Callable[[str], Iterable[str]], freq: Mapping[str, int],
               delta: int) -> dict[str, str]:
    """phi over ``words``: each word seen fewer than ``delta`` times -> its most frequent synonym, when that
    one is strictly more frequent (ties keep the earlier synonym, i.e. the nearer one). Pure."""
    if delta < 1:
        raise TightropeError(f"FGWS's frequency threshold delta must be at least 1, got {delta}.")
    table = {}
    for word in words:
        own = freq.get(word, 0)
        if own >= delta:
            continue
        best, best_freq = word, own
        for u in synonyms(word):
            f = freq.get(u, 0)
            if f > best_freq:
                best, best_freq = u, f
        if best != word:
            table[word] = best
    return table


def with_fgws(encoding: SynonymEncoding, fgws: Mapping[str, str], params: dict) -> SynonymEncoding:
    """One transform: recognition, then FGWS, then the synonym encoding (FGWS's choice encoded)."""
    table = dict(encoding.table)
    for word, frequent in fgws.items():
        code = encoding.table.get(frequent, frequent)
        if code != word:
            table[word] = code
    return SynonymEncoding(table, encoding.vocabulary, {**encoding.params, "fgws": params}, encoding.smoothing)


class AttackCandidates:
    """S(w) for FGWS: TextFooler's and PWWS's candidates of every word, computed once per process."""

    def __init__(self, embedding=None, neighbours: int = 50, min_cos: float = 0.5,
                 progress: Callable[[str], None] | None = None):
        self.wordnet_synonyms = wordnet_synonyms
        self.embedding = embedding or default_embedding()
        self.neighbours, self.min_cos = neighbours, min_cos
        self.near, self.order = neighbour_sets(self.embedding, neighbours, min_cos, True, progress)

    def __call__(self, word: str):
        # words outside the embedding's vocabulary (reached through WordNet) take their WordNet synonyms
        return self.near[word] if word in self.near else self.wordnet_synonyms(word)


def build_fgws(train_texts: Iterable[str], delta: int, encoding: SynonymEncoding, *,
               candidates: AttackCandidates | None = None) -> SynonymEncoding:
    """FGWS over the attacker's candidate sets, with frequencies from ``train_texts``, joined to ``encoding``."""
    candidates = candidates or AttackCandidates()
    neighbours, min_cos = candidates.neighbours, candidates.min_cos
    freq = word_frequencies(train_texts)
    table = fgws_table(candidates.order, candidates, freq, delta)
    params = {"delta": delta, "neighbours": neighbours, "min_cos": min_cos, "wordnet": True,
              "training_words": sum(freq.values()), "replaced_words": len(table),
              "citation": "Mozes et al., Frequency-Guided Word Substitutions for Detecting Textual Adversarial "
                          "Examples, EACL 2021"}
    return with_fgws(encoding, table, params)


__all__ = ["AttackCandidates", "build_fgws", "fgws_table", "with_fgws", "word_frequencies"]
