"""Attack sweeps: (recipe, model variant) cells over the same examples, split into tasks, run in this
process or on Ray workers, and written to one resumable run folder.

A :class:`Sweep` names the cells, the task and the settings; :func:`run_sweep` runs every example
still missing from the folder and summarises each cell. The unit of work is one :class:`Task`: a cell
and a shard of its examples. Workers (:class:`CellWorker`) load each model and build each attack once
and keep them for every task they get; they return results and never write. The driver alone writes:
one JSON line per example, appended and fsynced to the cell's ``results.jsonl``, and an example
already there is never written again. So a killed worker loses only the shard it was attacking, a
killed driver resumes from the folder, and no example is counted twice. Results equal a one-process
run with the same seed: each example's random draws depend only on the seed and its index.

:func:`plan` is the dry run: the tasks, the CPU hours they cost at the measured seconds per example
(the cell's own finished examples where it has some, else :data:`SECONDS_PER_EXAMPLE`), and the
wall time on N workers.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock, Timeout

import tightrope
from tightrope import workflows
from tightrope.attacks import recipes
from tightrope.attacks.attacker import SETTINGS, Attacker, append_result, check_meta, read_results
from tightrope.attacks.results import AttackReport, AttackResult, summarize
from tightrope.compress.onnxrt import onnx_twin
from tightrope.data import TaskData, load_task
from tightrope.defenses.fakequant import fake_quantized
from tightrope.errors import TightropeError
from tightrope.evaluate.calibration import fit_temperature, tempered
from tightrope.evaluate.results import write_json_atomic
from tightrope.progress import Reporter, say, tracked

# Seconds of one CPU thread per example and model variant, as measured on a 2-core AMD EPYC:
# "long": IMDB reviews at 256 tokens head+tail (docs/results.md, the attack grid's s / example, 96-115
# reviews per cell: TextFooler 26-32 s, PWWS 74-94 s, DeepWordBug 11 s, HotFlip 3 s, midpoints here);
# "short": MR sentences at 64 tokens (docs/benchmarks.md, "Where attacks spend their time", 100
# sentences; HotFlip not profiled there, scaled from DeepWordBug by the long texts' ratio).
SECONDS_PER_EXAMPLE = {
    "long": {"textfooler": 29.0, "pwws": 84.0, "deepwordbug": 11.0, "hotflip": 3.0},
    "short": {"textfooler": 1.15, "pwws": 2.81, "deepwordbug": 0.94, "hotflip": 0.26},
}
LONG_WORDS = 100  # texts of this many words on average or more cost as the long ones
FALLBACK_SECONDS = {"long": 30.0, "short": 1.5}  # a recipe that was never measured
DEFAULT_SHARD_SIZE = 4


@dataclass(frozen=True)
class Cell:
    """One recipe against one model variant; ``folder`` is relative to the run folder ("" for the run
    folder itself, as ``tightrope attack`` writes)."""

    recipe: str
    variant: str
    model: str
    folder: str = ""


@dataclass(frozen=True)
class Sweep:
    """Cells over the same examples of one task, and the settings every cell shares.

    ``n`` draws a seeded subset when the task is loaded (``tightrope attack --n``); ``indices`` then
    picks examples of what was loaded, in order (the grid's first n of a seeded shuffle); None: all.
    ``twin`` gives gradients to a victim without them: with ``twin_scheme`` None it goes to every cell
    (``tightrope attack --twin``), with a scheme it is fake-quantized that way and goes only to HotFlip
    cells whose victim has no gradients (the grid's twin).
    """

    cells: tuple[Cell, ...]
    task: str
    split: str = "test"
    n: int | None = None
    indices: tuple[int, ...] | None = None
    seed: int = 0
    data_dir: str | None = None
    query_budget: int | None = None
    max_length: int | None = None
    long_texts: str = "window"
    twin: str | None = None
    twin_scheme: str | None = None
    runtime: str = "torch"
    threads: int | None = 1
    temperature: str | None = None  # a number, or "fit" (tightrope attack --temperature)

    def __post_init__(self):
        if not self.cells:
            raise TightropeError("A sweep needs at least one (recipe, model) cell.")
        unknown = sorted({c.recipe for c in self.cells} - set(recipes.RECIPES))
        if unknown:
            raise TightropeError(f"Unknown attack recipe '{unknown[0]}'; choose from {', '.join(recipes.RECIPES)}.")
        if self.runtime not in ("torch", "onnxruntime"):
            raise TightropeError(f"--runtime is torch or onnxruntime, not '{self.runtime}'.")
        folders = [c.folder for c in self.cells]
        if len(set(folders)) != len(folders):
            raise TightropeError("Two cells of the sweep write to the same folder; give each its own.")

    def load_data(self) -> TaskData:
        return load_task(self.task, self.split, n=self.n, seed=self.seed, data_dir=self.data_dir)

    def examples(self, data: TaskData) -> list[int]:
        order = list(range(len(data))) if self.indices is None else list(self.indices)
        bad = next((i for i in order if not 0 <= i < len(data)), None)
        if bad is not None:
            raise TightropeError(f"Example {bad} is not in the dataset ({len(data)} examples).")
        return order


@dataclass(frozen=True)
class Task:
    """The unit of work: one cell and a shard of its examples."""

    cell: Cell
    indices: tuple[int, ...]


def with_temperature(victim, temperature: str, data: TaskData):
    """The victim with its logits divided by T (``tightrope attack --temperature``): a number, or "fit" for
    the T that minimises the NLL on the data's clean texts; returns the tempered victim and T."""
    if temperature == "fit":
        value = fit_temperature(victim.logits(data.texts), data.labels)
    else:
        try:
            value = float(temperature)
        except ValueError:
            raise TightropeError(f"--temperature is a positive number or 'fit', not '{temperature}'.") from None
    return tempered(victim, value), value


# --- the worker: models and attacks loaded once, examples attacked on demand ----------------------------------


class CellWorker:
    """Attacks examples of any cell of ``sweep``; each model is loaded and each attack built on first use
    and kept. The same class runs in the driver's process (the local backend) and as a Ray actor."""

    def __init__(self, sweep: Sweep, data: TaskData):
        import torch  # noqa: PLC0415 - torch only where the attacks run

        if sweep.threads:
            torch.set_num_threads(sweep.threads)
        self.sweep, self.data = sweep, data
        self._models: dict[str, object] = {}
        self._attackers: dict[Cell, Attacker] = {}
        self._victims: dict[Cell, object] = {}  # what each cell's attack queries (the ONNX session with --runtime onnxruntime)
        self._twin = None
        self._stack = contextlib.ExitStack()  # the twin's fake quantization stays on for the worker's life

    def hello(self) -> dict:
        """Where this worker runs and with what, for the driver's checks."""
        versions = {"python": platform.python_version(), "tightrope": getattr(tightrope, "__version__", "?")}
        node = platform.node()
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            versions["ray"] = ray.__version__
            node = ray.get_runtime_context().get_node_id()
        return {"node": node, "pid": os.getpid(), **versions}

    def _model(self, path: str):
        if path not in self._models:
            model = workflows.load(path, max_length=self.sweep.max_length)
            model.source = getattr(model, "source", "") or path
            self._models[path] = model
        return self._models[path]

    def _twin_model(self):
        if self._twin is None:
            twin = workflows.load(self.sweep.twin, max_length=self.sweep.max_length)
            if self.sweep.twin_scheme:
                twin.source = f"{self.sweep.twin} fake-quantized as {self.sweep.twin_scheme}"
                self._stack.enter_context(fake_quantized(twin.model, self.sweep.twin_scheme))
            else:
                twin.source = getattr(twin, "source", "") or self.sweep.twin
            self._twin = twin
        return self._twin

    def attacker(self, cell: Cell) -> Attacker:
        if cell not in self._attackers:
            sweep = self.sweep
            victim = self._model(cell.model)
            options: dict = {"query_budget": sweep.query_budget}
            if sweep.twin and (sweep.twin_scheme is None or (cell.recipe == "hotflip" and not recipes.has_gradients(victim))):
                options["twin"] = self._twin_model()
            if sweep.runtime == "onnxruntime":
                fast, _ = onnx_twin(victim, self.data.texts[:16], threads=sweep.threads)
                options.setdefault("twin", victim)  # HotFlip's gradients come from the PyTorch model itself
                victim = fast
            if sweep.temperature is not None:
                victim, _ = with_temperature(victim, sweep.temperature, self.data)
            attacker = Attacker(recipes.build(cell.recipe, victim, **options), seed=sweep.seed,
                                long_texts=sweep.long_texts, indices=sweep.examples(self.data))
            attacker.open(victim, self.data)
            self._attackers[cell], self._victims[cell] = attacker, victim
        return self._attackers[cell]

    def describe(self, cell: Cell) -> dict:
        """The cell's ``attack.json``: what the driver checks against the folder before any work."""
        return self.attacker(cell).describe_run(self._victims[cell], self.data)

    def attack(self, cell: Cell, indices: Iterable[int]) -> list[dict]:
        attacker = self.attacker(cell)
        return [attacker.attack_example(i).to_dict() for i in indices]


# --- the driver's side: the folder, the tasks, the plan -----------------------------------------------------------


class CellFolder:
    """The results of one cell: read once, then appended to by the driver only, each example once."""

    def __init__(self, root: Path | None, cell: Cell):
        self.cell = cell
        self.path = None if root is None else root / cell.folder if cell.folder else root
        self.done: dict[int, AttackResult] = {}
        if self.path is not None:
            self.path.mkdir(parents=True, exist_ok=True)
            self.done = {r.index: r for r in read_results(self.path / "results.jsonl")}
        self.duplicates = 0

    def check(self, meta: dict) -> None:
        """The worker's full description of the cell against the folder's (written on first use)."""
        if self.path is not None:
            check_meta(self.path, meta, write=True)

    def precheck(self, known: dict) -> None:
        """What the driver knows without loading a model (seed, data, settings) against the folder: a
        finished folder of another attack is refused even when no task is left to run."""
        file = None if self.path is None else self.path / "attack.json"
        if file is None or not file.exists():
            return
        try:
            old = json.loads(file.read_text())
        except json.JSONDecodeError:
            old = {}
        if any(old.get(k) != v for k, v in known.items()):
            check_meta(self.path, {**old, **known}, write=False)  # raises its one-sentence refusal

    def add(self, result: AttackResult) -> bool:
        """Keep ``result`` unless its example is already kept; True when kept."""
        if result.index in self.done:
            self.duplicates += 1
            return False
        if self.path is not None:
            append_result(self.path / "results.jsonl", result)
        self.done[result.index] = result
        return True


def make_tasks(cells: Iterable[CellFolder], order: list[int], shard_size: int) -> list[Task]:
    """Example-major: the first shard of every cell, then the second, ...; a run stopped anywhere leaves the
    cells on the same examples. Finished examples are left out."""
    if shard_size < 1:
        raise TightropeError(f"The shard size must be at least 1, not {shard_size}.")
    cells = list(cells)
    tasks = []
    for start in range(0, len(order), shard_size):
        block = order[start:start + shard_size]
        for folder in cells:
            todo = tuple(i for i in block if i not in folder.done)
            if todo:
                tasks.append(Task(folder.cell, todo))
    return tasks


@dataclass(frozen=True)
class Plan:
    tasks: int
    examples: int
    finished: int
    cpu_seconds: float
    seconds_per_example: dict[str, float]  # recipe (or cell folder) -> seconds used for the estimate
    source: dict[str, str]  # the same keys -> where the figure comes from
    task_seconds: tuple[float, ...] = field(repr=False, default=())

    @property
    def cpu_hours(self) -> float:
        return self.cpu_seconds / 3600

    def wall_seconds(self, workers: int) -> float:
        """Longest-first list scheduling of the tasks on ``workers`` one-thread workers."""
        if not self.task_seconds:
            return 0.0
        loads = [0.0] * max(1, workers)
        heapq.heapify(loads)
        for t in sorted(self.task_seconds, reverse=True):
            heapq.heappush(loads, heapq.heappop(loads) + t)
        return max(loads)

    def lines(self, workers: Iterable[int]) -> list[str]:
        out = [f"{self.tasks} tasks: {self.examples - self.finished} of {self.examples} examples still to attack "
               f"({self.finished} already in the run folder)",
               f"estimated CPU time: {self.cpu_hours:.2f} CPU hours (one thread per worker)"]
        for key, seconds in self.seconds_per_example.items():
            out.append(f"  {key}: {seconds:.2f} s per example ({self.source[key]})")
        for n in workers:
            out.append(f"expected wall time on {n} worker{'s' if n != 1 else ''}: {duration(self.wall_seconds(n))}")
        return out


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def text_length(data: TaskData, order: list[int]) -> str:
    words = [len(data.texts[i].split()) for i in order] or [0]
    return "long" if sum(words) / len(words) >= LONG_WORDS else "short"


def plan(sweep: Sweep, out: str | Path | None, *, shard_size: int = DEFAULT_SHARD_SIZE, data: TaskData | None = None) -> Plan:
    """What :func:`run_sweep` would do, from the folder and the data alone (no model is loaded)."""
    data = data if data is not None else sweep.load_data()
    order = sweep.examples(data)
    root = Path(out) if out is not None else None
    folders = [CellFolder(root, c) if root is not None and (root / c.folder).is_dir() else CellFolder(None, c)
               for c in sweep.cells]
    tasks = make_tasks(folders, order, shard_size)
    length = text_length(data, order)
    per_cell, per_key, source = {}, {}, {}
    for folder in folders:
        finished = [r.seconds for r in folder.done.values()]
        if len(finished) >= 3:
            key = f"{folder.cell.recipe} on {folder.cell.variant} (measured in this run)"
            per_cell[folder.cell] = sum(finished) / len(finished)
            source[key] = f"mean of its {len(finished)} finished examples"
        else:
            key = folder.cell.recipe
            table = SECONDS_PER_EXAMPLE[length]
            per_cell[folder.cell] = table.get(key, FALLBACK_SECONDS[length])
            source[key] = (f"measured on {'IMDB reviews, 256 tokens' if length == 'long' else 'MR sentences, 64 tokens'},"
                           f" 1 thread" if key in table else "not measured: a guess")
        per_key[key] = per_cell[folder.cell]
    task_seconds = tuple(per_cell[t.cell] * len(t.indices) for t in tasks)
    finished = sum(len([i for i in order if i in f.done]) for f in folders)
    return Plan(tasks=len(tasks), examples=len(order) * len(folders), finished=finished,
                cpu_seconds=sum(task_seconds), seconds_per_example=per_key, source=source, task_seconds=task_seconds)


# --- running ------------------------------------------------------------------------------------------------------


class LocalBackend:
    """Every task in this process, one after the other, on one :class:`CellWorker`."""

    name = "local"

    def run(self, sweep: Sweep, data: TaskData, folders: dict[Cell, CellFolder], tasks: list[Task],
            keep: Callable[[Cell, list[dict]], None], progress) -> None:
        worker = CellWorker(sweep, data)
        for cell, folder in folders.items():
            folder.check(worker.describe(cell))
        for task in tasks:
            for i in task.indices:  # one example at a time: a kill loses only the example being attacked
                keep(task.cell, worker.attack(task.cell, [i]))


def run_sweep(sweep: Sweep, out: str | Path | None, *, backend=None, shard_size: int = DEFAULT_SHARD_SIZE,
              progress: bool | Reporter | None = True) -> dict[Cell, AttackReport]:
    """Attack every example of every cell still missing from ``out``; return each cell's report (over all
    of the sweep's examples, resumed ones included) and write it to the cell's ``summary.json``."""
    backend = backend or LocalBackend()
    data = sweep.load_data()
    order = sweep.examples(data)
    root = Path(out) if out is not None else None
    lock = contextlib.nullcontext()
    if root is not None:
        root.mkdir(parents=True, exist_ok=True)
        lock = FileLock(root / ".sweep.lock", timeout=0)
    try:
        with lock:
            folders = {c: CellFolder(root, c) for c in sweep.cells}
            known = {"seed": sweep.seed, "data_fingerprint": data.fingerprint(), "examples": len(data), "task": data.name,
                     "split": data.split, "long_texts": sweep.long_texts}
            for folder in folders.values():
                folder.precheck(known)
            tasks = make_tasks(folders.values(), order, shard_size)
            started = time.perf_counter()
            total = sum(len(t.indices) for t in tasks)
            with tracked(progress, f"{len(sweep.cells)} cell(s) on {backend.name}", total) as bar:

                def keep(cell: Cell, results: list[dict]) -> None:
                    for raw in results:
                        result = AttackResult.from_dict(raw)
                        if folders[cell].add(result):
                            bar.advance(1, f"{cell.recipe} {cell.variant} example {result.index}: {result.status}, "
                                           f"{result.queries} queries, {result.seconds:.1f} s")

                if tasks:
                    backend.run(sweep, data, folders, tasks, keep, progress)
            duplicates = sum(f.duplicates for f in folders.values())
            if duplicates:
                say(progress, f"{duplicates} result(s) came back twice (a task retried after a lost worker); each example was kept once")
            return {cell: _summarize(sweep, data, order, folder, time.perf_counter() - started)
                    for cell, folder in folders.items()}
    except Timeout as err:
        raise TightropeError(f"Another run is writing to {root} (it holds {root / '.sweep.lock'}); wait for it "
                             "or give this one another --out.") from err


def _summarize(sweep: Sweep, data: TaskData, order: list[int], folder: CellFolder, wall: float) -> AttackReport:
    results = sorted((folder.done[i] for i in order if i in folder.done), key=lambda r: r.index)
    meta = {}
    if folder.path is not None and (folder.path / "attack.json").exists():
        meta = json.loads((folder.path / "attack.json").read_text())
    settings = {k: meta[k] for k in SETTINGS if k in meta}
    victim = meta.get("victim", folder.cell.model)
    report = summarize(results, recipe=folder.cell.recipe, victim=victim, task=f"{data.name}:{data.split}",
                       attack=meta.get("attack"), settings={**settings, "wall_seconds_this_run": wall})
    if folder.path is not None:
        write_json_atomic(folder.path / "summary.json", report.to_dict())
    return report
