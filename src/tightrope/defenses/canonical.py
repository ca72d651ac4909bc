"""Synonym encoding: an input transform that maps every word of a synonym cluster to one representative,
with a character-level word-recognition step in front of it. It is part of the saved model.

Synonym encoding (SEM): Wang, Wang, Zhang, Yu and Hopcroft, "Natural Language Adversarial Defense through
Synonym Encoding", UAI 2021. A word-substitution attack swaps a word for one of its synonyms; if every
synonym of a cluster is encoded as the same word before the model sees it, the swap changes nothing the
model can see. SEM's Algorithm 1 (synonym encoding) builds the encoding greedily over words in order of
frequency::

    E[w] <- NONE for every word w
    for w_i in W, most frequent first:
        if E[w_i] = NONE:
            if some synonym u of w_i (u in Syn(w_i, delta, k)) is already encoded:
                E[w_i] <- E[u*], u* the closest encoded synonym of w_i
            else:
                E[w_i] <- w_i
            for u in Syn(w_i, delta, k) with E[u] = NONE:
                E[u] <- E[w_i]

``Syn(w, delta, k)`` are the ``k`` nearest words of ``w`` within distance ``delta`` in counter-fitted
embeddings (the paper: Euclidean delta = 0.5, k = 10, i.e. cosine >= 0.875 on unit vectors). tightrope
takes the attacker's own neighbour sets: TextFooler's (:mod:`tightrope.attacks.recipes`) ``neighbours``
= 50 nearest counter-fitted GloVe words, kept where the attack itself could use them (neither word a
TextFooler stopword, parts of speech compatible as the attack's ``PartOfSpeech`` constraint checks)
and where the cosine is at least ``min_cos``; with ``wordnet`` on, PWWS's WordNet synonyms
(:func:`tightrope.attacks.words.wordnet_synonyms`) are added after them, nearest first by counter-fitted
cosine. The classifier is then fine-tuned on encoded text (the paper's training on E(x)).

Why ``min_cos`` defaults to 0.95 and ``wordnet`` to off, not TextFooler's 0.5 and PWWS's synonyms:
Algorithm 1 gives a word the code of its closest encoded synonym, so codes travel along chains of
neighbours. On the 65,000-word counter-fitted GloVe 50d vocabulary at TextFooler's cosine >= 0.5, the
vocabulary chains into a few giant clusters (the largest holds 15,971 words; "film", "funny" and
"good" become "said"), and WordNet's senses chain just as far (with WordNet at cosine >= 0.95
the largest holds 9,675 words and "bad" becomes "night"). At cosine >= 0.95 without WordNet the largest
cluster holds 370 words and sentiment survives ("good", "best" -> "well"; "bad", "worst" -> "bad";
"boring" -> "bore"), at the price of covering only part of the attacker's candidates: 13.8% of
TextFooler's (word, candidate) pairs and 7.3% of PWWS's share a code in 300 MR training sentences.
Every figure comes from MR training sentences, never from an attack sample
(``benchmarks/defense_mr.py coverage``; docs/results.md).

Word recognition: Pruthi, Dhingra and Lipton, "Combating Adversarial Misspellings with Robust Word
Recognition", ACL 2019, place a word recogniser in front of the classifier so that DeepWordBug-style
character edits (swap, substitute, delete, insert one character) are undone. tightrope's recogniser is
the dictionary one of that paper's backoff family, not its semi-character RNN: a word outside the
vocabulary (the ``spelling_vocab`` most frequent GloVe words) is replaced by the most frequent vocabulary
word at Damerau-Levenshtein distance 1 (the four edits of DeepWordBug; candidates generated as in
Norvig's corrector), and passed through unchanged when there is none.

Inference cost: one dictionary lookup per word (and, for an unknown word, about 54 x length lookups of
its edits); no extra model call. The transform counts its calls (``calls``, ``texts``) so that a test
can assert that an attack went through it.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from tightrope import assets, models
from tightrope.attacks.constraints import PartOfSpeech
from tightrope.attacks.recipes import default_embedding
from tightrope.attacks.resources import TEXTFOOLER_STOPWORDS
from tightrope.attacks.resources import TEXTFOOLER_STOPWORDS as STOP
from tightrope.attacks.text import AttackedText
from tightrope.attacks.words import recover_case, wordnet_synonyms
from tightrope.defenses.adversarial import cross_entropy
from tightrope.encoding import collate, encode
from tightrope.errors import MissingResourceError, TightropeError
from tightrope.transforms import FILE, KIND, Smoothing, SynonymEncoding, edits1


def sem_encoding(words: Iterable[str], synonyms: Callable[[str], list[str]]) -> dict[str, str]:
    """SEM's Algorithm 1: ``words`` most frequent first; ``synonyms(w)`` nearest first. Returns E, the
    representative of every word that was reached (words that are their own representative included)."""
    code: dict[str, str] = {}
    for word in words:
        if word in code:
            continue
        near = synonyms(word)
        encoded = next((u for u in near if u in code), None)  # nearest first, so the closest encoded one
        code[word] = code[encoded] if encoded is not None else word
        for u in near:
            code.setdefault(u, code[word])
    return code


def neighbour_sets(embedding, neighbours: int, min_cos: float, wordnet: bool,
                   progress: Callable[[str], None] | None = None) -> tuple[dict[str, list[str]], list[str]]:
    """The attacker's candidates of every word of ``embedding``'s vocabulary: its ``neighbours`` nearest
    counter-fitted words with cosine >= ``min_cos`` (TextFooler's), then, with ``wordnet``, its WordNet
    synonyms (PWWS's) by counter-fitted cosine; only swaps the attacks could make (neither word a
    TextFooler stopword, parts of speech compatible). Returns (word -> candidates nearest first, the
    words in frequency order followed by the WordNet-only words reached)."""
    pos = PartOfSpeech(allow_verb_noun_swap=True)  # TextFooler's setting
    usable = lambda w, u: u not in STOP and pos.compatible(w, u)  # noqa: E731 - a swap the attack could make
    words = embedding.words
    near: dict[str, list[str]] = {}
    unit = embedding.vectors
    k = min(neighbours, len(words) - 1)
    for start in range(0, len(words), 2048):
        cos = unit[start:start + 2048] @ unit.T
        cos[torch.arange(cos.shape[0]), torch.arange(start, start + cos.shape[0])] = -2.0
        top, idx = cos.topk(k, dim=1)
        for row, (c, j) in enumerate(zip(top.tolist(), idx.tolist())):
            w = words[start + row]
            near[w] = [] if w in STOP else [words[i] for ci, i in zip(c, j) if ci >= min_cos and usable(w, words[i])]
        if progress:
            progress(f"neighbours {min(start + 2048, len(words))}/{len(words)}")
    order = list(words)
    if wordnet:

        index = embedding.index
        for w in words:
            extra = [u for u in wordnet_synonyms(w) if u not in near[w] and w not in STOP and usable(w, u)]
            # by counter-fitted cosine where both have vectors, else after them in WordNet's order
            extra.sort(key=lambda u: -float(unit[index[w]] @ unit[index[u]]) if u in index else 2.0)
            near[w] = near[w] + extra
        seen = set(order)
        order += [u for w in words for u in near[w] if u not in seen and not seen.add(u)]
    return near, order


def build(neighbours: int = 50, min_cos: float = 0.95, wordnet: bool = False, spelling_vocab: int = 50_000,
          embedding=None, progress: Callable[[str], None] | None = None) -> SynonymEncoding:
    """The synonym encoding over the counter-fitted vocabulary (and WordNet), cached on disk as JSON."""

    if neighbours < 1 or not -1.0 <= min_cos <= 1.0 or spelling_vocab < 0:
        raise TightropeError("The synonym encoding needs neighbours >= 1, -1 <= min_cos <= 1 and spelling_vocab >= 0.")
    if embedding is None:

        embedding = default_embedding()
    params = {"neighbours": neighbours, "min_cos": min_cos, "wordnet": wordnet, "spelling_vocab": spelling_vocab,
              "attack_filters": "TextFooler stopwords, WordNet part-of-speech compatibility",
              "embedding": embedding.description.get("source"), "embedding_key": embedding.description.get("key")}
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    # cached only for an embedding that names its own content (the counter-fitted one does)
    cache = assets.cache_dir() / "synonym-encoding" / f"{key}.json" if embedding.description.get("key") else None
    if cache is not None and cache.exists():
        return SynonymEncoding.from_json(json.loads(cache.read_text()))

    near, order = neighbour_sets(embedding, neighbours, min_cos, wordnet, progress)
    code = sem_encoding(order, lambda w: near.get(w, []))
    vocabulary = [w for w in embedding.words if w.isalpha()][:spelling_vocab]
    transform = SynonymEncoding({w: r for w, r in code.items() if w != r}, vocabulary, params)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps(transform.to_json()))
        tmp.replace(cache)
    return transform


def candidate_table(neighbours: int = 50, min_cos: float = 0.5, embedding=None,
                    progress: Callable[[str], None] | None = None) -> dict[str, list[str]]:
    """The attacks' candidates of every word: TextFooler's (``neighbours`` nearest counter-fitted words with
    cosine >= ``min_cos``, compatible parts of speech) then PWWS's (WordNet synonyms), as
    :func:`neighbour_sets` finds them; words without candidates left out. Cached on disk as JSON (about
    28 MB for the 65,000-word counter-fitted vocabulary); randomized smoothing stores it with the model."""
    if embedding is None:
        embedding = default_embedding()
    params = {"neighbours": neighbours, "min_cos": min_cos, "wordnet": True,
              "attack_filters": "TextFooler stopwords, WordNet part-of-speech compatibility",
              "embedding": embedding.description.get("source"), "embedding_key": embedding.description.get("key")}
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    cache = assets.cache_dir() / "attack-candidates" / f"{key}.json" if embedding.description.get("key") else None
    if cache is not None and cache.exists():
        return json.loads(cache.read_text())
    near, _ = neighbour_sets(embedding, neighbours, min_cos, True, progress)
    table = {w: c for w, c in near.items() if c}
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps(table))
        tmp.replace(cache)
    return table


def with_smoothing(transform: SynonymEncoding | None, rate: float, copies: int, seed: int = 0,
                   candidates: dict[str, list[str]] | None = None) -> SynonymEncoding:
    """``transform`` (or the identity, for a model without one) with SAFER's randomized smoothing over the
    attacks' candidate sets (:class:`tightrope.transforms.Smoothing`); the model saves it in its folder."""
    base = transform if transform is not None else SynonymEncoding({}, [], {"identity": True})
    smoothing = Smoothing(candidates if candidates is not None else candidate_table(), rate, copies, seed,
                          {"candidates": "TextFooler's 50 counter-fitted neighbours (cosine >= 0.5) and PWWS's "
                                         "WordNet synonyms"})
    return SynonymEncoding(base.table, base.vocabulary, base.params, smoothing)


class SynonymEncodingTraining:
    """The ``canonical`` defense: plain training (or distillation) on synonym-encoded text.

    The objective itself is the criterion; the transform rides along as ``input_transform``, which
    :func:`tightrope.train.train` applies to every training and validation text and saves with the model.

    ``substitution_rate`` > 0 adds random-substitution augmentation from the attacker's own candidate
    sets (Ivgi and Berant 2021, "Achieving Model Robustness through Discrete Adversarial Training", the
    random-sampling baseline; Si et al. 2021): each non-stopword of each training text is swapped with
    that probability for a random one of its TextFooler candidates (50 nearest counter-fitted words with
    cosine >= 0.5 and a compatible part of speech) or PWWS candidates (WordNet synonyms), then the text
    is encoded and re-tokenised. The draws use torch's global generator, which ``train()`` seeds at
    every step, so a run (and its resumption) is deterministic.
    """

    name = "canonical"

    def __init__(self, synonym_neighbours: int = 50, synonym_min_cos: float = 0.95, synonym_wordnet: bool = False,
                 spelling_vocab: int = 50_000, substitution_rate: float = 0.0, tokenizer=None,
                 max_length: int | None = None, truncation: str = "head", criterion=None,
                 transform: SynonymEncoding | None = None, embedding=None, smoothing=None):

        if not 0.0 <= float(substitution_rate) <= 1.0:
            raise TightropeError(f"substitution_rate is a probability per word, got {substitution_rate}.")
        if substitution_rate and tokenizer is None:
            raise TightropeError("Random substitution re-tokenises the texts, so it needs the student's tokenizer.")
        if isinstance(tokenizer, str):

            tokenizer = models.load_tokenizer(models.resolve(tokenizer), tokenizer)
        self.criterion = criterion or cross_entropy
        self.input_transform = transform or build(synonym_neighbours, synonym_min_cos, synonym_wordnet, spelling_vocab)
        if smoothing is not None:  # a SmoothingConfig: copies, rate, seed
            # SAFER: the classifier is trained on the perturbations it will be smoothed over
            self.input_transform = with_smoothing(self.input_transform, smoothing.rate or substitution_rate,
                                                  smoothing.copies, smoothing.seed)
        self.substitution_rate, self.tokenizer = float(substitution_rate), tokenizer
        self.max_length, self.truncation = max_length, truncation
        self._embedding, self._candidates = embedding, {}

    def candidates(self, word: str) -> list[str]:
        """TextFooler's and PWWS's candidates for ``word`` (lower case), as their constraints allow them."""
        if word not in self._candidates:

            if self._embedding is None:

                self._embedding = default_embedding()
            pos = PartOfSpeech(allow_verb_noun_swap=True)
            (near,) = self._embedding.neighbours([word], 50, 0.5)
            found = [u for u, _ in near if pos.compatible(word, u)]
            try:
                found += [u for u in wordnet_synonyms(word) if u not in found]
            except MissingResourceError:
                pass  # no WordNet here: TextFooler's candidates alone
            self._candidates[word] = found
        return self._candidates[word]

    def substitute(self, text: str) -> str:
        smoothing = self.input_transform.smoothing
        if smoothing is not None:  # the very perturbation the smoothed model answers over, at the training rate
            return smoothing.perturb(text, random.Random(int(torch.randint(0, 2**62, ()))), self.substitution_rate)

        words = AttackedText.from_text(text)
        for i, word in enumerate(words.words):
            if word.lower() in TEXTFOOLER_STOPWORDS or float(torch.rand(())) >= self.substitution_rate:
                continue
            found = self.candidates(word.lower())
            if found:
                words = words.replace(i, recover_case(word, found[int(torch.randint(len(found), ()))]))
        return words.text

    def __call__(self, model, batch):
        if self.substitution_rate:
            if "texts" not in batch:
                raise TightropeError("Random substitution swaps words of the raw texts of each batch (a 'texts' key), "
                                     "which this training loop does not provide.")

            texts = [self.substitute(t) for t in batch["texts"]]
            width = self.max_length or int(batch["input_ids"].shape[1])
            ids = encode(self.tokenizer, self.input_transform(texts), width, self.truncation)
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            enc = collate(ids, pad)
            device = batch["input_ids"].device
            batch = {**batch, "input_ids": enc["input_ids"].to(device),
                     "attention_mask": enc["attention_mask"].to(device), "texts": texts}
        return self.criterion(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch)

    def describe(self) -> dict:
        return {"defense": "canonical", "input_transform": self.input_transform.card_entry(),
                "substitution_rate": self.substitution_rate,
                "criterion": getattr(self.criterion, "__name__", type(self.criterion).__name__)}


def load_transform(model_dir: str | Path, card: dict):
    """The input transform a model's card names (None when it has none)."""
    entry = card.get("input_transform")
    if not entry:
        return None
    if entry.get("kind") != KIND:
        raise TightropeError(f"The model in {model_dir} names an input transform '{entry.get('kind')}' "
                             "that this tightrope does not know.")
    return SynonymEncoding.load(model_dir, entry)


__all__ = ["FILE", "KIND", "SynonymEncoding", "SynonymEncodingTraining", "build", "candidate_table", "edits1",
           "load_transform", "sem_encoding", "with_smoothing"]
