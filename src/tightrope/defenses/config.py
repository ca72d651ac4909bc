"""One validated description of a defense, shared by the CLI (``tightrope train --defense``) and study files.

Both build it through :func:`defense_config`, so a defense named the same way has the same settings
and defaults however it is reached (``tests/test_defenses_config.py`` checks every kind both ways).

``DefenseConfig(kind="pgd", epsilon=0.02, teacher="runs/bert-imdb", a=0.5)`` names everything a
training run needs; :func:`build_objective` turns it into the objective ``(model, batch) -> loss``
that :func:`tightrope.train.train` takes.

A setting that the chosen defense would ignore is refused with a sentence (an ``epsilon`` with the
discrete ``a2t`` defense, a query budget with ``pgd``, ``a`` without a teacher), never dropped
silently: :func:`build_objective` checks the fields that were set explicitly.
"""

from __future__ import annotations

import re
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tightrope import inference
from tightrope.defenses.a2t import A2TTraining
from tightrope.defenses.adversarial import DEFENSES, Criterion, cross_entropy
from tightrope.defenses.canonical import SynonymEncodingTraining
from tightrope.defenses.canonical import build as build_encoding
from tightrope.defenses.distill import Distillation
from tightrope.defenses.fakequant import QuantAware
from tightrope.defenses.flooding import Flooding
from tightrope.errors import TightropeError


class SmoothingConfig(BaseModel):
    """Randomized smoothing (SAFER, Ye et al. 2020; :class:`tightrope.transforms.Smoothing`): every
    prediction is the mean probability over ``copies`` copies of the text, each word swapped with
    probability ``rate`` (default: the defense's ``substitution_rate``) for a random attack candidate;
    the copies are seeded by ``seed`` and the text."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    copies: int = Field(ge=1, le=64)
    rate: float | None = Field(default=None, gt=0, le=1)
    seed: int = Field(default=0, ge=0)


class DefenseConfig(BaseModel):
    """A defense for training: adversarial kind, its attack, distillation, fake quantization."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["none", "pgd", "fast", "freelb", "a2t", "canonical"] = "none"
    epsilon: float = Field(default=0.02, ge=0)  # 0 is refused with a sentence by the attack itself
    steps: int = Field(default=3, ge=1)  # PGD-K / FreeLB ascent steps (fast: always 1)
    step_size: float | None = Field(default=None, gt=0)
    norm: Literal["linf", "l2"] = "linf"
    mix: float | None = Field(default=None, ge=0, le=1)  # weight of adversarial examples (default 1; a2t 0.5)
    init_magnitude: float = Field(default=0.1, ge=0)  # FreeLB only
    # a2t (discrete, Yoo and Qi 2021): share of each batch attacked, and the attack's budget
    adv_share: float = Field(default=0.5, gt=0, le=1)
    query_budget: int = Field(default=100, ge=1)  # candidate texts scored per attacked example
    max_candidates: int = Field(default=20, ge=1)  # counter-fitted neighbours tried per word
    max_share: float = Field(default=0.1, gt=0, le=1)  # share of words an attack may change
    min_words: int = Field(default=4, ge=0)  # ... but at least this many (A2T's min_threshold)
    min_cos: float = Field(default=0.5, ge=-1, le=1)  # cosine of a synonym to the original word
    wordnet_candidates: bool = False  # also try PWWS's WordNet synonyms
    synonym_encoding: bool = False  # a2t through the canonical defense's input transform (saved with the model)
    # a2t's budget version (tightrope.defenses.a2t_cache): every training text attacked once, kept in this folder
    # and read back at every epoch; "base" also reads a cache built against another model of the same base
    a2t_cache: str | None = None
    a2t_cache_reuse: Literal["model", "base"] = "model"
    a2t_cache_rebuild: bool = False  # replace a cache that does not serve this run (model, tokenizer, length, attack, texts)
    # canonical (synonym encoding, Wang et al. 2021; word recognition, Pruthi et al. 2019): the neighbour
    # sets clustered (TextFooler's 50 counter-fitted neighbours, kept from cosine 0.95 up, and optionally
    # PWWS's WordNet synonyms; see tightrope.defenses.canonical for why not cosine 0.5) and the
    # recogniser's vocabulary (0: no word recognition)
    synonym_neighbours: int = Field(default=50, ge=1)
    synonym_min_cos: float = Field(default=0.95, ge=-1, le=1)
    synonym_wordnet: bool = False
    spelling_vocab: int = Field(default=50_000, ge=0)
    substitution_rate: float = Field(default=0.0, ge=0, le=1)  # random swaps from the attacks' candidate sets
    smoothing: SmoothingConfig | None = None  # canonical: randomized smoothing at inference, saved with the model
    teacher: str | None = None  # a fine-tuned classifier: directory, alias or hub id
    a: float = Field(default=0.5, ge=0, le=1)  # weight of CE in a*CE + (1-a)*KD
    temperature: float = Field(default=2.0, gt=0)
    fake_quant: str | None = None  # a scheme of tightrope.defenses.fakequant (QAT)
    flood_level: float | None = Field(default=None, gt=0)  # flooding (Ishida et al. 2020) of any defense's loss


KINDS = get_args(DefenseConfig.model_fields["kind"].annotation)
# Other names a study file may give a defense's method (class names of tightrope.defenses, the paper's).
METHOD_ALIASES = {"pgdtraining": "pgd", "fastadversarial": "fast", "fgsm": "fast", "a2ttraining": "a2t",
                  "synonymencoding": "canonical", "distill": "none", "distillation": "none"}


def defense_config(method: str, params: dict | None = None, *, teacher: str | None = None) -> DefenseConfig:
    """The one way to build a :class:`DefenseConfig`, from the CLI and from a study file.

    ``method`` is a kind (``pgd``, ``fast``, ``freelb``, ``a2t``, ``canonical``, ``none``) or an alias
    (:data:`METHOD_ALIASES`; ``distill`` is ``none`` with a teacher). ``params`` are the config's fields;
    a study file's ``distill: {a, temperature}`` adds distillation from ``teacher`` (the defense's
    source model), as does the method ``distill``. An unknown method or field, or a value out of range,
    is one sentence.
    """
    key = re.sub(r"[^a-z0-9]", "", method.lower())
    kind = METHOD_ALIASES.get(key, key)
    if kind not in KINDS:
        raise TightropeError(f"Unknown defense '{method}'; choose one of {', '.join(KINDS)} (or distill).")
    fields = {k: v for k, v in (params or {}).items() if v is not None}
    distill = fields.pop("distill", None)
    if key in ("distill", "distillation"):
        distill, fields = fields, {}
    if distill is not None:
        if not isinstance(distill, dict):
            raise TightropeError(f"distill takes the distillation settings a and temperature, not {distill!r}.")
        if teacher is None and "teacher" not in fields:
            raise TightropeError("Distillation needs a teacher model.")
        fields = {**fields, "teacher": fields.get("teacher", teacher), **distill}
    try:
        return DefenseConfig(kind=kind, **fields)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "defense"
        raise TightropeError(f"The {method} defense: {where}: {first['msg']}.") from None


class Supervised:
    """Plain training with a criterion (cross-entropy or distillation): the 'none' defense."""

    name = "none"

    def __init__(self, criterion: Criterion | None = None):
        self.criterion = criterion or cross_entropy

    def __call__(self, model, batch):
        return self.criterion(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch)

    def describe(self) -> dict:
        return {"defense": "none", "criterion": getattr(self.criterion, "__name__", type(self.criterion).__name__)}


EMBEDDING_FIELDS = ("epsilon", "steps", "step_size", "norm", "init_magnitude")
CACHE_FIELDS = ("a2t_cache_reuse", "a2t_cache_rebuild")
A2T_FIELDS = ("adv_share", "query_budget", "max_candidates", "max_share", "min_words", "min_cos",
              "wordnet_candidates", "synonym_encoding", "a2t_cache", *CACHE_FIELDS)
ENCODING_FIELDS = ("synonym_neighbours", "synonym_min_cos", "synonym_wordnet", "spelling_vocab")
CANONICAL_FIELDS = (*ENCODING_FIELDS, "substitution_rate", "smoothing")
OWN_FIELDS = {"none": (), "pgd": ("epsilon", "steps", "step_size", "norm", "mix"),
              "fast": ("epsilon", "step_size", "norm", "mix"), "freelb": EMBEDDING_FIELDS,
              "a2t": ("mix", *A2T_FIELDS, *ENCODING_FIELDS), "canonical": CANONICAL_FIELDS}


def check_fields(config: DefenseConfig) -> None:
    """Refuse, in one sentence, attack settings that ``config.kind`` would ignore."""
    stray = [f for f in (*EMBEDDING_FIELDS, *A2T_FIELDS, *CANONICAL_FIELDS, "mix")
             if f in config.model_fields_set and f not in OWN_FIELDS[config.kind]]
    if stray:
        flags = ", ".join("--" + f.replace("_", "-") for f in dict.fromkeys(stray))
        if config.kind == "none":
            raise TightropeError(f"{flags} set a defense, but no defense is chosen; "
                                 "name one with --defense (pgd, fast, freelb, a2t or canonical).")
        raise TightropeError(f"The {config.kind} defense does not use {flags}; drop them or choose a defense that does.")
    if config.kind == "a2t" and not config.synonym_encoding and set(ENCODING_FIELDS) & config.model_fields_set:
        flags = ", ".join("--" + f.replace("_", "-") for f in ENCODING_FIELDS if f in config.model_fields_set)
        raise TightropeError(f"{flags} describe the synonym encoding, which a2t uses only with --synonym-encoding.")
    if config.a2t_cache is None and set(CACHE_FIELDS) & config.model_fields_set:
        flags = ", ".join("--" + f.replace("_", "-") for f in CACHE_FIELDS if f in config.model_fields_set)
        raise TightropeError(f"{flags} describe how an A2T cache is read, which needs --a2t-cache PATH.")
    if config.smoothing is not None and not (config.smoothing.rate or config.substitution_rate):
        raise TightropeError("Randomized smoothing swaps words with its rate (default: --substitution-rate); "
                             "give one of them, e.g. --smoothing copies=8,rate=0.5.")
    if config.teacher is None and {"a", "temperature"} & config.model_fields_set:
        raise TightropeError("a and temperature weigh the distillation loss, which needs a --teacher.")


def build_objective(config: DefenseConfig, *, student_labels: list[str] | None = None, student_tokenizer=None,
                    max_length: int | None = None, truncation: str = "head"):
    """The training objective that ``config`` describes (loads the teacher, if any).

    ``max_length`` / ``truncation`` are the training run's tokenization, with which the ``a2t``
    defense re-tokenises its adversarial texts (``student_tokenizer`` is required for it).
    """
    check_fields(config)
    criterion: Criterion = cross_entropy
    if config.teacher is not None:

        teacher = inference.load(config.teacher)
        criterion = Distillation(teacher, a=config.a, temperature=config.temperature, student_labels=student_labels,
                                 student_tokenizer=student_tokenizer)
    if config.flood_level is not None:
        criterion = Flooding(criterion, config.flood_level)
    mix = config.mix if config.mix is not None else (0.5 if config.kind == "a2t" else 1.0)
    if config.kind == "none":
        objective = Supervised(criterion)
    elif config.kind == "fast":
        objective = DEFENSES["fast"](epsilon=config.epsilon, step_size=config.step_size, norm=config.norm,
                                     mix=mix, criterion=criterion)
    elif config.kind == "a2t":

        if student_tokenizer is None:
            raise TightropeError("The a2t defense re-tokenises adversarial texts, so it needs the student's tokenizer.")
        objective = A2TTraining(student_tokenizer, adv_share=config.adv_share, mix=mix,
                                max_candidates=config.max_candidates, min_cos=config.min_cos,
                                max_share=config.max_share, min_words=config.min_words,
                                query_budget=config.query_budget, max_length=max_length, truncation=truncation,
                                criterion=criterion, wordnet=config.wordnet_candidates,
                                input_transform=(build_encoding(config.synonym_neighbours, config.synonym_min_cos,
                                                                config.synonym_wordnet, config.spelling_vocab)
                                                 if config.synonym_encoding else None),
                                cache=config.a2t_cache, cache_reuse=config.a2t_cache_reuse,
                                cache_rebuild=config.a2t_cache_rebuild)
    elif config.kind == "canonical":

        objective = SynonymEncodingTraining(config.synonym_neighbours, config.synonym_min_cos, config.synonym_wordnet,
                                            config.spelling_vocab, config.substitution_rate,
                                            tokenizer=student_tokenizer, max_length=max_length, truncation=truncation,
                                            criterion=criterion, smoothing=config.smoothing)
    elif config.kind == "freelb":
        if mix != 1.0:
            raise TightropeError("FreeLB averages the loss over its own ascent steps; it takes no mix ratio.")
        objective = DEFENSES["freelb"](epsilon=config.epsilon, steps=config.steps,
                                       step_size=config.step_size or 0.1, init_magnitude=config.init_magnitude,
                                       norm=config.norm, criterion=criterion)
    else:
        objective = DEFENSES["pgd"](epsilon=config.epsilon, steps=config.steps, step_size=config.step_size,
                                    norm=config.norm, mix=mix, criterion=criterion)
    if config.fake_quant is not None:

        objective = QuantAware(objective, scheme=config.fake_quant)
    return objective


__all__ = ["KINDS", "METHOD_ALIASES", "DefenseConfig", "SmoothingConfig", "Supervised", "build_objective", "check_fields", "defense_config"]
