"""Studies and searches on Ray (``tightrope run --ray`` and ``tightrope search --ray``), and the study's dry run.

``tightrope run --ray``: the unit of work is one study step. :class:`RayStepBackend` sends each step to a
Ray task (one CPU) as soon as the steps it depends on are finished; the task runs it with
:func:`tightrope.study.runner.run_step`, exactly as a local run does: under the step's lock file, its
``result.json`` written last and atomically. A step with a ``result.json`` is never run again, so a
killed worker (Ray runs its task again, up to three times), a killed driver or a lost node resumes
where it stopped, and no step is counted twice. The steps write their models into the run folder,
so on several machines every node must mount the run folder at the same path (a shared filesystem);
a worker that does not see it says so in one sentence.

``tightrope search --ray``: each Optuna trial is one Ray task. The driver alone samples (``study.ask``
and the study's own sampler, so two workers are never handed one grid point); each task opens the
store itself (``optuna.load_study``), runs the trial's steps through the same cached runner, and tells
its values to the store. The store (SQLite in the run folder, or PostgreSQL for several machines) is
the one source of truth: trials already complete there are not run again, and a trial whose
parameters equal a complete one's is answered from it (:func:`tightrope.study.search.study_objective`).

Ray is optional: it is imported only by the functions that need it, through
:func:`tightrope.workflows.ray_backend.connect`, so a local run never imports it.
"""

from __future__ import annotations

import heapq
import itertools
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tightrope.data import load_task
from tightrope.errors import TightropeError
from tightrope.progress import say
from tightrope.study.plan import EMBEDDING_RECIPES, identity, plan_study, preflight
from tightrope.study.runner import (
    RESULT_FILE,
    Step,
    StepRecord,
    claim_run_dir,
    finished_step,
    plan_keys,
    read_result,
    run_step,
)
from tightrope.study.search import (
    TrialSetting,
    open_search,
    open_storage,
    preflight_search,
    record_values,
    search_settings,
    study_objective,
    trial_setting,
    trial_steps,
    trials_left,
)
from tightrope.study.spec import StudySpec
from tightrope.workflows import ray_backend
from tightrope.workflows.sweep import FALLBACK_SECONDS, SECONDS_PER_EXAMPLE, duration, text_length

STEPS_RESUME = "the run folder keeps every finished step, so rerun the same command to resume"
TRIALS_RESUME = "the search store keeps every finished trial, so rerun the same command to resume"
RETRIES = 3  # a task whose worker dies is run again this many times (a step that kills its worker every time stops)


def check_run_folder(root: str | Path, expected: dict) -> None:
    """On a worker: the run folder the driver claimed is here, at the same path (a shared filesystem)."""
    import platform  # noqa: PLC0415

    marker = Path(root) / "study.json"
    try:
        held = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        held = None
    if held != expected:
        raise TightropeError(f"The node {platform.node()} does not see the run folder {root}: a study on several "
                             "machines needs its run folder on a filesystem every node mounts at the same path.")


# --- tightrope run --ray: one step, one task -----------------------------------------------------------------------


def _step_task(step: Step, key: str, deps: dict[str, StepRecord], root: str, expected: dict) -> StepRecord:
    """What a Ray worker runs: one step, as a local run runs it (reused when another run finished it). The
    worker imports this module to run it, and with it tightrope.study.plan, which registers the step kinds."""
    check_run_folder(root, expected)
    return run_step(step, key, deps, Path(root), False)


def _outcome(ray, ref, what: str, resume: str):
    """A finished task's value; what it raised, or the loss of its worker, as one sentence."""
    from ray.exceptions import RayError, RayTaskError  # noqa: PLC0415 - optional dependency, only with --ray

    try:
        return ray.get(ref)
    except RayTaskError as err:
        raise ray_backend.worker_error(err, what, resume) from err
    except RayError as err:
        raise TightropeError(f"The Ray worker running {what} was lost {RETRIES + 1} times ({type(err).__name__}); "
                             f"{resume}.") from err


def _workers(ray, workers: int | None) -> int:
    return workers or max(1, int(ray.cluster_resources().get("CPU", 1)))


class RayStepBackend:
    """Study steps as Ray tasks, one CPU each; ``workers`` steps at a time (None: one per CPU of the cluster)."""

    def __init__(self, address: str = "local", *, workers: int | None = None):
        if workers is not None and workers < 1:
            raise TightropeError("--workers must be at least 1.")
        self.address, self.workers = address, workers
        self.name = f"Ray ({address})"

    def run(self, steps: list[Step], keys: dict[str, str], root: Path, progress, on_step: Callable | None = None
            ) -> dict[str, StepRecord]:
        records: dict[str, StepRecord] = {}
        for step in steps:  # finished steps are read here; only the others become tasks
            record = finished_step(step, keys[step.name], root)
            if record is not None:
                records[step.name] = record
        waiting = [s for s in steps if s.name not in records]
        if not waiting:
            return records
        ray = ray_backend.connect(self.address, workers=self.workers, resume=STEPS_RESUME)

        n = _workers(ray, self.workers)
        say(progress, f"{len(waiting)} step(s) to run on {self.name}, {n} at a time")
        task = ray.remote(num_cpus=1, max_retries=RETRIES)(_step_task)
        root_path = str(Path(root).resolve())
        expected = json.loads((Path(root) / "study.json").read_text())
        inflight: dict = {}  # ref -> step
        try:
            while waiting or inflight:
                for step in list(waiting):
                    if len(inflight) >= n:
                        break
                    if all(d in records for d in step.deps):
                        waiting.remove(step)
                        say(progress, f"{step.kind} {step.name}")
                        inflight[task.remote(step, keys[step.name], {d: records[d] for d in step.deps}, root_path,
                                             expected)] = step
                ready, _ = ray.wait(list(inflight), num_returns=1)
                for ref in ready:
                    step = inflight.pop(ref)
                    record = _outcome(ray, ref, f"step {step.name}", STEPS_RESUME)
                    records[step.name] = record
                    if on_step:
                        on_step(record)
        finally:
            for ref in inflight:  # a failed step stops the run: the others stop too, and resume later
                ray.cancel(ref, force=True)
        return records


# --- tightrope search --ray: one trial, one task -------------------------------------------------------------------


def _trial_task(spec: StudySpec, out: str, storage: str, study_name: str, trial_id: int, worker: int) -> dict:
    """What a Ray worker runs: one trial the driver asked for, told to the store by this worker."""
    import optuna  # noqa: PLC0415 - the search's engine, only where trials run
    from optuna.trial import TrialState  # noqa: PLC0415

    check_run_folder(out, identity(spec))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    store = open_storage(storage)
    # the driver sampled every parameter; a worker never proposes one, so any sampler will do
    study = optuna.load_study(study_name=study_name, storage=store, sampler=optuna.samplers.RandomSampler())
    frozen = store.get_trial(trial_id)
    if frozen.state.is_finished():  # a task run again after its worker told the store and died
        return {"number": frozen.number, "state": frozen.state.name, "values": frozen.values}
    trial = optuna.Trial(study, trial_id)
    names = study.user_attrs["objectives"]
    try:
        values = study_objective(spec, out)(trial)
    except TightropeError as err:  # a failed setting is recorded and the search goes on, as in a local search
        study.tell(trial, state=TrialState.FAIL)
        return {"number": trial.number, "state": "FAIL", "error": str(err)}
    except Exception:
        study.tell(trial, state=TrialState.FAIL)
        raise
    told = study.tell(trial, record_values(trial, values, names, worker))
    return {"number": told.number, "state": told.state.name, "values": told.values}


def search_on_ray(spec: StudySpec, out: str | Path, *, storage: str, study_name: str, n_trials: int, address: str,
                  workers: int | None = None, progress: bool = True):
    """Run the study's search until the store holds ``n_trials`` complete trials, one Ray task per trial; returns
    the Optuna study."""
    if workers is not None and workers < 1:
        raise TightropeError("--workers must be at least 1.")
    preflight_search(spec)
    preflight(spec)
    claim_run_dir(Path(out), identity(spec))
    settings = search_settings(spec)
    study = open_search(storage=storage, study_name=study_name, progress=False, **settings)
    left = lambda: trials_left(study, n_trials, settings["sampler"], settings["space"])  # noqa: E731
    wanted = left()
    if wanted == 0:
        say(progress, f"the store already holds the {n_trials} trial(s) wanted")
        return study
    ray = ray_backend.connect(address, workers=workers, resume=TRIALS_RESUME)

    n = min(_workers(ray, workers), wanted)
    say(progress, f"{wanted} trial(s) to run on Ray ({address}), {n} at a time")
    task = ray.remote(num_cpus=1, max_retries=RETRIES)(_trial_task)
    out_path = str(Path(out).resolve())
    free, inflight, asked = list(range(n)), {}, 0
    try:
        while True:
            # like a local search, at most `wanted` trials this time, and none once the store holds enough
            while free and asked < wanted and left() > len(inflight):
                k = free.pop()
                trial = study.ask()
                trial_setting(spec, trial)  # the driver's sampler picks every parameter, one trial at a time
                say(progress, f"trial {trial.number} on worker {k}: {trial.params}")
                inflight[task.remote(spec, out_path, storage, study_name, trial._trial_id, k)] = (k, trial.number)  # noqa: SLF001 - the store's id of the trial
                asked += 1
            if not inflight:
                return study
            ready, _ = ray.wait(list(inflight), num_returns=1)
            for ref in ready:
                k, number = inflight.pop(ref)
                told = _outcome(ray, ref, f"trial {number}", TRIALS_RESUME)
                if told["state"] == "FAIL":
                    say(progress, f"trial {number} failed: {told.get('error', 'see the worker log')}")
                else:
                    say(progress, f"trial {number}: {told['values']}")
                free.append(k)
    finally:
        for ref in inflight:
            ray.cancel(ref, force=True)


# --- the dry run: steps left, CPU hours, wall time on N workers ----------------------------------------------------


@dataclass(frozen=True)
class StudyPlan:
    """What ``tightrope run`` would do: the steps left, each one's estimated seconds (None: not estimated)."""

    steps: int
    finished: int
    todo: tuple[tuple[Step, float | None], ...]
    seconds: dict[str, float]  # what an estimate is made of -> seconds per example (attacks) or per step
    source: dict[str, str]  # the same keys -> where the figure comes from
    unknown: dict[str, int] = field(default_factory=dict)  # kind -> steps left without an estimate

    @property
    def cpu_seconds(self) -> float:
        return sum(s for _, s in self.todo if s is not None)

    def wall_seconds(self, workers: int) -> float:
        """List scheduling in plan order on ``workers`` one-CPU workers, each step after the steps it needs."""
        ends: dict[str, float] = {}
        free = [0.0] * max(1, workers)
        heapq.heapify(free)
        for step, seconds in self.todo:
            ready = max((ends.get(d, 0.0) for d in step.deps), default=0.0)
            start = max(heapq.heappop(free), ready)
            ends[step.name] = start + (seconds or 0.0)
            heapq.heappush(free, ends[step.name])
        return max(ends.values(), default=0.0)

    def lines(self, workers) -> list[str]:
        kinds = Counter(step.kind for step, _ in self.todo)
        out = [f"{len(self.todo)} tasks: {len(self.todo)} of {self.steps} study steps still to run ({self.finished} "
               f"already in the run folder)" + (": " + ", ".join(f"{k} {c}" for k, c in sorted(kinds.items())) if kinds else ""),
               f"estimated CPU time: {self.cpu_seconds / 3600:.2f} CPU hours (one CPU per step)"]
        for key, seconds in self.seconds.items():
            out.append(f"  {key}: {seconds:.2f} s ({self.source[key]})")
        if self.unknown:
            left = ", ".join(f"{k} {c}" for k, c in sorted(self.unknown.items()))
            out.append(f"  not estimated (no finished step of the kind in this run folder yet), left out of the "
                       f"totals: {left}")
        for n in workers:
            out.append(f"expected wall time on {n} worker{'s' if n != 1 else ''}: {duration(self.wall_seconds(n))}")
        return out


def _finished_steps(root: Path) -> list[dict]:
    found = []
    for file in sorted(root.glob(f"steps/*/{RESULT_FILE}")):
        stored = read_result(file.parent)
        if stored is not None:
            found.append(stored)
    return found


def plan_run(spec: StudySpec, out: str | Path) -> StudyPlan:
    """The dry run of ``tightrope run``: from the study and the run folder alone (no model is loaded).

    A text attack costs its examples still to attack times the seconds per example measured in this run
    folder (its finished attack steps of the same recipe), else the attack dry run's table
    (:data:`tightrope.workflows.sweep.SECONDS_PER_EXAMPLE`); any other step costs the mean of the finished
    steps of its kind in this run folder, and is left out of the totals, and named, where there is none.
    """
    steps, _ = plan_study(spec)
    keys = plan_keys(steps)
    return plan_steps([(step, keys[step.name]) for step in steps], out)


def plan_search(spec: StudySpec, out: str | Path) -> StudyPlan:
    """The dry run of ``tightrope search``: every step of every point of the discrete search space, each
    step once (trials share their baseline, defenses and compressions), priced as :func:`plan_run` does.
    A search with fewer trials than points runs only some of them: the plan is its upper bound."""
    space = spec.search.space()
    if space is None:
        raise TightropeError("A dry run of a search needs a discrete space; give sparsity as a list of values.")
    names = list(space)
    unique: dict[str, Step] = {}
    for point in itertools.product(*(space[n] for n in names)):
        steps, _ = trial_steps(spec, TrialSetting(**dict(zip(names, point))))
        keys = plan_keys(steps)
        for step in steps:
            # trials name their own steps alike ("evaluate/trial"): a step is known by its key
            unique.setdefault(keys[step.name], Step(f"{step.name}@{keys[step.name]}", step.kind, step.inputs,
                                                    tuple(f"{d}@{keys[d]}" for d in step.deps)))
    return plan_steps([(step, key) for key, step in unique.items()], out)


def plan_steps(steps: list[tuple[Step, str]], out: str | Path) -> StudyPlan:
    """The plan of ``steps`` (each with its cache key) against what the run folder ``out`` holds."""
    root = Path(out)
    finished = _finished_steps(root) if root.is_dir() else []
    per_kind: dict[str, list[float]] = {}
    per_recipe: dict[str, list[tuple[float, int]]] = {}
    for stored in finished:
        per_kind.setdefault(stored.get("kind", "?"), []).append(float(stored.get("seconds", 0.0)))
        recipe = (stored.get("inputs") or {}).get("recipe")
        examples = (stored.get("result") or {}).get("examples")
        if stored.get("kind") == "attack" and recipe and examples:
            per_recipe.setdefault(recipe, []).append((float(stored.get("seconds", 0.0)), int(examples)))
    todo, seconds, source, unknown, done = [], {}, {}, Counter(), 0
    lengths: dict[tuple, tuple[str, int]] = {}
    for step, key in steps:
        if finished_step(step, key, root) is not None:
            done += 1
            continue
        recipe = step.inputs.get("recipe", "")
        if step.kind == "attack" and recipe.lower() not in EMBEDDING_RECIPES:
            i = step.inputs
            where = (i["task"], i["split"], i["n"], i["seed"], i.get("data_dir"))
            if where not in lengths:
                data = load_task(i["task"], i["split"], n=i["n"], seed=i["seed"], data_dir=i.get("data_dir"))
                lengths[where] = (text_length(data, list(range(len(data)))), len(data))
            length, n = lengths[where]
            n -= _attacked(root / f"steps/{step.kind}-{key}")
            key = f"attack {recipe}, per example"
            if recipe in per_recipe:
                total, count = map(sum, zip(*per_recipe[recipe]))
                seconds[key], source[key] = total / count, f"measured in this run: {count} examples"
            else:
                table = SECONDS_PER_EXAMPLE[length]
                seconds[key] = table.get(recipe, FALLBACK_SECONDS[length])
                source[key] = (f"measured on {'IMDB reviews, 256 tokens' if length == 'long' else 'MR sentences, 64 tokens'}, "
                               "1 thread" if recipe in table else "not measured: a guess")
            todo.append((step, seconds[key] * max(0, n)))
        elif per_kind.get(step.kind):
            key = f"{step.kind}, per step"
            runs = per_kind[step.kind]
            seconds[key], source[key] = sum(runs) / len(runs), f"mean of its {len(runs)} finished step(s) in this run"
            todo.append((step, seconds[key]))
        else:
            unknown[step.kind] += 1
            todo.append((step, None))
    return StudyPlan(steps=len(steps), finished=done, todo=tuple(todo), seconds=seconds, source=source,
                     unknown=dict(unknown))


def _attacked(step_dir: Path) -> int:
    """Examples an attack step killed half-way already keeps (it resumes from them)."""
    file = step_dir / "attack" / "results.jsonl"
    try:
        return sum(1 for line in file.read_text().splitlines() if line.strip())
    except OSError:
        return 0
