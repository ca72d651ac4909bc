"""Attack recipes named after their papers, each stating its constraints with the paper's constants.

==============  =========================================================================================
textfooler      Jin et al., "Is BERT Really Robust?", AAAI 2020
pwws            Ren et al., "Generating Natural Language Adversarial Examples through Probability Weighted
                Word Saliency", ACL 2019
deepwordbug     Gao et al., "Black-box Generation of Adversarial Text Sequences to Evade Deep Learning
                Classifiers", IEEE S&P Workshops 2018
hotflip         Ebrahimi et al., "HotFlip: White-Box Adversarial Examples for Text Classification", ACL 2018
==============  =========================================================================================

The compositions follow TextAttack 0.3's recipes of the same names, so that success rates compare.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from tightrope.attacks import resources
from tightrope.attacks.attack import Attack
from tightrope.attacks.chars import CharacterEdits
from tightrope.attacks.constraints import (
    LevenshteinEditDistance,
    MaxWordsPerturbed,
    PartOfSpeech,
    RepeatModification,
    SentenceSimilarity,
    StopwordModification,
    WordEmbeddingDistance,
)
from tightrope.attacks.counterfit import counter_fitted_embedding
from tightrope.attacks.goal import Untargeted
from tightrope.attacks.search import BeamSearch, GreedyWordSwapWIR
from tightrope.attacks.similarity import SentenceEncoder
from tightrope.attacks.words import WordSwapEmbedding, WordSwapGradient, WordSwapWordNet
from tightrope.errors import TightropeError

# TextFooler's sentence-similarity threshold with USE (TextAttack's recipe; Jin et al. tune epsilon per
# dataset) on an angular scale, and its window of 15 words. Applied nominally to the MiniLM substitute.
TEXTFOOLER_SIM_THRESHOLD = 0.840845057
TEXTFOOLER_WINDOW = 15
# Not in Jin et al.: tightrope caps the changed words at 30%, a guard that is rarely binding on IMDB
# (Jin et al. report 6.1% of words perturbed on IMDB against BERT, Table 3).
TEXTFOOLER_MAX_SHARE = 0.3


@lru_cache(maxsize=1)
def default_embedding():

    return counter_fitted_embedding()


@lru_cache(maxsize=1)
def default_encoder():

    return SentenceEncoder("minilm")


def stopwords() -> StopwordModification:
    return StopwordModification(resources.TEXTFOOLER_STOPWORDS, "TextFooler reference list (Jin et al. 2020)")


def textfooler(victim=None, *, embedding=None, encoder=None, query_budget=None, max_share=TEXTFOOLER_MAX_SHARE,
               sim_threshold=TEXTFOOLER_SIM_THRESHOLD, **_) -> Attack:
    """Jin et al. 2020: deletion importance (Eq. 2), N = 50 counter-fitted synonyms with cosine >= 0.5
    (delta), part-of-speech match, sentence similarity in a 15-word window, stopwords never changed."""
    embedding = embedding or default_embedding()
    encoder = encoder or default_encoder()
    constraints = [RepeatModification(), stopwords(), PartOfSpeech(allow_verb_noun_swap=True),
                   WordEmbeddingDistance(embedding, min_cos=0.5)]
    if max_share is not None:
        constraints.insert(2, MaxWordsPerturbed(max_share=max_share))
    constraints.append(SentenceSimilarity(encoder, threshold=sim_threshold, window=TEXTFOOLER_WINDOW))
    return Attack("textfooler", Untargeted(query_budget), constraints, WordSwapEmbedding(embedding, max_candidates=50),
                  GreedyWordSwapWIR("delete"), citation="Jin et al., AAAI 2020",
                  notes=["Sentence encoder: all-MiniLM-L6-v2 with mean pooling stands in for USE (not available offline).",
                         "Part of speech: WordNet's possible tags (context-free) stand in for a contextual tagger.",
                         "Synonyms: GloVe 6B 50d counter-fitted here (Mrkšić et al. 2016), not the published 300d vectors."])


def pwws(victim=None, *, query_budget=None, **_) -> Attack:
    """Ren et al. 2019: WordNet synonyms, words ranked by softmax(saliency) x best swap gain (Eq. 7-8)."""
    resources.wordnet()  # fail now, with the install command, if WordNet is missing
    return Attack("pwws", Untargeted(query_budget), [RepeatModification(), stopwords()], WordSwapWordNet(),
                  GreedyWordSwapWIR("weighted-saliency", unk_token=_unk(victim)), citation="Ren et al., ACL 2019")


def deepwordbug(victim=None, *, query_budget=None, max_edit_distance: int = 30, **_) -> Attack:
    """Gao et al. 2018: replace-1 scoring (a word replaced by an unknown token), then one random swap,
    substitution, deletion and insertion per word; Levenshtein distance <= 30 (TextAttack's recipe)."""
    return Attack("deepwordbug", Untargeted(query_budget),
                  [RepeatModification(), stopwords(), LevenshteinEditDistance(max_edit_distance)], CharacterEdits(),
                  GreedyWordSwapWIR("unk", unk_token=_unk(victim)), citation="Gao et al., IEEE S&P Workshops 2018")


def hotflip(victim=None, *, twin=None, embedding=None, query_budget=None, **_) -> Attack:
    """Ebrahimi et al. 2018 as in TextAttack's recipe: the top-1 gradient swap per word, at most 2 words
    changed, counter-fitted cosine >= 0.8, part-of-speech match, beam search of width 10.

    Gradients come from ``twin`` when the victim has none (an ONNX Runtime session, a quantized kernel);
    every query, and so every success, is on the victim itself.
    """
    source = twin if twin is not None else victim
    if source is None or not has_gradients(source):
        raise TightropeError(
            "HotFlip needs gradients, and this model has none; pass a differentiable twin (e.g. --twin with the "
            "full-precision model it was compressed from)."
        )
    embedding = embedding or default_embedding()
    transformation = WordSwapGradient(source, top_n=1)
    notes = [f"Gradients from the differentiable twin {source.source!r}; successes confirmed on the victim."] if twin is not None else []
    return Attack("hotflip", Untargeted(query_budget),
                  [RepeatModification(), stopwords(), MaxWordsPerturbed(max_words=2),
                   WordEmbeddingDistance(embedding, min_cos=0.8), PartOfSpeech(allow_verb_noun_swap=True)],
                  transformation, BeamSearch(beam_width=10), citation="Ebrahimi et al., ACL 2018", notes=notes)


def has_gradients(clf) -> bool:
    """Whether a classifier is a torch model whose input embeddings carry a gradient to the loss."""
    model = getattr(clf, "model", None)
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "get_input_embeddings"):
        return False
    try:
        with torch.enable_grad():
            ids = torch.tensor([[clf.pad_id, clf.pad_id]])
            embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
            model(inputs_embeds=embeds, attention_mask=torch.ones_like(ids)).logits.sum().backward()
        return embeds.grad is not None
    except (RuntimeError, NotImplementedError, AttributeError, TypeError):
        return False
    finally:
        model.zero_grad(set_to_none=True)


def _unk(victim) -> str:
    tokenizer = getattr(victim, "tokenizer", None)
    return getattr(tokenizer, "unk_token", None) or "[UNK]"


RECIPES = {"textfooler": textfooler, "pwws": pwws, "deepwordbug": deepwordbug, "hotflip": hotflip}


def build(name: str, victim=None, **options) -> Attack:
    """The recipe ``name`` for ``victim`` (options: query_budget, twin, embedding, encoder, ...)."""
    if name not in RECIPES:
        raise TightropeError(f"Unknown attack recipe '{name}'; choose one of {', '.join(RECIPES)}.")
    return RECIPES[name](victim, **options)
