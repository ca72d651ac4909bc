"""Run a list of steps with each result cached by the hash of its inputs, resumable after kill -9.

A *step kind* (train, compress, evaluate, attack, defend, or any kind a test registers) is one
adapter function ``fn(inputs, deps, ctx) -> dict``: JSON inputs in, a JSON result out, artefacts
(model directories) written under ``ctx.workdir``. The runner gives every step a key: the SHA-256
of its kind, the kind's version, its inputs and the keys of the steps it depends on, so a change
anywhere upstream changes every key below it (the Make / DVC / Snakemake rule).

On disk, under the run directory::

    study.json                     the identity of the run (which study, its fingerprint)
    steps/<kind>-<key>/result.json one finished step: written last, atomically (temp + fsync + rename)
    steps/<kind>-<key>/...         its artefacts
    run.json                       the manifest of the last complete run (step name -> key, result)

Each step runs under its own lock file (``steps/.<kind>-<key>.lock``, freed by the OS on kill), so
search workers can share one run directory and compute any shared step once.

``result.json`` is the only mark of a finished step: a step killed half-way has none, so on the
next start its folder is wiped and the step runs again (or, for kinds declared ``resumable`` such
as training, its folder is kept so the step continues from its own checkpoint). Nothing finished
is ever recomputed, and a run started again after kill -9 ends with the same results.
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tightrope.atomic import write_json_atomic
from tightrope.errors import TightropeError
from tightrope.progress import say

RESULT_FILE = "result.json"


@dataclass(frozen=True)
class Step:
    """One unit of work: ``name`` is for people, ``kind`` picks the adapter, ``deps`` name earlier steps."""

    name: str
    kind: str
    inputs: dict[str, Any]
    deps: tuple[str, ...] = ()


@dataclass
class StepContext:
    """What an adapter may use besides its inputs: its own folder and the run's root."""

    root: Path
    workdir: Path
    step: Step
    progress: bool = True

    def rel(self, path: str | Path) -> str:
        """A path as stored in results: relative to the run root, so a run folder can be moved."""
        return str(Path(path).resolve().relative_to(self.root.resolve()))

    def abs(self, rel_path: str) -> Path:
        return self.root / rel_path


StepFn = Callable[[dict, dict[str, dict], StepContext], dict]


@dataclass(frozen=True)
class StepKind:
    name: str
    fn: StepFn
    version: int = 1
    resumable: bool = False  # keep a half-finished folder (the step resumes from its own checkpoint)


STEP_KINDS: dict[str, StepKind] = {}


def register_step(name: str, *, version: int = 1, resumable: bool = False):
    """Decorator: ``@register_step("compress")`` on an adapter ``fn(inputs, deps, ctx) -> dict``."""

    def wrap(fn: StepFn) -> StepFn:
        STEP_KINDS[name] = StepKind(name, fn, version, resumable)
        return fn

    return wrap


def canonical_json(payload: Any) -> str:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)


def step_key(step: Step, dep_keys: dict[str, str], version: int) -> str:
    """Stable hash of everything a step's result depends on (not its name: renaming reuses results)."""
    payload = {"kind": step.kind, "version": version, "inputs": step.inputs,
               "deps": {name: dep_keys[name] for name in step.deps}}
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:20]


def plan_keys(steps: list[Step]) -> dict[str, str]:
    """Keys of all steps, checking names are unique, dependencies come first and kinds exist."""
    keys: dict[str, str] = {}
    for step in steps:
        if step.name in keys:
            raise TightropeError(f"Two steps are named '{step.name}'.")
        kind = STEP_KINDS.get(step.kind)
        if kind is None:
            raise TightropeError(f"Unknown step kind '{step.kind}' (known: {', '.join(sorted(STEP_KINDS))}).")
        missing = [d for d in step.deps if d not in keys]
        if missing:
            raise TightropeError(f"The step '{step.name}' depends on {missing}, which do not run before it.")
        keys[step.name] = step_key(step, keys, kind.version)
    return keys


def write_result(path: str | Path, payload: Any) -> Path:
    """Atomic JSON write; a full disk becomes one clear sentence and leaves no partial file."""
    path = Path(path)
    try:
        return write_json_atomic(path, payload)
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise TightropeError(f"The disk is full while writing {path}; free some space and run the same "
                                 "command again (finished steps are kept).") from err
        raise TightropeError(f"Could not write {path}: {err.strerror or err}.") from err


def read_result(step_dir: Path) -> dict | None:
    file = step_dir / RESULT_FILE
    if not file.exists():
        return None
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # cannot happen with atomic writes, but a damaged file is simply recomputed


@dataclass(frozen=True)
class StepRecord:
    name: str
    kind: str
    key: str
    dir: str  # relative to the run root
    cached: bool
    seconds: float
    result: dict = field(default_factory=dict)


@dataclass(frozen=True)
class RunResult:
    root: Path
    records: dict[str, StepRecord]

    def result(self, name: str) -> dict:
        return self.records[name].result


def claim_run_dir(root: Path, identity: dict, *, update: bool = False) -> None:
    """Mark ``root`` as this study's run directory, refusing a folder that holds another one.

    ``update=True`` accepts an edited version of the same study (same name, other settings): steps are
    keyed by their own settings, so unchanged ones are reused and only new or changed ones run.
    """
    root.mkdir(parents=True, exist_ok=True)
    marker = root / "study.json"
    if marker.exists():
        try:
            held = json.loads(marker.read_text())
        except json.JSONDecodeError:
            held = None
        if held == identity:
            return
        name = (held or {}).get("name", "unknown") if isinstance(held, dict) else "unknown"
        if not (update and name == identity.get("name")):
            hint = " (or pass --update if you edited this study)" if name == identity.get("name") else ""
            raise TightropeError(f"{root} holds a different study ('{name}', other settings); choose another "
                                 f"--out{hint} or delete that folder.")
        write_result(marker, identity)
        return
    if any(p for p in root.iterdir() if not p.name.startswith(".")):
        raise TightropeError(f"{root} is not empty and holds no tightrope study; choose another --out.")
    write_result(marker, identity)


def run_steps(steps: list[Step], root: str | Path, *, identity: dict | None = None, progress: bool = True,
              manifest: bool = True, on_step: Callable[[StepRecord], None] | None = None,
              update: bool = False, backend=None) -> RunResult:
    """Run ``steps`` in order under ``root``, reusing every finished step; returns all results.

    ``identity`` (when given) is written to ``study.json`` on the first run and must match on later
    ones (``update=True``: or be an edited version of the same study). Each step is computed under its own lock file (the OS frees it on kill), so several
    processes (search workers) can share one run directory: a step two of them need is computed
    once, and the other waits and reuses it. ``manifest=False`` leaves ``run.json`` alone.

    ``backend`` runs the steps elsewhere: an object whose ``run(steps, keys, root, progress, on_step)``
    returns every step's :class:`StepRecord` by name, each step computed by :func:`run_step` (as
    :class:`tightrope.study.distributed.RayStepBackend` does on Ray workers); None: in this process, in order.
    """
    root = Path(root)
    keys = plan_keys(steps)  # every check that can fail does so before any work starts
    if identity is not None:
        claim_run_dir(root, identity, update=update)
    root.mkdir(parents=True, exist_ok=True)
    records: dict[str, StepRecord] = {}
    if backend is not None:
        finished = backend.run(steps, keys, root, progress, on_step)
        records = {step.name: finished[step.name] for step in steps}  # plan order, as a local run lists them
    for step in steps:
        if step.name in records:
            continue
        record = run_step(step, keys[step.name], records, root, progress)
        records[step.name] = record
        if on_step:
            on_step(record)
    if manifest:
        write_result(root / "run.json", {
            "steps": [{"name": r.name, "kind": r.kind, "key": r.key, "dir": r.dir, "seconds": r.seconds}
                      for r in records.values()],
        })
    return RunResult(root, records)


def finished_step(step: Step, key: str, root: Path) -> StepRecord | None:
    """The step's record when its ``result.json`` is in the run folder, else None."""
    rel_dir = f"steps/{step.kind}-{key}"
    stored = read_result(root / rel_dir)
    if stored is not None and stored.get("key") == key:
        return StepRecord(step.name, step.kind, key, rel_dir, True, stored.get("seconds", 0.0), stored["result"])
    return None


def run_step(step: Step, key: str, done: dict[str, StepRecord], root: Path, progress: bool) -> StepRecord:
    """One step, reused when finished, else computed under its lock; ``done`` holds its dependencies' records."""
    from filelock import FileLock  # noqa: PLC0415

    rel_dir = f"steps/{step.kind}-{key}"
    step_dir = root / rel_dir
    finished = finished_step(step, key, root)
    if finished is not None:
        return finished
    step_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(step_dir.parent / f".{step.kind}-{key}.lock")):
        return _run_locked(step, key, done, root, progress, rel_dir, step_dir)


def _run_locked(step: Step, key: str, done: dict[str, StepRecord], root: Path, progress: bool, rel_dir: str,
                step_dir: Path) -> StepRecord:
    kind = STEP_KINDS[step.kind]
    finished = finished_step(step, key, root)  # another process may have finished it while we waited
    if finished is not None:
        return finished
    if step_dir.exists() and not kind.resumable:
        shutil.rmtree(step_dir)  # a step killed half-way: start it again from nothing
    step_dir.mkdir(parents=True, exist_ok=True)
    deps = {name: done[name].result for name in step.deps}
    started = time.perf_counter()
    say(progress, f"{step.kind} {step.name}")
    result = kind.fn(dict(step.inputs), deps, StepContext(root, step_dir, step, progress))
    if not isinstance(result, dict):
        raise TypeError(f"step kind {step.kind} returned {type(result).__name__}, not a dict")
    seconds = time.perf_counter() - started
    write_result(step_dir / RESULT_FILE, {"name": step.name, "kind": step.kind, "key": key, "inputs": step.inputs,
                                          "deps": list(step.deps), "seconds": seconds, "result": result})
    return StepRecord(step.name, step.kind, key, rel_dir, False, seconds, json.loads(canonical_json(result)))
