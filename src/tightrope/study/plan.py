"""From a study spec to the list of steps the runner executes, and the checks done before any work."""

from __future__ import annotations

from pathlib import Path

from tightrope import models
from tightrope.data import load_task
from tightrope.defenses.config import check_fields, defense_config
from tightrope.defenses.pipeline import parse_order
from tightrope.errors import TightropeError
from tightrope.report.render import render_report
from tightrope.study import steps as step_kinds  # noqa: F401 - registers the step kinds
from tightrope.study.runner import RunResult, Step, run_steps, write_result
from tightrope.study.spec import StudySpec, TrainSpec
from tightrope.train import TrainConfig


def train_inputs(spec: StudySpec, train: TrainSpec | None = None) -> dict:
    """The TrainConfig of the study's baseline (or of a defense that retrains), as JSON."""

    t = train or spec.train
    d = spec.data
    config = TrainConfig(
        model=spec.model.source, task=d.task, data_dir=d.data_dir, n_train=t.n_train or d.n_train, n_eval=d.n_eval,
        max_length=d.max_length, truncation=d.truncation, batch_size=t.batch_size, epochs=t.epochs, lr=t.lr,
        weight_decay=t.weight_decay, warmup_ratio=t.warmup_ratio, schedule=t.schedule, seed=spec.seed,
        eval_every=t.eval_every, patience=t.patience, checkpoint_every=t.checkpoint_every,
        trust_remote_code=spec.model.trust_remote_code, accord_every=t.accord_every,
    )
    inputs = config.model_dump()
    if inputs["accord_every"] is None:  # a measurement left off: studies run before it existed keep their keys
        del inputs["accord_every"]
    return inputs


def evaluate_inputs(spec: StudySpec) -> dict:
    e = spec.evaluate
    return {"task": spec.data.task, "split": spec.data.test_split, "n": spec.data.n_test, "seed": spec.seed,
            "data_dir": spec.data.data_dir, "batch_size": e.batch_size, "speed": e.speed, "memory": e.memory,
            "latency_seq_len": e.latency_seq_len, "latency_runs": e.latency_runs, "threads": e.threads}


def latency_inputs(spec: StudySpec) -> dict:
    """A model's latency relative to the baseline's (step kind ``relative-latency``): the evaluation's
    text (the longest of the test subset), length, thread count, and ``latency_runs`` interleaved pairs."""
    e = spec.evaluate
    return {"task": spec.data.task, "split": spec.data.test_split, "n": spec.data.n_test, "seed": spec.seed,
            "data_dir": spec.data.data_dir, "seq_len": e.latency_seq_len, "pairs": e.latency_runs, "threads": e.threads}


def compression_defaults(spec: StudySpec) -> dict:
    """Settings filled into methods that have them: calibrate on the study's task, at its length."""
    return {"calibration_texts": spec.data.task, "max_length": spec.data.max_length, "seed": spec.seed}


def compress_inputs(spec: StudySpec, steps: list[dict]) -> dict:
    return {"steps": steps, "defaults": compression_defaults(spec)}


EMBEDDING_RECIPES = ("pgd", "fgsm")


def attack_kind(attack) -> str:
    """Text attacks query the model with words; PGD / FGSM perturb its input embeddings."""
    return "attack-embedding" if attack.recipe.lower() in EMBEDDING_RECIPES else "attack"


def model_fingerprint(source: str) -> str:
    """Name, size and modification time of a local model's files: a model retrained in place gets a new key."""
    import hashlib  # noqa: PLC0415


    path = Path(models.resolve(source))
    if not path.is_dir():
        return source
    stats = sorted((p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in path.iterdir() if p.is_file())
    return hashlib.sha256(repr(stats).encode()).hexdigest()[:16]


def baseline_step(spec: StudySpec) -> Step:
    if spec.model.fine_tuned:
        return Step("use/baseline", "use-model", {"source": spec.model.source,
                                                  "fingerprint": model_fingerprint(spec.model.source),
                                                  "trust_remote_code": spec.model.trust_remote_code})
    return Step("train/baseline", "train", train_inputs(spec))


def defense_inputs(spec: StudySpec, d) -> dict:
    inputs = {"method": d.method, "params": dict(d.params), "seed": spec.seed, "train": train_inputs(spec, d.train)}
    if d.pipeline is not None:
        inputs["pipeline"] = d.pipeline.model_dump()
        inputs["defaults"] = compression_defaults(spec)
    return inputs


def attack_inputs(spec: StudySpec, attack) -> dict:
    return {"recipe": attack.recipe, "task": spec.data.task, "split": attack.split or spec.data.test_split,
            "n": attack.n, "seed": spec.seed, "data_dir": spec.data.data_dir, "params": dict(attack.params)}


def plan_study(spec: StudySpec) -> tuple[list[Step], dict[str, str]]:
    """All steps of a study in order, and which step produces each named model."""
    first = baseline_step(spec)
    steps = [first]
    producer = {"baseline": first.name}
    for d in spec.defenses:
        steps.append(Step(f"defend/{d.name}", "defend", defense_inputs(spec, d), (producer[d.source],)))
        producer[d.name] = f"defend/{d.name}"
    for v in spec.compress:
        inputs = compress_inputs(spec, [s.model_dump() for s in v.steps])
        steps.append(Step(f"compress/{v.name}", "compress", inputs, (producer[v.source],)))
        producer[v.name] = f"compress/{v.name}"
    for name in spec.model_names:
        steps.append(Step(f"evaluate/{name}", "evaluate", evaluate_inputs(spec), (producer[name],)))
    for attack in spec.attacks:
        for target in attack.targets or spec.model_names:
            steps.append(Step(f"attack/{attack.label}/{target}", attack_kind(attack), attack_inputs(spec, attack),
                              (producer[target],)))
    return steps, producer


def preflight(spec: StudySpec) -> None:
    """Everything that can be checked cheaply before work starts: model, data, methods, capabilities."""

    resolved = models.resolve(spec.model.source)
    models._check_source(spec.model.source, resolved)  # noqa: SLF001 - the loader's own existence check
    models._load_config(resolved, spec.model.source, spec.model.trust_remote_code)  # noqa: SLF001
    load_task(spec.data.task, spec.data.test_split, n=1, data_dir=spec.data.data_dir)
    for i, v in enumerate(spec.compress):
        for j, s in enumerate(v.steps):
            step_kinds.compression_config(s.method, s.params, f"compress.{i}.steps.{j}", compression_defaults(spec))
    for i, d in enumerate(spec.defenses):
        for key in ("prune", "quantize"):
            s = getattr(d.pipeline, key, None) if d.pipeline is not None else None
            if s is not None:
                step_kinds.compression_config(s.method, s.params, f"defenses.{i}.pipeline.{key}", compression_defaults(spec))
        if d.pipeline is not None:

            parse_order(d.pipeline.order)
    for i, d in enumerate(spec.defenses):  # every defense's settings, as the CLI would check them
        try:
            check_fields(defense_config(d.method, d.params, teacher=d.source))
        except TightropeError as err:
            raise TightropeError(f"defenses.{i} ({d.name}): {err}") from None


def identity(spec: StudySpec) -> dict:
    return {"kind": "tightrope.study", "name": spec.name, "fingerprint": spec.fingerprint()}


def run_study(spec: StudySpec, out: str | Path, *, progress: bool = True, report: bool = True,
              update: bool = False, backend=None) -> RunResult:
    """Run a whole study under ``out`` (resuming a previous run of the same study) and write its report.

    ``update=True`` lets an edited study (same name) take over its earlier run directory, reusing every
    step whose settings did not change. ``backend`` runs the steps elsewhere (see
    :func:`tightrope.study.runner.run_steps`); None: in this process."""
    out = Path(out)
    steps, producer = plan_study(spec)
    preflight(spec)
    result = run_steps(steps, out, identity=identity(spec), progress=progress, update=update, backend=backend)
    write_result(out / "spec.json", {**spec.model_dump(mode="json"), "_producers": producer})
    if report:

        render_report(out)
    return result
