"""From a study spec to the list of steps the runner executes, and the checks done before any work."""

from __future__ import annotations

from pathlib import Path

from tightrope.study import steps as step_kinds  # noqa: F401 - registers the step kinds
from tightrope.study.runner import RunResult, Step, run_steps, write_result
from tightrope.study.spec import StudySpec, TrainSpec


def train_inputs(spec: StudySpec, train: TrainSpec | None = None) -> dict:
    """The TrainConfig of the study's baseline (or of a defense that retrains), as JSON."""
    from tightrope.train import TrainConfig  # noqa: PLC0415

    t = train or spec.train
    d = spec.data
    config = TrainConfig(
        model=spec.model.source, task=d.task, data_dir=d.data_dir, n_train=d.n_train, n_eval=d.n_eval,
        max_length=d.max_length, truncation=d.truncation, batch_size=t.batch_size, epochs=t.epochs, lr=t.lr,
        weight_decay=t.weight_decay, warmup_ratio=t.warmup_ratio, schedule=t.schedule, seed=spec.seed,
        eval_every=t.eval_every, patience=t.patience, checkpoint_every=t.checkpoint_every,
        trust_remote_code=spec.model.trust_remote_code,
    )
    return config.model_dump()


def evaluate_inputs(spec: StudySpec) -> dict:
    e = spec.evaluate
    return {"task": spec.data.task, "split": spec.data.test_split, "n": spec.data.n_test, "seed": spec.seed,
            "data_dir": spec.data.data_dir, "batch_size": e.batch_size, "speed": e.speed, "memory": e.memory,
            "latency_seq_len": e.latency_seq_len, "latency_runs": e.latency_runs, "threads": e.threads}


def compression_defaults(spec: StudySpec) -> dict:
    """Settings filled into methods that have them: calibrate on the study's task, at its length."""
    return {"calibration_texts": spec.data.task, "max_length": spec.data.max_length, "seed": spec.seed}


def compress_inputs(spec: StudySpec, steps: list[dict]) -> dict:
    return {"steps": steps, "defaults": compression_defaults(spec)}


def attack_inputs(spec: StudySpec, attack) -> dict:
    return {"recipe": attack.recipe, "task": spec.data.task, "split": attack.split or spec.data.test_split,
            "n": attack.n, "seed": spec.seed, "data_dir": spec.data.data_dir, "params": dict(attack.params)}


def plan_study(spec: StudySpec) -> tuple[list[Step], dict[str, str]]:
    """All steps of a study in order, and which step produces each named model."""
    steps = [Step("train/baseline", "train", train_inputs(spec))]
    producer = {"baseline": "train/baseline"}
    for d in spec.defenses:
        inputs = {"method": d.method, "params": dict(d.params), "seed": spec.seed,
                  "train": train_inputs(spec, d.train)}
        steps.append(Step(f"defend/{d.name}", "defend", inputs, (producer[d.source],)))
        producer[d.name] = f"defend/{d.name}"
    for v in spec.compress:
        inputs = compress_inputs(spec, [s.model_dump() for s in v.steps])
        steps.append(Step(f"compress/{v.name}", "compress", inputs, (producer[v.source],)))
        producer[v.name] = f"compress/{v.name}"
    for name in spec.model_names:
        steps.append(Step(f"evaluate/{name}", "evaluate", evaluate_inputs(spec), (producer[name],)))
    for attack in spec.attacks:
        for target in attack.targets or spec.model_names:
            steps.append(Step(f"attack/{attack.label}/{target}", "attack", attack_inputs(spec, attack),
                              (producer[target],)))
    return steps, producer


def preflight(spec: StudySpec) -> None:
    """Everything that can be checked cheaply before work starts: model, data, methods, capabilities."""
    from tightrope import models  # noqa: PLC0415
    from tightrope.data import load_task  # noqa: PLC0415

    resolved = models.resolve(spec.model.source)
    models._check_source(spec.model.source, resolved)  # noqa: SLF001 - the loader's own existence check
    models._load_config(resolved, spec.model.source, spec.model.trust_remote_code)  # noqa: SLF001
    load_task(spec.data.task, spec.data.test_split, n=1, data_dir=spec.data.data_dir)
    for i, v in enumerate(spec.compress):
        for j, s in enumerate(v.steps):
            step_kinds.compression_config(s.method, s.params, f"compress.{i}.steps.{j}", compression_defaults(spec))
    if spec.attacks:
        step_kinds._require("tightrope.attacks", "text attacks")  # noqa: SLF001
    if spec.defenses:
        step_kinds._require("tightrope.defenses", "defenses")  # noqa: SLF001


def identity(spec: StudySpec) -> dict:
    return {"kind": "tightrope.study", "name": spec.name, "fingerprint": spec.fingerprint()}


def run_study(spec: StudySpec, out: str | Path, *, progress: bool = True, report: bool = True) -> RunResult:
    """Run a whole study under ``out`` (resuming a previous run of the same study) and write its report."""
    out = Path(out)
    steps, producer = plan_study(spec)
    preflight(spec)
    result = run_steps(steps, out, identity=identity(spec), progress=progress)
    write_result(out / "spec.json", {**spec.model_dump(mode="json"), "_producers": producer})
    if report:
        from tightrope.report.render import render_report  # noqa: PLC0415

        render_report(out)
    return result
