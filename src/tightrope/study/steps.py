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
from pathlib import Path
from typing import Any

from tightrope.errors import TightropeError
from tightrope.study.runner import StepContext, register_step


def _require(module: str, what: str):
    """Import a capability of tightrope, or fail with "<what> is not available in this build"."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name and module.startswith(err.name):
            raise TightropeError(f"{what} is not available in this build (no {module}).") from None
        raise


def source_model(deps: dict[str, dict], ctx: StepContext) -> str:
    """The model directory this step works on: the first dependency's ``model_dir``."""
    first = deps[ctx.step.deps[0]]
    return str(ctx.abs(first["model_dir"]))


# --- train ----------------------------------------------------------------------------------------


@register_step("train", resumable=True)  # train() resumes from its own checkpoint in the step folder
def train_step(inputs: dict, deps: dict, ctx: StepContext) -> dict:
    from tightrope.train import TrainConfig, train  # noqa: PLC0415

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
    from tightrope import inference, models  # noqa: PLC0415

    path = Path(models.resolve(inputs["source"])).expanduser().resolve()
    if not path.is_dir():
        raise TightropeError(f"model.fine_tuned needs a local model directory, and {inputs['source']} is not one; "
                             "fine-tune it first (tightrope train) or set fine_tuned: false.")
    clf = inference.load(str(path), trust_remote_code=inputs.get("trust_remote_code", False))
    return {"model_dir": str(path), "label_names": list(clf.label_names or []),
            "card": {k: clf.card.get(k) for k in ("tokenization", "data", "base_model") if k in clf.card}}


# --- evaluate -------------------------------------------------------------------------------------


@register_step("evaluate")
def evaluate_step(inputs: dict, deps: dict, ctx: StepContext) -> dict:
    import torch  # noqa: PLC0415

    from tightrope.evaluate.run import evaluate_model  # noqa: PLC0415

    threads = inputs.pop("threads", None)
    if threads:
        torch.set_num_threads(threads)
    result = evaluate_model(source_model(deps, ctx), progress=ctx.progress, **inputs)
    payload = result.to_dict()
    payload["model"] = deps[ctx.step.deps[0]]["model_dir"]  # relative, so the run folder can move
    return payload


# --- compress -------------------------------------------------------------------------------------


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def compression_classes() -> dict[str, type]:
    """Config classes of tightrope.compress by normalised name (``int8-dynamic`` -> Int8Dynamic)."""
    api = _require("tightrope.compress.api", "compression")
    classes: dict[str, type] = {}
    for module in ("tightrope.compress.quant", "tightrope.compress.prune"):
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


@register_step("compress")
def compress_step(inputs: dict, deps: dict, ctx: StepContext) -> dict:
    compress_mod = _require("tightrope.compress", "compression")
    configs = [compression_config(s["method"], s.get("params", {}), f"compress step {i}", inputs.get("defaults"))
               for i, s in enumerate(inputs["steps"])]
    from tightrope import inference  # noqa: PLC0415

    clf = inference.load(source_model(deps, ctx))
    summaries, twin = [], None
    for config in configs:
        if _is_quantization(config) and twin is None:
            twin = _save_twin(clf.model, clf.tokenizer, clf.card, config, ctx.workdir / "twin")
        summaries.append(compress_mod.compress_(clf.model, config).to_dict())
    out = ctx.workdir / "model"
    _save_compressed(clf, out, summaries)
    return {"model_dir": ctx.rel(out), "summaries": summaries, **_twin_result(twin, ctx)}


def _save_compressed(clf, out: Path, summaries: list[dict]) -> None:
    formats = _require("tightrope.compress.formats", "saving compressed models")
    # Keep what the source's card says about tokenization and data, so the variant is used as trained.
    from tightrope.inference import transform_card, transform_files  # noqa: PLC0415

    card = {k: clf.card[k] for k in ("tokenization", "data", "base_model", "config") if k in clf.card}
    card["source_model"] = clf.source
    card.update(transform_card(clf))  # a defense applied to the input stays with the model
    formats.save_compressed(clf.model, clf.tokenizer, out, card, files=transform_files(clf))


def _is_quantization(config) -> bool:
    from tightrope.compress import quant  # noqa: PLC0415

    return config.__class__.__module__ == quant.__name__


def _save_twin(model, tokenizer, card: dict, config, out: Path) -> dict | None:
    """The differentiable twin of a quantized variant: its full-precision weights just before the real
    quantization, and the fake-quantization scheme that reproduces the quantized weights' values.

    Gradient attacks (PGD, FGSM) on a variant without gradients (ONNX Runtime, quantized kernels) run on
    this twin through fake quantization; the study records that they did.
    """
    from tightrope.defenses.pipeline import scheme_for  # noqa: PLC0415

    try:
        scheme = scheme_for(config)
    except TightropeError:
        return None
    formats = _require("tightrope.compress.formats", "saving compressed models")
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


@register_step("attack", resumable=True)  # Attack.run keeps finished examples in the step folder
def attack_step(inputs: dict, deps: dict, ctx: StepContext) -> dict:
    attacks = _require("tightrope.attacks", "text attacks")
    from tightrope import inference  # noqa: PLC0415
    from tightrope.data import load_task  # noqa: PLC0415

    clf = inference.load(source_model(deps, ctx))
    data = load_task(inputs["task"], inputs["split"], n=inputs["n"], seed=inputs["seed"], data_dir=inputs.get("data_dir"))
    attack = attacks.build(inputs["recipe"], clf, **inputs.get("params", {}))
    progress = None
    if ctx.progress:
        from rich.console import Console  # noqa: PLC0415

        console = Console(stderr=True)

        def progress(result, done):
            if len(done) % 10 == 0 or len(done) == len(data):
                console.log(f"  attacked {len(done)}/{len(data)}")
    report = attack.run(clf, data, out=ctx.workdir / "attack", seed=inputs["seed"], progress=progress)
    results = attacks.attack.read_results(ctx.workdir / "attack" / "results.jsonl")
    payload = report.to_dict()
    payload["victim"] = deps[ctx.step.deps[0]]["model_dir"]
    payload["label_names"] = list(data.label_names)
    payload["examples_detail"] = [{k: getattr(r, k) for k in EXAMPLE_FIELDS} for r in sorted(results, key=lambda r: r.index)]
    return payload


# --- defend ---------------------------------------------------------------------------------------


def defense_objective(method: str, params: dict, source_dir: str, label_names: list[str] | None = None):
    """The training objective ``(model, batch) -> loss`` of a defense named in a study file."""
    from tightrope.defenses import adversarial  # noqa: PLC0415

    params = dict(params)
    criterion = None
    distill = params.pop("distill", None)  # {a, temperature}: combine an adversarial defense with the seed's KD
    key = _norm(method)
    if key in ("distill", "distillation") or distill is not None:
        from tightrope import inference  # noqa: PLC0415
        from tightrope.defenses.distill import Distillation  # noqa: PLC0415

        kd = params if key in ("distill", "distillation") else distill
        criterion = Distillation(inference.load(source_dir), student_labels=label_names, **kd)
        if key in ("distill", "distillation"):
            return lambda model, batch: criterion(
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch)
    from tightrope.defenses.a2t import A2TTraining  # noqa: PLC0415
    from tightrope.defenses.canonical import SynonymEncodingTraining  # noqa: PLC0415

    a2t = lambda **kw: A2TTraining(kw.pop("tokenizer", source_dir), **kw)  # noqa: E731 - the student's tokenizer
    canonical = lambda **kw: SynonymEncodingTraining(tokenizer=kw.pop("tokenizer", source_dir), **kw)  # noqa: E731
    classes = {"pgd": adversarial.PGDTraining, "pgdtraining": adversarial.PGDTraining,
               "freelb": adversarial.FreeLB, "fast": adversarial.FastAdversarial,
               "fastadversarial": adversarial.FastAdversarial, "fgsm": adversarial.FastAdversarial,
               "a2t": a2t, "a2ttraining": a2t, "canonical": canonical, "synonymencoding": canonical}
    if key not in classes:
        raise TightropeError(f"Unknown defense '{method}'; choose one of pgd, freelb, fast, a2t, canonical, distill.")
    try:
        return classes[key](criterion=criterion, **params)
    except TypeError as err:
        raise TightropeError(f"defense {method}: {err}.") from None


@register_step("defend", resumable=True)  # train() resumes from its own checkpoint in the step folder
def defend_step(inputs: dict, deps: dict, ctx: StepContext) -> dict:
    """Retrain from the base model with a defense's objective (the source model serves as teacher)."""
    _require("tightrope.defenses", "defenses")
    from tightrope.data import load_task  # noqa: PLC0415
    from tightrope.train import TrainConfig, train  # noqa: PLC0415

    config = TrainConfig(**inputs["train"])
    labels = list(load_task(config.task, "train", n=1, data_dir=config.data_dir).label_names)
    objective = defense_objective(inputs["method"], inputs["params"], source_model(deps, ctx), labels)
    if inputs.get("pipeline"):
        return _defend_in_pipeline(inputs, config, objective, deps, ctx)
    out = ctx.workdir / "model"
    card = train(config, out, objective=objective, progress=ctx.progress,
                 extra_card={"defense": {"method": inputs["method"], "params": inputs["params"]}})
    return {"model_dir": ctx.rel(out), **_card_summary(card)}


def _defend_in_pipeline(inputs: dict, config, objective, deps: dict, ctx: StepContext) -> dict:
    """Start from the source model, prune / train / quantize in the study's order (the seed's
    "adversarial training integrated with quantization and pruning"), save what ships."""
    from tightrope import inference, models  # noqa: PLC0415
    from tightrope.defenses.pipeline import run_pipeline  # noqa: PLC0415

    p = inputs["pipeline"]
    source = source_model(deps, ctx)
    clf = inference.load(source)
    if type(clf) is not inference.TextClassifier:
        raise TightropeError(f"defense pipeline: the source model {source} is already compressed; "
                             "start from a full-precision model.")
    loaded = models.LoadedModel(clf.model, clf.tokenizer, source, source)
    from tightrope.train import input_transform_of  # noqa: PLC0415

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
        compress_mod = _require("tightrope.compress", "compression")
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

    from tightrope import inference  # noqa: PLC0415
    from tightrope.attacks.embedding import EmbeddingAttack, accuracy_under_attack  # noqa: PLC0415
    from tightrope.data import load_task  # noqa: PLC0415

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
    target = inference.load(str(ctx.abs(twin["model_dir"]) if twin else source_model(deps, ctx)))
    if twin:
        from tightrope.defenses.fakequant import fake_quantized  # noqa: PLC0415

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
