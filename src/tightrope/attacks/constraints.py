"""Constraints on adversarial text, as in TextAttack: each states its parameters (``describe``) so that a
result records the exact set it ran under, and each can re-check a finished adversarial text
(``holds``), which the tests use to confirm that an attack respects every constraint it claims.

Pre-transformation constraints restrict which word indices may change; candidate constraints accept or
reject a candidate text (the current text with one more word replaced), in batches.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from tightrope.attacks.resources import wordnet
from tightrope.attacks.text import AttackedText, Part


class Constraint(Part):
    name = "constraint"


class PreTransformationConstraint(Constraint):
    def allowed(self, current: AttackedText, original: AttackedText) -> set[int]:
        raise NotImplementedError

    def holds(self, original: AttackedText, adversarial: AttackedText) -> bool:
        return set(original.diff(adversarial)) <= self.allowed(original, original)


class CandidateConstraint(Constraint):
    def check(self, original: AttackedText, candidates: list[AttackedText], index: int) -> list[bool]:
        raise NotImplementedError

    def holds(self, original: AttackedText, adversarial: AttackedText) -> bool:
        """Re-check a finished text: every changed word as if it had been the last change."""
        return all(self.check(original, [adversarial], i)[0] for i in original.diff(adversarial))


# --- which words may change -------------------------------------------------------------------------


class RepeatModification(PreTransformationConstraint):
    """A word is modified at most once (TextAttack's RepeatModification)."""

    name = "repeat_modification"

    def allowed(self, current, original):
        return set(range(len(current))) - set(current.modified)

    def holds(self, original, adversarial):
        return True  # a word replaced twice still differs in one place; nothing to re-check


class StopwordModification(PreTransformationConstraint):
    """Stopwords are never modified (Jin et al. 2020, Sec. 3.2 step 2)."""

    name = "stopword_modification"

    def __init__(self, stopwords: frozenset[str], source: str):
        self.stopwords = stopwords
        self.source = source

    def params(self):
        return {"stopwords": self.source, "count": len(self.stopwords)}

    def allowed(self, current, original):
        return {i for i, w in enumerate(original.words) if w.lower() not in self.stopwords}


class ModelWindow(PreTransformationConstraint):
    """Only words the victim sees. With head truncation the words past ``max_words`` never reach the
    model; with head+tail truncation (``encoding.encode``) the middle words ``[max_words, tail_from)``
    do not either. Changing them would only spend queries."""

    name = "model_window"

    def __init__(self, max_words: int | None, tail_from: int | None = None):
        self.max_words, self.tail_from = max_words, tail_from

    @classmethod
    def of(cls, window: "int | tuple[int, int] | None") -> "ModelWindow":
        """From ``model_windows``' value for one text: None, a head word count, or (head words, tail start)."""
        return cls(*window) if isinstance(window, tuple) else cls(window)

    def params(self):
        return {"max_words": self.max_words, "tail_from": self.tail_from}

    def allowed(self, current, original):
        n = len(original)
        head = set(range(n if self.max_words is None else min(self.max_words, n)))
        return head if self.tail_from is None else head | set(range(self.tail_from, n))


# --- which candidates are acceptable ---------------------------------------------------------------------


class MaxWordsPerturbed(CandidateConstraint):
    """At most ``max_share`` of the words (and/or ``max_words`` words) differ from the original."""

    name = "max_words_perturbed"

    def __init__(self, max_share: float | None = None, max_words: int | None = None):
        if max_share is None and max_words is None:
            raise ValueError("MaxWordsPerturbed needs max_share or max_words")
        self.max_share, self.max_words = max_share, max_words

    def params(self):
        return {"max_share": self.max_share, "max_words": self.max_words}

    def limit(self, n: int) -> float:
        limits = [math.inf]
        if self.max_share is not None:
            limits.append(self.max_share * n)
        if self.max_words is not None:
            limits.append(self.max_words)
        return min(limits)

    def check(self, original, candidates, index):
        return [len(original.diff(c)) <= self.limit(len(original)) for c in candidates]

    def holds(self, original, adversarial):
        return self.check(original, [adversarial], -1)[0]


class WordEmbeddingDistance(CandidateConstraint):
    """Cosine between the original and the new word in the counter-fitted space >= ``min_cos``
    (Jin et al. 2020: delta = 0.5). Words outside the vocabulary are rejected."""

    name = "word_embedding_cosine"

    def __init__(self, embedding, min_cos: float):
        self.embedding, self.min_cos = embedding, min_cos

    def params(self):
        return {"min_cos": self.min_cos, "embedding": self.embedding.description.get("source", "custom"),
                "embedding_key": self.embedding.description.get("key")}

    def check(self, original, candidates, index):
        out = []
        for c in candidates:
            cos = self.embedding.cosine(original.words[index].lower(), c.words[index].lower())
            out.append(cos is not None and cos >= self.min_cos - 1e-6)
        return out


@lru_cache(maxsize=200_000)
def wordnet_pos(word: str) -> frozenset[str]:
    """Parts of speech a word can take in WordNet 3.0 (n, v, a, r; satellite adjectives as a)."""

    return frozenset("a" if s.pos() == "s" else s.pos() for s in wordnet().synsets(word.lower()))


class PartOfSpeech(CandidateConstraint):
    """The new word can take a part of speech of the original word (Jin et al. 2020, Sec. 3.2 step 3).

    Offline substitute for a contextual tagger (no tagger model ships here): the sets of WordNet parts
    of speech of the two words must intersect; with ``allow_verb_noun_swap`` (TextAttack's TextFooler
    setting) a noun may replace a verb and back. Words unknown to WordNet match only each other.
    """

    name = "part_of_speech"

    def __init__(self, allow_verb_noun_swap: bool = True):
        self.allow_verb_noun_swap = allow_verb_noun_swap

    def params(self):
        return {"tagger": "wordnet-3.0 possible tags (context-free)", "allow_verb_noun_swap": self.allow_verb_noun_swap}

    def compatible(self, a: str, b: str) -> bool:
        pa, pb = wordnet_pos(a), wordnet_pos(b)
        if not pa or not pb:
            return not pa and not pb
        if self.allow_verb_noun_swap:
            pa = pa | {"n", "v"} if pa & {"n", "v"} else pa
        return bool(pa & pb)

    def check(self, original, candidates, index):
        return [self.compatible(original.words[index], c.words[index]) for c in candidates]


class SentenceSimilarity(CandidateConstraint):
    """Angular similarity 1 - arccos(cos)/pi of sentence embeddings of a ``window`` of words around each
    changed word, candidate vs original, >= ``threshold`` (Jin et al. 2020 with USE: window 15,
    threshold 0.840845057 as in TextAttack's recipe). Every window that the new change touches is
    re-checked, so the finished text satisfies the constraint around every changed word.
    """

    name = "sentence_similarity"

    def __init__(self, encoder, threshold: float, window: int = 15):
        self.encoder, self.threshold, self.window = encoder, threshold, window

    def params(self):
        return {"encoder": self.encoder.name, "metric": "angular", "threshold": self.threshold, "window": self.window}

    def similarity(self, a: list[str], b: list[str]) -> torch.Tensor:
        cos = (self.encoder.encode(a) * self.encoder.encode(b)).sum(-1).clamp(-1.0, 1.0)
        return 1.0 - torch.arccos(cos) / math.pi

    def check(self, original, candidates, index):
        half = self.window // 2
        pairs, owner = [], []
        for k, c in enumerate(candidates):
            for j in c.modified | {index}:
                if abs(j - index) <= 2 * half:  # windows that contain ``index``
                    pairs.append((original.window(j, self.window), c.window(j, self.window)))
                    owner.append(k)
        ok = [True] * len(candidates)
        if pairs:
            sims = self.similarity([p[0] for p in pairs], [p[1] for p in pairs])
            for k, s in zip(owner, sims.tolist()):
                if s < self.threshold - 1e-6:
                    ok[k] = False
        return ok

    def holds(self, original, adversarial):
        changed = original.diff(adversarial)
        if not changed:
            return True
        sims = self.similarity([original.window(j, self.window) for j in changed],
                               [adversarial.window(j, self.window) for j in changed])
        return bool((sims >= self.threshold - 1e-6).all())


def levenshtein(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


class LevenshteinEditDistance(CandidateConstraint):
    """Character edits from the original <= ``max_edit_distance`` (TextAttack's DeepWordBug: 30).

    Counted as the sum of per-word edit distances, an upper bound of the whole-text distance (so the
    constraint is never looser than TextAttack's), and linear in the number of changed words.
    """

    name = "levenshtein_edit_distance"

    def __init__(self, max_edit_distance: int):
        self.max_edit_distance = max_edit_distance

    def params(self):
        return {"max_edit_distance": self.max_edit_distance, "measure": "sum over changed words"}

    def distance(self, original, candidate) -> int:
        return sum(levenshtein(original.words[i], candidate.words[i]) for i in original.diff(candidate))

    def check(self, original, candidates, index):
        return [self.distance(original, c) <= self.max_edit_distance for c in candidates]

    def holds(self, original, adversarial):
        return self.check(original, [adversarial], -1)[0]
