"""Input transforms that a defended model applies to every text before tokenization, in pure Python.

A transform is part of the saved model (its table in the model folder, named with its hash in
``card.json``), so it must run wherever the model runs: in PyTorch processes and in the torch-free
serving runtime (:mod:`tightrope.serving`), which imports only this module of tightrope's defenses.
How a transform's table is *built* (from the attacks' neighbour sets) is
:mod:`tightrope.defenses.canonical`.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import string
from pathlib import Path

import numpy as np

from tightrope.errors import MissingResourceError, TightropeError

# A word as the attacks split text (letters and digits, with inner apostrophes and hyphens).
WORD = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*")

KIND = "synonym-encoding"
FILE = "input_transform.json"
FORMAT_VERSION = 1
LETTERS = string.ascii_lowercase
MAX_COPIES = 64  # copies per text of randomized smoothing (each costs one forward pass)



def recover_case(template: str, word: str) -> str:
    """Give ``word`` the casing pattern of ``template`` (all caps, capitalised, or lower)."""
    if template.isupper() and len(template) > 1:
        return word.upper()
    if template[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


def edits1(word: str) -> set[str]:
    """Every string one delete, adjacent transposition, substitution or insertion away (Norvig)."""
    splits = [(word[:i], word[i:]) for i in range(len(word) + 1)]
    deletes = [a + b[1:] for a, b in splits if b]
    swaps = [a + b[1] + b[0] + b[2:] for a, b in splits if len(b) > 1]
    subs = [a + c + b[1:] for a, b in splits if b for c in LETTERS]
    inserts = [a + c + b for a, b in splits for c in LETTERS]
    return set(deletes + swaps + subs + inserts)


class Smoothing:
    """Randomized smoothing over the attackers' candidate sets: SAFER (Ye, Gong and Liu, "SAFER: A
    Structure-free Approach for Certified Robustness to Adversarial Word Substitutions", ACL 2020).

    The smoothed classifier answers, for a text x, the mean of the base classifier's probabilities over
    random perturbations of x (SAFER's eq. 3, g(x) = E_{z ~ Pi_x} f(z), estimated by Monte Carlo with
    ``copies`` draws). Here a perturbation swaps each word that has candidates, independently with
    probability ``rate``, for a uniformly drawn one of them (SAFER draws every word from its perturbation
    set, the word itself included; ``rate`` = 1 - 1/(|S(w)|+1) is that case). The candidates are the
    attacks' own (TextFooler's counter-fitted neighbours and PWWS's WordNet synonyms,
    :func:`tightrope.defenses.canonical.candidate_table`), stored in the model folder so that the
    torch-free runtime applies the same smoothing.

    The draws are seeded by ``seed`` and the text itself, so the smoothed classifier is a deterministic
    function of its input: an attack that queries it queries the expectation it answers (the copies are
    its expectation over the randomness), and a model saved and reloaded answers the same. Evaluate
    over several ``seed`` values to see the spread. Cost: ``copies`` forward passes per text.
    """

    CITATION = "Ye et al., SAFER: A Structure-free Approach for Certified Robustness to Adversarial Word Substitutions, ACL 2020"

    def __init__(self, candidates: dict[str, list[str]], rate: float, copies: int, seed: int = 0,
                 params: dict | None = None):
        if not 0.0 < float(rate) <= 1.0:
            raise TightropeError(f"The smoothing rate is a probability per word in (0, 1], got {rate}.")
        if not 1 <= int(copies) <= MAX_COPIES:
            raise TightropeError(f"Smoothing takes 1 to {MAX_COPIES} copies per text, got {copies}.")
        self.candidates = {w: list(c) for w, c in candidates.items() if c}
        self.rate, self.copies, self.seed = float(rate), int(copies), int(seed)
        self.params = dict(params or {})

    def perturb(self, text: str, rng: random.Random, rate: float | None = None) -> str:
        """``text`` with each word that has candidates swapped, with probability ``rate``, for one of them."""
        rate = self.rate if rate is None else rate

        def swap(match: re.Match) -> str:
            word = match.group()
            found = self.candidates.get(word.lower())
            if not found or rng.random() >= rate:
                return word
            return recover_case(word, found[rng.randrange(len(found))])

        return WORD.sub(swap, text)

    def rng(self, text: str) -> random.Random:
        """The generator of ``text``'s copies: seeded by the smoothing's seed and the text."""
        return random.Random(int(hashlib.sha256(f"{self.seed}\0{text}".encode()).hexdigest()[:16], 16))

    def expand(self, texts: list[str]) -> list[str]:
        """``copies`` perturbed copies of every text, text by text (copies of text i at i*copies ...)."""
        out: list[str] = []
        for text in texts:
            rng = self.rng(text)
            out += [self.perturb(text, rng) for _ in range(self.copies)]
        return out

    def describe(self) -> dict:
        return {"rate": self.rate, "copies": self.copies, "seed": self.seed, "words": len(self.candidates),
                **self.params}

    def to_json(self) -> dict:
        return {"rate": self.rate, "copies": self.copies, "seed": self.seed, "params": self.params,
                "candidates": self.candidates}

    @classmethod
    def from_json(cls, payload: dict, where: str = "the smoothing") -> "Smoothing":
        try:
            return cls(payload["candidates"], payload["rate"], payload["copies"], payload.get("seed", 0),
                       payload.get("params"))
        except (KeyError, TypeError, AttributeError) as err:
            raise TightropeError(f"{where} has a damaged smoothing section ({err!r}); the model directory is damaged.") from None


def smoothed_log_probs(logits, copies: int):
    """log of the mean probability over each text's ``copies`` rows: (n*copies, C) -> (n, C), torch or numpy."""
    probs = logits.softmax(-1) if hasattr(logits, "softmax") else _softmax(logits)
    mean = probs.reshape(-1, copies, probs.shape[-1]).mean(1)
    return mean.clamp_min(1e-12).log() if hasattr(mean, "clamp_min") else _log(mean)


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _log(x):
    return np.log(np.maximum(x, 1e-12))


class SynonymEncoding:
    """The input transform: word recognition (optional), then the synonym encoding, word by word.

    ``table`` maps a lower-case word to its representative (only words that change are stored);
    ``vocabulary`` lists the recogniser's known words, most frequent first (empty: no recognition).
    """

    def __init__(self, table: dict[str, str], vocabulary: list[str] | None = None, params: dict | None = None,
                 smoothing: "Smoothing | None" = None):
        self.table = dict(table)
        self.smoothing = smoothing  # randomized smoothing over the texts, applied by the classifier (None: off)
        self.vocabulary = list(vocabulary or [])
        self.rank = {w: i for i, w in enumerate(self.vocabulary)}
        self.params = dict(params or {})
        self.calls = 0  # calls of the transform (one per batch of texts)
        self.texts = 0  # texts transformed
        self._memo: dict[str, str] = {}

    # --- the transform ------------------------------------------------------------------------------

    def recognise(self, word: str) -> str:
        """A word outside the vocabulary -> the most frequent vocabulary word one edit away (else itself)."""
        if not self.rank or word in self.rank or word in self.table or not word.isalpha():
            return word
        best = min((e for e in edits1(word) if e in self.rank), key=self.rank.__getitem__, default=None)
        return best if best is not None else word

    def canonical_word(self, word: str) -> str:
        low = word.lower()
        out = self._memo.get(low)
        if out is None:
            recognised = self.recognise(low)
            out = self.table.get(recognised, recognised)
            if len(self._memo) > 500_000:
                self._memo.clear()
            self._memo[low] = out
        return word if out == low else recover_case(word, out)

    def __call__(self, texts: list[str]) -> list[str]:
        self.calls += 1
        self.texts += len(texts)
        return [WORD.sub(lambda m: self.canonical_word(m.group()), text) for text in texts]

    def clusters(self) -> dict[str, list[str]]:
        """Representative -> its members (the representative first)."""
        out: dict[str, list[str]] = {}
        for word, rep in self.table.items():
            out.setdefault(rep, [rep]).append(word)
        return out

    # --- saving with the model -----------------------------------------------------------------------

    def to_json(self) -> dict:
        payload = {"kind": KIND, "version": FORMAT_VERSION, "params": self.params,
                   "clusters": self.clusters(), "vocabulary": self.vocabulary}
        if self.smoothing is not None:
            payload["smoothing"] = self.smoothing.to_json()
        return payload

    @classmethod
    def from_json(cls, payload: dict, where: str = "the input transform") -> "SynonymEncoding":
        if not isinstance(payload, dict) or payload.get("kind") != KIND or "clusters" not in payload:
            raise TightropeError(f"{where} is not a synonym-encoding table; the model directory is damaged.")
        table = {m: rep for rep, members in payload["clusters"].items() for m in members if m != rep}
        smoothing = Smoothing.from_json(payload["smoothing"], where) if payload.get("smoothing") else None
        return cls(table, payload.get("vocabulary") or [], payload.get("params") or {}, smoothing)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:16]

    def card_entry(self) -> dict:
        """What card.json records: kind, file, content hash, parameters, sizes, citations."""
        entry = {"kind": KIND, "file": FILE, "sha256_16": self.digest(), "params": self.params,
                 "clusters": len(self.clusters()), "encoded_words": len(self.table),
                 "spelling_vocabulary": len(self.vocabulary),
                 "citations": ["Wang et al., Natural Language Adversarial Defense through Synonym Encoding, UAI 2021",
                               "Pruthi et al., Combating Adversarial Misspellings with Robust Word Recognition, ACL 2019"]}
        if self.smoothing is not None:
            entry["smoothing"] = self.smoothing.describe()
            entry["citations"].append(Smoothing.CITATION)
        return entry

    def files(self) -> dict[str, dict]:
        """The files that go into a model directory beside card.json (for ``models.save_model(extra=...)``)."""
        return {FILE: self.to_json()}

    @classmethod
    def load(cls, model_dir: str | Path, entry: dict) -> "SynonymEncoding":
        file = Path(model_dir) / entry.get("file", FILE)
        if not file.exists():
            raise MissingResourceError(
                f"The model in {model_dir} applies a synonym encoding, but its table {file.name} is missing; "
                "copy it from the model it was made from, or retrain with --defense canonical.")
        try:
            payload = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise TightropeError(f"{file} is not valid JSON; the model directory is damaged.") from err
        transform = cls.from_json(payload, str(file))
        if entry.get("sha256_16") and entry["sha256_16"] != transform.digest():
            raise TightropeError(f"{file} does not match the table its card.json records; the model directory is damaged.")
        return transform


# --- building the table from the attacks' resources ----------------------------------------------------


LOADERS = {KIND: SynonymEncoding.load}  # card entry kind -> loader(model folder, entry)


def load(model_dir: str | Path, entry: dict):
    """The input transform a card's ``input_transform`` entry names, read from the model folder."""
    kind = (entry or {}).get("kind")
    if kind not in LOADERS:
        raise TightropeError(f"The model in {model_dir} applies the input transform '{kind}', which this tightrope "
                             f"does not know (known: {', '.join(LOADERS)}).")
    return LOADERS[kind](model_dir, entry)
