"""The step kinds of a study: one small adapter per library function.

Each adapter turns JSON inputs (and the results of the steps it depends on) into one call of a
tightrope library function and a JSON result. Wiring a new capability is one more adapter.
Capabilities that are not in this build (``tightrope.compress`` handlers, ``tightrope.attacks``,
``tightrope.defenses``) are imported lazily and fail with one sentence that says so.

By convention a step's first dependency is the model it works on; its result holds
``model_dir`` (relative to the run root) when the step produces a model.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import shutil
from pathlib import Path
from typing import Any

import tightrope.compress as compress_mod
from tightrope import inference, models, workflows
from tightrope.attacks import Attacker, recipes
from tightrope.attacks.attacker import read_results
from tightrope.attacks.embedding import EmbeddingAttack, accuracy_under_attack
from tightrope.compress import api, formats, quant
from tightrope.data import load_task
from tightrope.defenses.config import build_objective, defense_config
from tightrope.defenses.fakequant import fake_quantized
from tightrope.defenses.pipeline import run_pipeline, scheme_for
from tightrope.defenses.run import harden, prepare
from tightrope.errors import TightropeError
from tightrope.evaluate import perf
from tightrope.inference import transform_card, transform_files
from tightrope.progress import say
from tightrope.study.runner import StepContext, register_step
from tightrope.train import TrainConfig, input_transform_of, train
from tightrope.workflows.compress import run_steps
from tightrope.workflows.evaluate import evaluate_model


def source_model(deps: dict[str, dict], ctx: StepContext) -> str:
    """The model directory this step works on: the first dependency's ``model_dir``."""
    first = deps[ctx.step.deps[0]]
    return str(ctx.abs(first["model_dir"]))


# --- train ----------------------------------------------------------------------------------------


@register_step("train", resumable=True)  # train() resumes from its own checkpoint in the step folder
def train_step(inputs: dict, deps: dict, ctx: StepContext) -> dict:

    out = ctx.workdir / "model"
    card = train(TrainConfig(**inputs), out, progress=ctx.progress)
    return {"model_dir": ctx.rel(out), **_card_summary(card)}


def _card_summary(card: dict) -> dict:
    return {"best_validation_accuracy": card.get("metrics", {}).get("best_validation_accuracy"),
            "history": card.get("history", []), "train_seconds": card.get("train_seconds"),
            "steps": card.get("steps")}


@register_step("use-model")
def use_model_step(inputs: dict, deps: dict, ctx: StepContext) -> dict:
    """A model already fine-tuned on the study's task serves as the baseline (``model.fine_tuned``)."""

    path = Path(models.resolve(inputs["source"])).expanduser().resolve()
    if not path.is_dir():
        raise TightropeError(f"model.fine_tuned needs a local model directory, and {inputs['source']} is not one; "
                             "fine-tune it first (tightrope train) or set fine_tuned: false.")
    clf = workflows.load(str(path), trust_remote_code=inputs.get("trust_remote_code", False))
    return {"model_dir": str(path), "label_names": list(clf.label_names or []),
            "card": {k: clf.card.get(k) for k in ("tokenization", "data", "base_model") if k in clf.card}}


# --- evaluate -------------------------------------------------------------------------------------


@register_step("evaluate")
def evaluate_step(inputs: dict, deps: dict, ctx: StepContext) -> dict:
    import torch  # noqa: PLC0415


    threads = inputs.pop("threads", None)
    if threads:
        torch.set_num_threads(threads)
    result = evaluate_model(source_model(deps, ctx), progress=ctx.progress, **inputs)
    payload = result.to_dict()
    payload["model"] = deps[ctx.step.deps[0]]["model_dir"]  # relative, so the run folder can move
    return payload


@register_step("relative-latency")
def relative_latency_step(inputs: dict, deps: dict, ctx: StepContext) -> dict:
    """A model's batch-1 latency relative to a reference (the study's baseline: the second dependency),
    both in this process, timed in interleaved pairs on the same text and thread count
    (:func:`tightrope.evaluate.perf.relative_latency`); the absolute figures ride along."""
    import torch  # noqa: PLC0415

    if inputs.get("threads"):
        torch.set_num_threads(inputs["threads"])
    model_dep, reference_dep = (deps[name] for name in ctx.step.deps[:2])
    clf, reference = workflows.load(source_model(deps, ctx)), workflows.load(str(ctx.abs(reference_dep["model_dir"])))
    data = load_task(inputs["task"], inputs["split"], n=inputs["n"], seed=inputs["seed"], data_dir=inputs.get("data_dir"))
    seq_len = min([inputs["seq_len"], *(p for p in (_positions(clf), _positions(reference)) if p)])
    result = perf.relative_latency(clf, reference, max(data.texts, key=len), seq_len=seq_len, pairs=inputs["pairs"])
    return {**dataclasses.asdict(result), "model": model_dep["model_dir"], "reference": reference_dep["model_dir"]}


def _positions(clf) -> int | None:
    """The longest input a model's position table takes (None: unknown or unlimited)."""
    positions = getattr(getattr(getattr(clf, "model", None), "config", None), "max_position_embeddings", None)
    return positions if isinstance(positions, int) else None


# --- compress -------------------------------------------------------------------------------------


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def compression_classes() -> dict[str, type]:
    """Config classes of tightrope.compress by normalised name (``int8dynamic`` -> Int8Dynamic)."""
    classes: dict[str, type] = {}
    for module in ("tightrope.compress.quant", "tightrope.compress.prune", "tightrope.compress.recovery"):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name and module.startswith(err.name):
                continue
            raise
        for obj in vars(mod).values():
            if isinstance(obj, type) and issubclass(obj, api.CompressionConfig) and obj is not api.CompressionConfig:
                classes[_norm(obj.__name__)] = obj
    if not classes:
        raise TightropeError("compression is not available in this build (no methods in tightrope.compress).")
    return classes


def compression_config(method: str, params: dict[str, Any], where: str = "compress", defaults: dict | None = None):
    """Build one compression config, with errors naming the study path of the bad key.

    ``defaults`` (calibration task, max length, seed) fill the fields a method has and the study
    leaves unset, so Wanda or Taylor pruning calibrate on the study's own data.
    """
    classes = compression_classes()
    cls = classes.get(_norm(method))
    if cls is None:
        known = ", ".join(sorted(c.__name__ for c in classes.values()))
        raise TightropeError(f"{where}.method: unknown compression method '{method}' (known: {known}).")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in params:
        if key not in fields:
            raise TightropeError(f"{where}.params.{key}: {cls.__name__} has no setting '{key}' "
                                 f"(it has: {', '.join(fields)}).")
    values = {k: v for k, v in (defaults or {}).items() if k in fields and k not in params}
    values.update({k: tuple(v) if isinstance(v, list) else v for k, v in params.items()})
    try:
        return cls(**values)
    except TightropeError as err:
        raise TightropeError(f"{where}.params: {err}") from None
    except (TypeError, ValueError) as err:
        raise TightropeError(f"{where}.params: {cls.__name__}: {err}.") from None


@register_step("compress", resumable=True)  # a Recovery step resumes from its checkpoint in the step folder
def compress_step(inputs: dict, deps: dict, ctx: StepContext) -> dict:
    configs = [compression_config(s["method"], s.get("params", {}), f"compress step {i}", inputs.get("defaults"))
               for i, s in enumerate(inputs["steps"])]

    clf = workflows.load(source_model(deps, ctx))
    twin = None

    def before(config) -> None:
        nonlocal twin
        if _is_quantization(config) and twin is None:
            twin = _save_twin(clf.model, clf.tokenizer, clf.card, config, ctx.workdir / "twin")

    keep = {k: clf.card[k] for k in ("tokenization", "data", "task", "label_names", "base_model") if k in clf.card}
    summaries = [s.to_dict() for s in run_steps(clf, configs, card={**keep, **transform_card(clf)}, before=before,
                                                work_dir=ctx.workdir / "recovery", progress=ctx.progress)]
    out = ctx.workdir / "model"
    _save_compressed(clf, out, summaries)
    shutil.rmtree(ctx.workdir / "recovery", ignore_errors=True)  # the recovered model is in "model" now
    return {"model_dir": ctx.rel(out), "summaries": summaries, **_twin_result(twin, ctx)}


def _save_compressed(clf, out: Path, summaries: list[dict]) -> None:
    # Keep what the source's card says about tokenization and data, so the variant is used as trained.

    card = {k: clf.card[k] for k in ("tokenization", "data", "base_model", "config") if k in clf.card}
    card["source_model"] = clf.source
    card.update(transform_card(clf))  # a defense applied to the input stays with the model
    formats.save_compressed(clf.model, clf.tokenizer, out, card, files=transform_files(clf))


def _is_quantization(config) -> bool:

    return config.__class__.__module__ == quant.__name__


def _save_twin(model, tokenizer, card: dict, config, out: Path) -> dict | None:
    """The differentiable twin of a quantized variant: its full-precision weights just before the real
    quantization, and the fake-quantization scheme that reproduces the quantized weights' values.

    Gradient attacks (PGD, FGSM) on a variant without gradients (ONNX Runtime, quantized kernels) run on
    this twin through fake quantization; the study records that they did.
    """

    try:
        scheme = scheme_for(config)
    except TightropeError:
        return None
    twin_card = {k: card[k] for k in ("tokenization", "data", "base_model") if k in card}
    twin_card["twin_of"] = {"method": config.method, "scheme": scheme, "include": list(config.include),
                            "exclude": list(config.exclude)}
    formats.save_compressed(model, tokenizer, out, twin_card)  # only pruned or plain: saved as such
    return twin_card["twin_of"]


def _twin_result(twin: dict | None, ctx: StepContext) -> dict:
    return {"twin": {"model_dir": ctx.rel(ctx.workdir / "twin"), **twin}} if twin else {}


# --- attack ---------------------------------------------------------------------------------------

# Fields of each attacked example kept in the step result (the report and the weakness analysis
# read them); the full per-example records stay in the step folder's results.jsonl.
EXAMPLE_FIELDS = ("index", "status", "label", "original_text", "perturbed_text", "original_prediction",
                  "perturbed_prediction", "words", "words_perturbed", "modified_indices", "queries")


@register_step("attack", resumable=True)  # the Attacker keeps finished examples in the step folder
def attack_step(inputs: dict, deps: dict, ctx: StepContext) -> dict:

    clf = workflows.load(source_model(deps, ctx))
    data = load_task(inputs["task"], inputs["split"], n=inputs["n"], seed=inputs["seed"], data_dir=inputs.get("data_dir"))
    attack = recipes.build(inputs["recipe"], clf, **inputs.get("params", {}))

    def progress(result, done):
        if len(done) % 10 == 0 or len(done) == len(data):
            say(ctx.progress, f"  attacked {len(done)}/{len(data)}")
    report = Attacker(attack, out=ctx.workdir / "attack", seed=inputs["seed"]).run(clf, data, progress=progress)
    results = read_results(ctx.workdir / "attack" / "results.jsonl")
    payload = report.to_dict()
    payload["victim"] = deps[ctx.step.deps[0]]["model_dir"]
    payload["label_names"] = list(data.label_names)
    payload["examples_detail"] = [{k: getattr(r, k) for k in EXAMPLE_FIELDS} for r in sorted(results, key=lambda r: r.index)]
    return payload


# --- defend ---------------------------------------------------------------------------------------


def defense_of(inputs: dict, teacher: str | None = None):
    """The :class:`~tightrope.defenses.config.DefenseConfig` of a study's defense section, built by the
    same function as ``tightrope train --defense`` (its ``distill`` settings distil from ``teacher``)."""

    return defense_config(inputs["method"], inputs["params"], teacher=teacher)


@register_step("defend", resumable=True)  # train() resumes from its own checkpoint in the step folder
def defend_step(inputs: dict, deps: dict, ctx: StepContext) -> dict:
    """Retrain from the base model with a defense (the source model serves as teacher), as
    ``tightrope train --defense`` does; or weave it into compression (``pipeline``)."""

    config = TrainConfig(**inputs["train"])
    defense = defense_of(inputs, teacher=source_model(deps, ctx))
    if inputs.get("pipeline"):
        return _defend_in_pipeline(inputs, config, defense, deps, ctx)
    loaded, objective = prepare(config, defense)
    result = harden(loaded, objective, config, defense, ctx.workdir / "model", progress=ctx.progress)
    return {"model_dir": ctx.rel(result.model_dir), **_card_summary(result.card)}


def _defend_in_pipeline(inputs: dict, config, defense, deps: dict, ctx: StepContext) -> dict:
    """Start from the source model, prune / train / quantize in the study's order (the seed's
    "adversarial training integrated with quantization and pruning"), save what ships."""

    p = inputs["pipeline"]
    source = source_model(deps, ctx)
    clf = workflows.load(source)
    if type(clf) is not inference.TextClassifier:
        raise TightropeError(f"defense pipeline: the source model {source} is already compressed; "
                             "start from a full-precision model.")
    loaded = models.LoadedModel(clf.model, clf.tokenizer, source, source)
    labels = list(load_task(config.task, config.train_split, n=1, data_dir=config.data_dir).label_names)
    objective = build_objective(defense, student_labels=labels, student_tokenizer=clf.tokenizer,
                                max_length=config.max_length, truncation=config.truncation)

    clf.input_transform = input_transform_of(objective) or clf.input_transform  # saved with the model
    configs = {key: compression_config(p[key]["method"], p[key].get("params", {}), f"pipeline.{key}",
                                       inputs.get("defaults"))
               for key in ("prune", "quantize") if p.get(key)}
    result = run_pipeline(loaded, p["order"], ctx.workdir / "pipeline", train_config=config, objective=objective,
                          prune=configs.get("prune"), quantize=configs.get("quantize"), noise=p.get("noise"),
                          progress=ctx.progress, export=False)
    twin = None
    if "quantize" in configs:
        twin = _save_twin(loaded.model, loaded.tokenizer, clf.card, configs["quantize"], ctx.workdir / "twin")
        compress_mod.compress_(loaded.model, configs["quantize"])
    out = ctx.workdir / "model"
    _save_compressed(clf, out, [])  # clf.model is loaded.model, changed in place by the pipeline
    payload = {"model_dir": ctx.rel(out), "pipeline": result.to_dict(), **_twin_result(twin, ctx)}
    return {**payload, **_card_summary(result.train_card or {})}


# --- embedding-space attacks (PGD, FGSM) ------------------------------------------------------------


@register_step("attack-embedding")
def attack_embedding_step(inputs: dict, deps: dict, ctx: StepContext) -> dict:
    """Accuracy under PGD / FGSM on the input embeddings at each epsilon (Madry et al. 2018).

    ``params``: ``epsilons`` (list; the first is the one whose success rate the study reports, unless
    ``epsilon`` names another), ``steps``, ``step_size``, ``norm``, ``batch_size``. A quantized variant
    has no gradients with respect to its inputs (ONNX Runtime, integer kernels): it is attacked through
    its differentiable twin, its full-precision weights fake-quantized with the same scheme, and the
    result says so in ``gradient_source``.
    """
    import contextlib  # noqa: PLC0415


    params = dict(inputs.get("params", {}))
    epsilons = [float(e) for e in params.pop("epsilons", [params.get("epsilon", 0.01)])]
    main = float(params.pop("epsilon", epsilons[0]))
    if main not in epsilons:
        epsilons.insert(0, main)
    batch_size = int(params.pop("batch_size", 16))
    recipe = inputs["recipe"].lower()
    if recipe == "fgsm":
        attack = EmbeddingAttack.fgsm(epsilons[0], norm=params.pop("norm", "linf"))
    else:
        attack = EmbeddingAttack(epsilon=epsilons[0], seed=inputs["seed"], **params)
    dep = deps[ctx.step.deps[0]]
    twin = dep.get("twin")
    target = workflows.load(str(ctx.abs(twin["model_dir"]) if twin else source_model(deps, ctx)))
    if twin:

        guard = fake_quantized(target.model, twin["scheme"], tuple(twin["include"]), tuple(twin["exclude"]))
        gradient_source = f"differentiable twin: full-precision weights fake-quantized as {twin['scheme']}"
    else:
        guard = contextlib.nullcontext()
        gradient_source = "victim"
    data = load_task(inputs["task"], inputs["split"], n=inputs["n"], seed=inputs["seed"], data_dir=inputs.get("data_dir"))
    with guard:
        report = accuracy_under_attack(target, list(data.texts), list(data.labels), epsilons, attack,
                                       batch_size=batch_size, progress=ctx.progress)
    payload = report.to_dict()
    point = next(p for p in report.points if p.epsilon == main)
    payload.update({"victim": dep["model_dir"], "gradient_source": gradient_source, "epsilon": main,
                    "attack_success_rate": point.attack_success_rate,
                    "accuracy_under_attack": point.accuracy_under_attack})
    return payload
