"""The study file: one YAML document that declares the whole methodology of the seed paper.

baseline -> compress -> attack -> defend -> evaluate -> compare -> report (and, with ``search``,
the feedback loop). The schema rejects unknown keys everywhere (``extra="forbid"``) and every
error names the path of the bad key, e.g. ``compress.1.steps.0.sparsty``, so a typo fails
before any work starts.

Model names used across the file: ``baseline`` (the fine-tuned model), each defense's ``name``
(a model retrained or post-processed by that defense) and each compression variant's ``name``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from tightrope.errors import TightropeError, read_user_file

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    source: str = Field("minilm", description="Alias (minilm, mpnet-base), local directory or hub id.")
    fine_tuned: bool = Field(False, description="The source is already fine-tuned on the study's task: use it "
                             "as the baseline instead of training one (the train section is then unused).")
    trust_remote_code: bool = False


class DataSpec(_Strict):
    task: str = Field("rotten-tomatoes", description="Task name or data file.")
    data_dir: str | None = None
    n_train: int | None = Field(None, gt=0)
    n_eval: int = Field(500, gt=0, description="Validation examples evaluated after each epoch.")
    test_split: str = "test"
    n_test: int | None = Field(None, gt=0, description="Seeded subset of the test split (default: all).")
    max_length: int = Field(128, ge=8, le=4096)
    truncation: Literal["head", "head+tail"] = "head"


class TrainSpec(_Strict):
    n_train: int | None = Field(None, gt=0, description="Training examples (default: data.n_train).")
    epochs: float = Field(1.0, gt=0)
    lr: float = Field(5e-5, gt=0)
    batch_size: int = Field(16, gt=0)
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    warmup_ratio: float = Field(0.06, ge=0, lt=1)
    weight_decay: float = Field(0.01, ge=0)
    eval_every: int | None = Field(None, gt=0)
    patience: int | None = Field(None, gt=0)
    checkpoint_every: int = Field(50, gt=0)
    accord_every: int | None = Field(None, gt=0, description="Measure the gradient accord every N steps (Flooding-X's flood level).")


class CompressStep(_Strict):
    method: str = Field(description="A config class of tightrope.compress (Int8Dynamic, NF4, MagnitudePruning, ...).")
    params: dict[str, Any] = Field(default_factory=dict)


class VariantSpec(_Strict):
    name: str = Field(pattern=NAME_PATTERN)
    source: str = Field("baseline", description="The model to compress: baseline or a defense's name.")
    steps: list[CompressStep] = Field(min_length=1)


class PipelineSpec(_Strict):
    """A defense woven into compression (tightrope.defenses.pipeline): the model that ships is the hardened one.

    ``prune,quantize,train``: prune, then train through fake quantization of ``quantize`` with the
    sparsity held, then quantize for real. The student starts from the defense's ``source`` model.
    """

    order: str = Field("prune,quantize,train", description="Steps in order: prune, train, noise, quantize.")
    prune: CompressStep | None = None
    quantize: CompressStep | None = None
    noise: dict[str, Any] | None = Field(None, description="Keyword arguments of add_weight_noise_ (sigma, relative).")


class DefenseSpec(_Strict):
    name: str = Field(pattern=NAME_PATTERN)
    method: str = Field(description="A defense of tightrope.defenses (pgd, freelb, fast, distill).")
    source: str = Field("baseline", description="The model the defense starts from (or distils).")
    params: dict[str, Any] = Field(default_factory=dict)
    train: TrainSpec | None = Field(None, description="Training settings for defenses that retrain (default: train).")
    pipeline: PipelineSpec | None = Field(None, description="Start from the source model and weave the defense "
                                          "into pruning / quantization (default: retrain from the base model).")


class AttackSpec(_Strict):
    name: str | None = Field(None, pattern=NAME_PATTERN)
    recipe: str = Field(description="textfooler, pwws, deepwordbug, hotflip (text), or pgd, fgsm (embedding space; "
                        "params: epsilons, steps, step_size, norm).")
    n: int = Field(50, gt=0, description="Examples attacked (a seeded subset of the test split).")
    split: str | None = None
    targets: list[str] | None = Field(None, description="Models attacked (default: every model of the study).")
    params: dict[str, Any] = Field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.name or self.recipe


class EvaluateSpec(_Strict):
    batch_size: int = Field(64, gt=0)
    speed: bool = True
    memory: bool = True
    latency_seq_len: int = Field(128, ge=8)
    latency_runs: int = Field(30, gt=0)
    threads: int | None = Field(None, gt=0)


class ReportSpec(_Strict):
    title: str | None = None
    before: str = "baseline"
    after: str | None = Field(None, description="The model in Table I's 'after' column (default: the last one).")
    attack: str | None = Field(None, description="The attack whose success rate Table I shows (default: the first).")
    examples: int = Field(5, ge=0, description="Adversarial examples shown with their changes highlighted.")
    html: bool = True
    markdown: bool = True


class Range(_Strict):
    low: float
    high: float
    step: float | None = None
    log: bool = False

    @model_validator(mode="after")
    def _check(self):
        if self.high <= self.low:
            raise ValueError("high must be greater than low")
        return self


class SearchDefense(_Strict):
    """A defense the search may train from ``source`` before a trial compresses it.

    A list as the value of a setting (``params: {query_budget: [50, 100]}``, also inside ``distill``)
    is a grid axis: the entry stands for one defense per combination of its lists. Each setting is
    validated by :func:`tightrope.defenses.config.defense_config` before the search starts, as
    ``tightrope train --defense`` validates it.
    """

    name: str | None = Field(None, pattern=NAME_PATTERN, description="Label of the setting (default: the method).")
    method: str = Field(description="A defense of tightrope.defenses (pgd, fast, freelb, a2t, canonical, distill).")
    source: str = Field("baseline", description="The model the defense starts from: baseline or a study defense.")
    params: dict[str, Any] = Field(default_factory=dict, description="Its settings; a list is a grid of values.")
    train: TrainSpec | None = Field(None, description="Training settings (default: the study's train section).")

    def settings(self) -> list[tuple[str, dict[str, Any]]]:
        """Every (label, params) this entry stands for: one per combination of its grid axes, in order."""
        axes = grid_axes(self.params)
        base = self.name or self.method
        if not axes:
            return [(base, dict(self.params))]
        out = []
        for combo in itertools.product(*(values for _, values in axes)):
            params = json.loads(json.dumps(self.params))  # a deep copy of plain data
            for (path, _), value in zip(axes, combo):
                node = params
                for key in path[:-1]:
                    node = node[key]
                node[path[-1]] = value
            shown = ", ".join(f"{'.'.join(path)}={value}" for (path, _), value in zip(axes, combo))
            out.append((f"{base}({shown})", params))
        return out


def grid_axes(params: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], list]]:
    """The lists in ``params`` (nested mappings such as ``distill`` included): each is one grid axis."""
    axes = []
    for key, value in params.items():
        if isinstance(value, list):
            axes.append(((*prefix, key), value))
        elif isinstance(value, dict):
            axes += grid_axes(value, (*prefix, key))
    return axes


# An entry of search.defenses: a model name or a setting (tagged, so an error names the setting's bad key).
DefenseChoice = Annotated[Union[Annotated[str, Tag("tag-model")], Annotated[SearchDefense, Tag("tag-setting")]],
                          Discriminator(lambda v: "tag-model" if isinstance(v, str) else "tag-setting")]


class SearchSpec(_Strict):
    """The feedback loop: choices the search may combine, and what it optimizes.

    ``defenses`` is the defense dimension: each entry is either the name of a model of the study that
    compression may start from (``baseline``, undefended, or a name in the study's ``defenses``) or a
    defense setting (:class:`SearchDefense`) that the search trains itself. ``sources`` is the former
    name of ``defenses`` and is still read (its entries are model names). ``latency_ms``, the former
    latency objective (each trial's model timed alone, so its figure followed the machine's load), is
    read as ``latency``: the model's latency relative to the baseline's, timed in interleaved pairs.
    """

    trials: int = Field(20, gt=0)
    attack: str | list[str] | None = Field(None, description="The attack(s), by name, whose success rate the 'asr' "
                                           "objective takes (default: every attack of the study; the strongest counts).")
    objectives: list[Literal["accuracy", "asr", "latency", "memory_mb", "weight_mb"]] = Field(
        ["accuracy", "asr", "latency"], min_length=1, description="latency: the trial's batch-1 latency relative to "
        "the study's baseline, timed in interleaved pairs in one process (latency_ms, the former name, is read as it).")
    defenses: list[DefenseChoice] = Field(["baseline"], min_length=1, description="Models or defense settings "
                                                "each trial starts from (baseline: no defense).")
    quant: list[str] = Field(["none", "Int8Dynamic", "NF4"], min_length=1, description="Quantization methods ('none' allowed).")
    sparsity: list[float] | Range = [0.0, 0.3, 0.5]
    structured: list[bool] = Field([False], min_length=1)
    sampler: Literal["auto", "grid", "nsga2", "tpe", "random"] = Field(
        "auto", description="auto: a grid when the space is discrete and has at most 'trials' points, else nsga2.")

    @model_validator(mode="before")
    @classmethod
    def _former_names(cls, data):
        if isinstance(data, dict) and "sources" in data:
            if "defenses" in data:
                raise ValueError("sources is the former name of defenses; keep only defenses")
            data = {**data, "defenses": data["sources"]}
            del data["sources"]
        if isinstance(data, dict) and isinstance(data.get("objectives"), list):
            renamed = ["latency" if o == "latency_ms" else o for o in data["objectives"]]
            data = {**data, "objectives": list(dict.fromkeys(renamed))}
        return data

    @field_validator("sparsity")
    @classmethod
    def _sparsity(cls, v):
        values = [v.low, v.high] if isinstance(v, Range) else v
        if any(not 0 <= s < 1 for s in values):
            raise ValueError("sparsity must lie in [0, 1)")
        return v

    def defense_choices(self) -> dict[str, str | tuple[SearchDefense, dict[str, Any]]]:
        """Every value of the defense dimension by label: a model name, or (entry, its params)."""
        out: dict[str, str | tuple[SearchDefense, dict[str, Any]]] = {}
        for entry in self.defenses:
            if isinstance(entry, str):
                out[entry] = entry
            else:
                out.update({label: (entry, params) for label, params in entry.settings()})
        return out

    def space(self) -> dict[str, list] | None:
        """The discrete search space (parameter -> choices), or None when sparsity is a continuous range."""
        if isinstance(self.sparsity, Range):
            return None
        return {"defense": list(self.defense_choices()), "quant": list(self.quant), "sparsity": list(self.sparsity),
                "structured": list(self.structured)}

    def space_size(self) -> int | None:
        space = self.space()
        return None if space is None else math.prod(len(v) for v in space.values())

    def resolved_sampler(self) -> str:
        """``auto`` resolved: a grid when the space is discrete and ``trials`` can cover it, else NSGA-II."""
        if self.sampler != "auto":
            return self.sampler
        size = self.space_size()
        return "grid" if size is not None and size <= self.trials else "nsga2"

    def attack_labels(self) -> list[str] | None:
        return None if self.attack is None else [self.attack] if isinstance(self.attack, str) else list(self.attack)

    def fingerprint(self) -> str:
        """Hash of the search space and objectives (not of trials or sampler): an Optuna study explores one space."""
        payload = self.model_dump(mode="json", include={"attack", "objectives", "defenses", "quant", "sparsity",
                                                        "structured"})
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:8]


class StudySpec(_Strict):
    name: str = Field(pattern=NAME_PATTERN)
    description: str = ""
    seed: int = 0
    model: ModelSpec = ModelSpec()
    data: DataSpec = DataSpec()
    train: TrainSpec = TrainSpec()
    defenses: list[DefenseSpec] = []
    compress: list[VariantSpec] = []
    attacks: list[AttackSpec] = []
    evaluate: EvaluateSpec = EvaluateSpec()
    report: ReportSpec = ReportSpec()
    search: SearchSpec | None = None

    @model_validator(mode="after")
    def _references(self):
        names = ["baseline"]
        for section, items in (("defenses", self.defenses), ("compress", self.compress)):
            for i, item in enumerate(items):
                if item.name in names:
                    raise ValueError(f"{section}.{i}.name: the model name '{item.name}' is used twice")
                if item.source not in names:
                    raise ValueError(f"{section}.{i}.source: '{item.source}' is not a model defined before it "
                                     f"(known: {', '.join(names)})")
                names.append(item.name)
        labels = [a.label for a in self.attacks]
        for i, attack in enumerate(self.attacks):
            if labels.count(attack.label) > 1:
                raise ValueError(f"attacks.{i}.name: two attacks are called '{attack.label}'; give each a name")
            for j, target in enumerate(attack.targets or []):
                if target not in names:
                    raise ValueError(f"attacks.{i}.targets.{j}: unknown model '{target}' (known: {', '.join(names)})")
        for key in ("before", "after"):
            value = getattr(self.report, key)
            if value is not None and value not in names:
                raise ValueError(f"report.{key}: unknown model '{value}' (known: {', '.join(names)})")
        if self.report.attack is not None and self.report.attack not in labels:
            raise ValueError(f"report.attack: no attack is called '{self.report.attack}' (known: {', '.join(labels)})")
        if self.search is not None:
            for attack in self.search.attack_labels() or []:
                if attack not in labels:
                    raise ValueError(f"search.attack: no attack is called '{attack}' (known: {', '.join(labels)})")
            if "asr" in self.search.objectives and not self.attacks:
                raise ValueError("search.objectives: 'asr' needs at least one attack in attacks")
            seen: list[str] = []
            for j, entry in enumerate(self.search.defenses):
                if not isinstance(entry, str) and entry.name in names:
                    raise ValueError(f"search.defenses.{j}.name: '{entry.name}' is a model of the study; give the "
                                     "setting another name, or list the model by its name alone")
                for label in [entry] if isinstance(entry, str) else [label for label, _ in entry.settings()]:
                    if label in seen:
                        raise ValueError(f"search.defenses.{j}: the setting '{label}' appears twice; give each "
                                         "entry a name")
                    seen.append(label)
            if self.search.sampler == "grid" and isinstance(self.search.sparsity, Range):
                raise ValueError("search.sampler: a grid needs a discrete space; give sparsity as a list of values")
            starts = names[: 1 + len(self.defenses)]
            for j, entry in enumerate(self.search.defenses):
                model, where = (entry, f"search.defenses.{j}") if isinstance(entry, str) else \
                    (entry.source, f"search.defenses.{j}.source")
                if model not in starts:
                    raise ValueError(f"{where}: '{model}' is neither baseline nor a defense of the study "
                                     f"(known: {', '.join(starts)})")
        return self

    @property
    def model_names(self) -> list[str]:
        return ["baseline", *(d.name for d in self.defenses), *(v.name for v in self.compress)]

    def fingerprint(self) -> str:
        """Hash of everything that decides the results (the description and report layout excluded)."""
        payload = self.model_dump(mode="json", exclude={"description", "report", "search"})
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _where(loc: tuple) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def validation_message(err: ValidationError, source: str) -> str:
    """One sentence naming the bad key's path (and how many other problems there are)."""
    first = err.errors()[0]
    loc = tuple(p for p in first["loc"] if not (isinstance(p, str) and p.startswith(("function-", "list[", "float", "tag-"))))
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        text = f"unknown key '{_where(loc)}'"
        parent = _lookup_model(loc[:-1])
        if parent is not None:
            text += f" (allowed here: {', '.join(parent.model_fields)})"
    elif first["type"] == "missing":
        text = f"the key '{_where(loc)}' is required"
    elif ": " in msg and first["type"] == "value_error" and not loc:
        text = msg  # our reference checks already start with the path
    else:
        text = f"{_where(loc)}: {msg}"
    more = len(err.errors()) - 1
    return f"{source}: {text}" + (f" (and {more} more problem{'s' * (more > 1)})." if more else ".")


def _lookup_model(loc: tuple):
    model: Any = StudySpec
    for part in loc:
        if isinstance(part, int):
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return None
        ann = field.annotation
        candidates = [ann]
        for cand in candidates:  # grows while it is read: every type nested in list[...], unions, Annotated
            candidates += [a for a in getattr(cand, "__args__", ()) if a not in candidates]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return None
    return model


def parse_spec(data: Any, source: str = "study") -> StudySpec:
    if not isinstance(data, dict):
        raise TightropeError(f"{source}: a study is a YAML mapping of keys (name, model, data, ...), "
                             f"not a {type(data).__name__}.")
    try:
        return StudySpec.model_validate(data)
    except ValidationError as err:
        raise TightropeError(validation_message(err, source)) from None


def load_spec(path: str | Path) -> StudySpec:
    """Read and validate a study file; any problem is one TightropeError sentence."""
    text = read_user_file(path, "study file")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise TightropeError(f"{path} is not valid YAML{where}: {problem}.") from None
    return parse_spec(data, str(path))
