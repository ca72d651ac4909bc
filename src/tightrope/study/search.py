"""The feedback loop as a multi-objective search (Optuna), its Pareto front, and the model chosen.

The seed's loop "compress -> attack -> evaluate -> compare -> adjust" becomes an Optuna study:
each trial picks a defense (a model of the study such as the undefended baseline, or a defense
setting that the search trains from the baseline), a quantization method and a sparsity
(structured or not), runs those steps through the study runner (so everything already computed
by this or another trial is reused), and reports clean accuracy, the strongest attack's success
rate, latency relative to the study's baseline, and memory.

No setting is measured twice. On a discrete space with at most ``trials`` points the sampler is
a grid (Optuna's ``GridSampler``: each combination once); otherwise NSGA-II (Deb et al. 2002,
Optuna's ``NSGAIISampler``), and a trial that proposes the parameters of a completed trial is
answered from that trial (``duplicate_of``) instead of being run. Each step a trial needs is cached
by its inputs in the run directory, so trials that share a defense train it once.

The ``asr`` objective is the highest success rate over the study's attacks (``search.attack``
restricts them); each attack's rate is kept in the trial's ``asr_by_attack``.

The ``latency`` objective is a ratio: the trial's model and the study's baseline are timed in one
process, in alternating turns on the same input and thread count, and the objective is the median of
the per-pair ratios (:func:`tightrope.evaluate.perf.interleaved_ratio`; 0.62 = 0.62x the baseline's
time). A trial timed alone follows the load of whatever else runs on the machine (docs/search.md: 7.5
to 237 ms for models that take 3 to 9 ms side by side); the load scales both members of a pair, and
cancels in their ratio. The absolute times are kept in the trial as ``latency_ms`` and
``baseline_latency_ms``, for information. Searches stored before the ratio (objective ``latency_ms``)
are still read and summarised.

Storage: an embedded SQLite file (``<run>/search/optuna.db``) by default; any SQLAlchemy URL
otherwise, e.g. ``postgresql+psycopg2://user@host/db``, so that workers on several machines join
one search. The Pareto front is the set of complete trials that no other complete trial dominates
(:func:`pareto_front`; Optuna's ``study.best_trials`` computes the same set). The chosen model is
the front's member that meets the user's constraints (``--max-latency``, ``--min-accuracy``,
...) with the lowest attack success rate, ties broken by accuracy; it is exported as an ordinary
tightrope model directory whose card records the search.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from tightrope.defenses.config import check_fields, defense_config
from tightrope.errors import TightropeError
from tightrope.study.plan import (
    attack_inputs,
    attack_kind,
    compress_inputs,
    defense_inputs,
    evaluate_inputs,
    identity,
    latency_inputs,
    plan_study,
    preflight,
)
from tightrope.study.runner import Step, claim_run_dir, run_steps
from tightrope.study.spec import DefenseSpec, Range, SearchDefense, StudySpec
from tightrope.study.steps import compression_config

Direction = Literal["minimize", "maximize"]

# Direction of every objective a study search may use.
# ``latency_ms`` is the former, absolute latency objective: searches stored with it are still summarised.
OBJECTIVES: dict[str, Direction] = {"accuracy": "maximize", "asr": "minimize", "latency": "minimize",
                                    "latency_ms": "minimize", "memory_mb": "minimize", "weight_mb": "minimize"}


# --- pure maths -----------------------------------------------------------------------------------


def dominates(a: Sequence[float], b: Sequence[float], directions: Sequence[Direction]) -> bool:
    """True when ``a`` is at least as good as ``b`` on every objective and strictly better on one."""
    better = False
    for x, y, d in zip(a, b, directions):
        if d == "maximize":
            x, y = -x, -y
        if x > y:
            return False
        better |= x < y
    return better


def pareto_front(points: Sequence[Sequence[float]], directions: Sequence[Direction]) -> list[int]:
    """Indices of the points no other point dominates (O(n^2), fine for hundreds of trials)."""
    return [i for i, p in enumerate(points) if not any(dominates(q, p, directions) for j, q in enumerate(points) if j != i)]


@dataclass(frozen=True)
class Constraints:
    """User limits on the chosen model; None = no limit. ``max_latency`` bounds the latency relative to
    the baseline (0.8 = 0.8x), ``max_latency_ms`` the trial's absolute median (a figure that follows the
    machine's load)."""

    max_latency: float | None = None
    max_latency_ms: float | None = None
    min_accuracy: float | None = None
    max_asr: float | None = None
    max_memory_mb: float | None = None
    max_weight_mb: float | None = None

    def violations(self, values: dict[str, float]) -> list[str]:
        checks = [("latency", self.max_latency, 1), ("latency_ms", self.max_latency_ms, 1),
                  ("accuracy", self.min_accuracy, -1), ("asr", self.max_asr, 1),
                  ("memory_mb", self.max_memory_mb, 1), ("weight_mb", self.max_weight_mb, 1)]
        out = []
        for key, limit, sign in checks:
            if limit is None:
                continue
            value = values.get(key)
            if value is None or (value - limit) * sign > 0:
                out.append(key)
        return out


def choose(candidates: list[dict], constraints: Constraints, prefer: str = "asr") -> dict:
    """The candidate ({"number", "values", "attrs"}) meeting every constraint with the best ``prefer`` value.

    ``prefer`` is minimized (maximized for accuracy), ties broken by higher accuracy, then by trial number.
    A limit on a figure that is not an objective (``latency_ms`` beside the ``latency`` ratio) reads the
    trial's attributes.
    """
    ok = [c for c in candidates if not constraints.violations({**c.get("attrs", {}), **c["values"]})]
    if not ok:
        limits = {k: v for k, v in asdict(constraints).items() if v is not None}
        raise TightropeError(f"No model on the Pareto front meets {limits}; loosen a limit or run more trials.")
    sign = -1 if OBJECTIVES.get(prefer) == "maximize" else 1
    key = lambda c: (sign * c["values"].get(prefer, math.inf) if prefer in c["values"] else math.inf,  # noqa: E731
                     -c["values"].get("accuracy", 0.0), c["number"])
    return min(ok, key=key)


# --- Optuna ---------------------------------------------------------------------------------------


def storage_url(storage: str | None, out: str | Path) -> str:
    """``storage`` as given, else an SQLite file in the run's search folder."""
    if storage:
        return storage
    folder = Path(out) / "search"
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder.resolve() / 'optuna.db'}"


def open_storage(url: str):
    import optuna  # noqa: PLC0415

    kwargs = {}
    if url.startswith("sqlite"):
        kwargs = {"connect_args": {"timeout": 120}}  # several local workers wait on SQLite's write lock
    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
        except Exception as err:  # noqa: BLE001 - SQLAlchemy raises many driver-specific errors
            # Two workers starting together race to create the schema; the loser simply retries.
            text = str(err).lower()
            if attempt < 4 and any(w in text for w in ("already exists", "unique", "duplicate", "locked")):
                time.sleep(0.5 * (attempt + 1))
                continue
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise TightropeError(f"Could not open the search store {url.split('@')[-1]}: {first}") from None


def make_sampler(kind: str, seed: int, space: dict[str, list] | None = None):
    """The Optuna sampler of ``kind``; ``grid`` needs the discrete ``space`` (parameter -> choices)."""
    import optuna  # noqa: PLC0415

    if kind == "grid":
        if space is None:
            raise TightropeError("A grid search needs a discrete space; give sparsity as a list of values.")
        return optuna.samplers.GridSampler(space, seed=seed)
    if kind == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=8)
    if kind == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True)
    return optuna.samplers.RandomSampler(seed=seed)


def grid_left(study, space: dict[str, list]) -> int:
    """Points of the grid that no finished trial has visited yet (as Optuna's GridSampler counts them)."""
    from optuna.trial import TrialState  # noqa: PLC0415

    names = sorted(space)
    visited = {tuple(t.params.get(n) for n in names) for t in study.get_trials(deepcopy=False)
               if t.state in (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)}
    return sum(point not in visited for point in itertools.product(*(space[n] for n in names)))


def completed_twin(trial):
    """A completed trial (itself measured, not a copy) with the same parameters as ``trial``, or None."""
    from optuna.trial import TrialState  # noqa: PLC0415

    for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if t.params == trial.params and "duplicate_of" not in t.user_attrs:
            return t
    return None


def twin_elsewhere(trial):
    """Another trial with ``trial``'s parameters, running or complete, or None. Two grid workers that read
    the store at the same moment can draw the same point (Optuna's GridSampler does not lock it)."""
    from optuna.trial import TrialState  # noqa: PLC0415

    for t in trial.study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.COMPLETE)):
        if t.number != trial.number and t.params == trial.params:
            return t
    return None


def open_search(objectives: Sequence[tuple[str, Direction]], *, storage: str, study_name: str, seed: int = 0,
                sampler: str = "nsga2", worker: int = 0, progress: bool = False, space: dict[str, list] | None = None):
    """The shared Optuna study (created on first use), checked to optimize ``objectives`` over ``space``."""
    import optuna  # noqa: PLC0415

    if not progress:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    names = [n for n, _ in objectives]
    study = optuna.create_study(storage=open_storage(storage), study_name=study_name, load_if_exists=True,
                                directions=[d for _, d in objectives],
                                sampler=make_sampler(sampler, seed + 1000 * worker, space))
    for key, value in (("objectives", names), ("space", space)):
        stored = study.user_attrs.get(key)
        if stored is None and value is not None:
            study.set_user_attr(key, value)
        elif stored != value:
            what = f"optimizes {stored}, not {names}" if key == "objectives" else "explores another search space"
            raise TightropeError(f"The search '{study_name}' in this store {what}; use another --study-name.")
    return study


def trials_left(study, n_trials: int, sampler: str = "nsga2", space: dict[str, list] | None = None) -> int:
    """Trials still to run for the study to hold ``n_trials`` complete ones (a finished grid: none)."""
    from optuna.trial import TrialState  # noqa: PLC0415

    done = sum(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False))
    wanted = n_trials - done
    if sampler == "grid" and space is not None:
        wanted = min(wanted, grid_left(study, space))  # a finished grid is not run again
    return max(0, wanted)


def record_values(trial, values: dict, names: Sequence[str], worker: int) -> tuple:
    """Keep the objective's answer as the trial's user attributes; the objectives' values, in order."""
    trial.set_user_attr("worker", worker)
    for key, value in values.items():
        trial.set_user_attr(key, value)
    return tuple(values[n] for n in names)


def run_search(objective: Callable, objectives: Sequence[tuple[str, Direction]], *, storage: str, study_name: str,
               n_trials: int, seed: int = 0, sampler: str = "nsga2", worker: int = 0, progress: bool = False,
               space: dict[str, list] | None = None):
    """Add trials to the shared study until it holds ``n_trials`` complete ones; returns the Optuna study.

    ``objective(trial) -> dict`` returns every objective by name (and may add ``model_dir`` and other
    attributes, kept as the trial's user attributes); failed trials (a TightropeError) are recorded as
    failed and the search goes on. ``space`` (parameter -> choices) is the discrete space: a ``grid``
    sampler visits each of its points once, and the search stops when none is left.
    """
    from optuna.study import MaxTrialsCallback  # noqa: PLC0415
    from optuna.trial import TrialState  # noqa: PLC0415

    names = [n for n, _ in objectives]
    study = open_search(objectives, storage=storage, study_name=study_name, seed=seed, sampler=sampler, worker=worker,
                        progress=progress, space=space)

    def wrapped(trial):
        return record_values(trial, objective(trial), names, worker)

    while (wanted := trials_left(study, n_trials, sampler, space)) > 0:
        pruned = len(study.get_trials(deepcopy=False, states=(TrialState.PRUNED,)))
        study.optimize(wrapped, n_trials=wanted, catch=(TightropeError,),
                       callbacks=[MaxTrialsCallback(n_trials, states=(TrialState.COMPLETE,))])
        if len(study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))) == pruned:
            break  # only a pruned grid twin is made up for; failed trials are not retried
    return study


def trial_records(study) -> list[dict]:
    """Complete trials as plain dicts: number, params, values by objective, user attributes."""
    from optuna.trial import TrialState  # noqa: PLC0415

    names = study.user_attrs["objectives"]
    return [{"number": t.number, "params": dict(t.params), "values": dict(zip(names, t.values)),
             "attrs": dict(t.user_attrs)} for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]


# The trade-off the report draws: clean accuracy, the strongest attack's success rate, latency (relative to the
# baseline; a search stored before the ratio has the absolute latency_ms instead).
TRADE_OFF = ("accuracy", "asr", "latency")
FORMER_TRADE_OFF = ("accuracy", "asr", "latency_ms")


def summarize(study, directions: Sequence[Direction], constraints: Constraints | None = None,
              prefer: str = "asr") -> dict:
    """The search as JSON: objectives, every measured trial, the front, and the choice (if constrained).

    Trials answered from an earlier trial with the same parameters (``duplicate_of``) are listed
    apart under ``duplicates``, not as points of their own. When the search optimizes accuracy,
    ``asr`` and latency, ``trade_off`` holds the front over those three alone (the report's figure).
    """
    names = study.user_attrs["objectives"]
    records = trial_records(study)
    trials = [t for t in records if "duplicate_of" not in t["attrs"]]
    front = [trials[i]["number"] for i in pareto_front([[t["values"][n] for n in names] for t in trials], directions)]
    summary = {"study_name": study.study_name, "objectives": names, "directions": list(directions),
               "trials": trials, "front": front, "chosen": None,
               "duplicates": {str(t["number"]): t["attrs"]["duplicate_of"] for t in records if "duplicate_of" in t["attrs"]}}
    trade_off = next((t for t in (TRADE_OFF, FORMER_TRADE_OFF) if all(n in names for n in t)), None)
    if trade_off is not None:
        dirs = [OBJECTIVES[n] for n in trade_off]
        summary["trade_off"] = {"objectives": list(trade_off), "front": [
            trials[i]["number"] for i in pareto_front([[t["values"][n] for n in trade_off] for t in trials], dirs)]}
    if constraints is not None and trials:
        members = [t for t in trials if t["number"] in front]
        chosen = choose(members, constraints, prefer if prefer in names else names[0])
        summary["chosen"] = {**chosen, "constraints": asdict(constraints), "prefer": prefer}
    return summary


def export_choice(chosen: dict, dest: str | Path, *, search_info: dict | None = None) -> Path:
    """Copy the chosen trial's model directory to ``dest`` and record the search in its card.json."""
    source = chosen.get("attrs", {}).get("model_dir")
    if not source or not Path(source).is_dir():
        raise TightropeError(f"Trial {chosen['number']} has no model directory on this machine ({source}); "
                             "export from the machine that ran it.")
    dest = Path(dest)
    if dest.exists():
        raise TightropeError(f"{dest} already exists; choose another --export folder.")
    tmp = dest.with_name(f".{dest.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    card_file = tmp / "card.json"
    card = json.loads(card_file.read_text()) if card_file.exists() else {}
    card["search"] = {"trial": chosen["number"], "params": chosen["params"], "values": chosen["values"],
                      "constraints": chosen.get("constraints"), "prefer": chosen.get("prefer"), **(search_info or {})}
    card_file.write_text(json.dumps(card, indent=2, default=str))
    tmp.rename(dest)
    return dest


# --- a cheap test function ------------------------------------------------------------------------

TOY_OBJECTIVES: list[tuple[str, Direction]] = [("f1", "minimize"), ("f2", "minimize")]


def toy_objective(trial) -> dict:
    """ZDT1 with two variables (Zitzler, Deb and Thiele 2000): a known convex front, microseconds a trial."""
    x1 = trial.suggest_float("x1", 0.0, 1.0)
    x2 = trial.suggest_float("x2", 0.0, 1.0)
    g = 1.0 + 9.0 * x2
    return {"f1": x1, "f2": g * (1.0 - math.sqrt(x1 / g))}


# --- the study's own search -----------------------------------------------------------------------


@dataclass(frozen=True)
class TrialSetting:
    """What one trial measures: the defense (a label of ``search.defenses``) and the compression after it."""

    defense: str
    quant: str
    sparsity: float
    structured: bool

    def compression(self) -> list[dict]:
        steps = []
        if self.sparsity > 0:
            steps.append({"method": "StructuredPruning", "params": {"heads": self.sparsity, "ffn": self.sparsity}}
                         if self.structured else {"method": "MagnitudePruning", "params": {"sparsity": self.sparsity}})
        if self.quant != "none":
            steps.append({"method": self.quant, "params": {}})
        return steps


def trial_setting(spec: StudySpec, trial) -> TrialSetting:
    """The setting a trial picks from the study's search space (each dimension one Optuna parameter)."""
    s = spec.search
    defense = trial.suggest_categorical("defense", list(s.defense_choices()))
    quant = trial.suggest_categorical("quant", s.quant)
    if isinstance(s.sparsity, Range):
        sparsity = trial.suggest_float("sparsity", s.sparsity.low, s.sparsity.high, step=s.sparsity.step, log=s.sparsity.log)
    else:
        sparsity = trial.suggest_categorical("sparsity", s.sparsity)
    structured = trial.suggest_categorical("structured", s.structured)
    return TrialSetting(defense, quant, sparsity, structured)


def _ancestors(steps: list[Step], target: str) -> list[Step]:
    """The steps ``target`` needs (itself included), in plan order: a trial trains only its own defense."""
    by_name = {s.name: s for s in steps}
    needed, todo = set(), [target]
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo += by_name[name].deps
    return [s for s in steps if s.name in needed]


def search_defense(entry: SearchDefense, params: dict) -> DefenseSpec:
    """A setting of ``search.defenses`` as the study's own defense section would write it."""
    return DefenseSpec(name="search", method=entry.method, source=entry.source, params=params, train=entry.train)


def search_attacks(spec: StudySpec) -> list:
    """The attacks whose strongest success rate is the ``asr`` objective (``search.attack``: a subset)."""
    chosen = spec.search.attack_labels()
    return [a for a in spec.attacks if chosen is None or a.label in chosen]


def trial_steps(spec: StudySpec, setting: TrialSetting) -> tuple[list[Step], str]:
    """The steps of one trial, and the name of the step that makes the model it measures."""
    base_steps, producer = plan_study(spec)
    choice = spec.search.defense_choices()[setting.defense]
    if isinstance(choice, str):  # a model of the study: baseline or one of its defenses
        model_step = producer[choice]
        steps = _ancestors(base_steps, model_step)
    else:  # a defense the search trains (cached by its inputs, so each setting trains once)
        entry, params = choice
        steps = _ancestors(base_steps, producer[entry.source])
        model_step = f"defend/{setting.defense}"
        steps.append(Step(model_step, "defend", defense_inputs(spec, search_defense(entry, params)),
                          (producer[entry.source],)))
    compress_steps = setting.compression()
    if compress_steps:
        tag = hashlib.sha256(json.dumps([setting.defense, compress_steps], sort_keys=True).encode()).hexdigest()[:10]
        steps.append(Step(f"compress/search-{tag}", "compress", compress_inputs(spec, compress_steps), (model_step,)))
        model_step = f"compress/search-{tag}"
    steps.append(Step("evaluate/trial", "evaluate", evaluate_inputs(spec), (model_step,)))
    if "latency" in spec.search.objectives:  # timed in pairs with the baseline, in one process
        known = {s.name for s in steps}
        steps = [s for s in _ancestors(base_steps, producer["baseline"]) if s.name not in known] + steps
        steps.append(Step("latency/trial", "relative-latency", latency_inputs(spec), (model_step, producer["baseline"])))
    if "asr" in spec.search.objectives:
        for attack in search_attacks(spec):
            steps.append(Step(f"attack/{attack.label}/trial", attack_kind(attack), attack_inputs(spec, attack),
                              (model_step,)))
    return steps, model_step


def strongest(asr_by_attack: dict[str, float | None]) -> tuple[str, float]:
    """The attack with the highest success rate and that rate (None, no attackable example, counts as 0)."""
    rates = {name: 0.0 if asr is None else asr for name, asr in asr_by_attack.items()}
    name = max(rates, key=lambda n: rates[n])
    return name, rates[name]


def study_objective(spec: StudySpec, run_root: str | Path, progress: bool = False) -> Callable:
    """The objective of a study's search: run the trial's steps (cached) and read its measurements.

    A trial whose parameters equal a completed trial's is answered from that trial, unrun.
    """

    grid = spec.search.resolved_sampler() == "grid"

    def objective(trial) -> dict:
        setting = trial_setting(spec, trial)
        if grid and twin_elsewhere(trial) is not None:
            # a grid point drawn twice: pruned, so that it neither runs twice nor counts as one more point
            import optuna  # noqa: PLC0415 - optional dependency of the search

            raise optuna.TrialPruned(f"grid point {trial.params} is measured by another trial")
        twin = completed_twin(trial)
        if twin is not None:
            return {**{k: v for k, v in twin.user_attrs.items() if k != "worker"}, "duplicate_of": twin.number}
        steps, model_step = trial_steps(spec, setting)
        run = run_steps(steps, run_root, identity=identity(spec), progress=progress, manifest=False)
        ev = run.result("evaluate/trial")
        values = {"accuracy": ev["metrics"]["accuracy"],
                  "memory_mb": (ev.get("peak_rss_bytes") or math.nan) / 1e6,
                  "weight_mb": (ev.get("weight_bytes") or math.nan) / 1e6}
        extra: dict = {"latency_ms": (ev.get("latency") or {}).get("median_ms", math.nan)}
        if "latency" in spec.search.objectives:
            lat = run.result("latency/trial")
            values["latency"] = lat["ratio"]
            extra.update(latency_ms=lat["model_ms"], baseline_latency_ms=lat["reference_ms"],
                         latency_ratio_iqr=[lat["ratio_q25"], lat["ratio_q75"]], latency_pairs=lat["pairs"])
        if "asr" in spec.search.objectives:
            by_attack = {a.label: run.result(f"attack/{a.label}/trial").get("attack_success_rate")
                         for a in search_attacks(spec)}
            extra["strongest_attack"], values["asr"] = strongest(by_attack)
            extra["asr_by_attack"] = by_attack
        values = {k: v for k, v in values.items() if k in spec.search.objectives}
        return {**values, **extra, "defense": setting.defense, "compression": setting.compression(),
                "model_dir": str(Path(run_root).resolve() / run.result(model_step)["model_dir"])}

    return objective


def preflight_search(spec: StudySpec) -> None:
    """The search section's own checks, before any work: every quantization method and every defense
    setting of ``search.defenses`` (each grid point), built as ``tightrope train --defense`` builds it."""
    if spec.search is None:
        raise TightropeError("This study has no 'search' section; add one (trials, objectives, quant, sparsity).")
    for i, method in enumerate(spec.search.quant):
        if method != "none":
            compression_config(method, {}, f"search.quant.{i}")
    for j, entry in enumerate(spec.search.defenses):
        if isinstance(entry, str):
            continue
        for label, params in entry.settings():
            try:
                check_fields(defense_config(entry.method, params, teacher=entry.source))
            except TightropeError as err:
                raise TightropeError(f"search.defenses.{j} ({label}): {err}") from None


def default_study_name(spec: StudySpec) -> str:
    """The search's name in its store: the study, its settings and its search space (an edited space is a new search)."""
    return f"{spec.name}-{spec.fingerprint()}-{spec.search.fingerprint()}"


def search_study(spec: StudySpec, out: str | Path, *, storage: str | None = None, study_name: str | None = None,
                 n_trials: int | None = None, worker: int = 0, progress: bool = True):
    """One worker of a study's search (start several with the same storage to share the work)."""

    preflight_search(spec)
    preflight(spec)
    claim_run_dir(Path(out), identity(spec))
    return run_search(study_objective(spec, out, progress), storage=storage_url(storage, out),
                      study_name=study_name or default_study_name(spec), n_trials=n_trials or spec.search.trials,
                      worker=worker, progress=progress, **search_settings(spec))


def search_settings(spec: StudySpec) -> dict:
    """The study's search as :func:`run_search` and :func:`open_search` take it: objectives, seed, sampler, space."""
    return {"objectives": [(o, OBJECTIVES[o]) for o in spec.search.objectives], "seed": spec.seed,
            "sampler": spec.search.resolved_sampler(), "space": spec.search.space()}
