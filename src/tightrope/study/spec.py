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
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from tightrope.errors import TightropeError

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


class SearchSpec(_Strict):
    """The feedback loop: choices the search may combine, and what it optimizes."""

    trials: int = Field(20, gt=0)
    attack: str | None = Field(None, description="The attack (by name) whose success rate is an objective.")
    objectives: list[Literal["accuracy", "asr", "latency_ms", "memory_mb", "weight_mb"]] = ["accuracy", "asr", "latency_ms"]
    sources: list[str] = ["baseline"]
    quant: list[str] = Field(["none", "Int8Dynamic", "NF4"], description="Quantization methods ('none' allowed).")
    sparsity: list[float] | Range = [0.0, 0.3, 0.5]
    structured: list[bool] = [False]
    sampler: Literal["nsga2", "tpe", "random"] = "nsga2"

    @field_validator("sparsity")
    @classmethod
    def _sparsity(cls, v):
        values = [v.low, v.high] if isinstance(v, Range) else v
        if any(not 0 <= s < 1 for s in values):
            raise ValueError("sparsity must lie in [0, 1)")
        return v


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
            if self.search.attack is not None and self.search.attack not in labels:
                raise ValueError(f"search.attack: no attack is called '{self.search.attack}' (known: {', '.join(labels)})")
            if "asr" in self.search.objectives and not self.attacks:
                raise ValueError("search.objectives: 'asr' needs at least one attack in attacks")
            for j, source in enumerate(self.search.sources):
                if source not in names[: 1 + len(self.defenses)]:
                    raise ValueError(f"search.sources.{j}: '{source}' is neither baseline nor a defense")
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
    loc = tuple(p for p in first["loc"] if not (isinstance(p, str) and p.startswith(("function-", "list[", "float"))))
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
        candidates = [ann, *getattr(ann, "__args__", ())]
        for cand in list(candidates):
            candidates += list(getattr(cand, "__args__", ()))
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
    path = Path(path)
    if not path.is_file():
        raise TightropeError(f"The study file {path} does not exist.")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise TightropeError(f"{path} is not valid YAML{where}: {problem}.") from None
    except UnicodeDecodeError:
        raise TightropeError(f"{path} is not a text file.") from None
    return parse_spec(data, str(path))
