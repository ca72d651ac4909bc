"""The dataset loop of an attack, as TextAttack's ``Attacker``: which examples, in what order, resumed
from where a killed run stopped, split between processes.

``Attacker(attack, out=..., seed=...).run(model, data)`` attacks every example of a TaskData with
:meth:`tightrope.attacks.attack.Attack.attack`, appends one JSON line per finished example (fsynced),
skips finished examples when started again, and returns an :class:`AttackReport` computed from the
file, so a killed run resumes to the same report. A caller that interleaves several attacks (the
recipe x variant grid of ``benchmarks/attack_grid.py``) opens one Attacker per cell with
:meth:`Attacker.open` and calls :meth:`Attacker.attack_example` in its own order.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

from tightrope.atomic import append_json_lines, complete_lines
from tightrope.attacks.attack import Attack
from tightrope.attacks.goal import Classifier
from tightrope.attacks.results import AttackReport, AttackResult, summarize
from tightrope.attacks.text import AttackedText, word_tokens
from tightrope.encoding import encode_with_offsets
from tightrope.errors import TightropeError
from tightrope.evaluate.results import write_json_atomic

LONG_TEXTS = ("window", "error")
SETTINGS = ("seed", "data_fingerprint", "examples", "long_texts", "max_length", "temperature")  # the report's settings


class Attacker:
    """Runs one :class:`Attack` over a dataset; ``out`` (a folder) keeps the results and makes the run resumable.

    ``shard=True`` splits the examples between the processes of an ``accelerate launch``; each process
    appends to its own file and the main process writes the report. ``indices`` restricts the run to
    those examples (in that order); the folder is not tied to them, so a later run with more indices
    (a grid grown from 100 to 200 reviews) resumes there.

    ``streams`` attacks that many examples at once in this process, each on its own thread. An attack's
    cost is the victim's forward pass on a handful of candidates at a time (docs/benchmarks.md), which
    one core runs better than two share; the forward pass releases the GIL (ONNX Runtime for the whole
    call, torch per operator), so K streams on victims that run one thread each keep K cores busy.
    Every example's result is the one a single stream gives (its random draws are seeded by the seed and
    its index, its queries cached per example); results are written in the order they finish.
    """

    def __init__(self, attack: Attack, *, out: str | Path | None = None, seed: int = 0, long_texts: str = "window",
                 shard: bool = False, indices: list[int] | None = None, streams: int = 1):
        if long_texts not in LONG_TEXTS:
            raise TightropeError(f"long_texts must be one of {', '.join(LONG_TEXTS)}, not '{long_texts}'.")
        if streams < 1:
            raise TightropeError(f"streams is the number of examples attacked at once, at least 1, not {streams}.")
        self.attack, self.seed, self.long_texts, self.shard, self.streams = attack, seed, long_texts, shard, streams
        self.out = Path(out) if out is not None else None
        self.indices = list(indices) if indices is not None else None
        self._opened: tuple | None = None

    # --- one cell, opened once -------------------------------------------------------------------------------

    def open(self, model: Classifier, data) -> list[int]:
        """Check the model against the data and the folder against this attack; return the examples still
        to attack (in order). Called by :meth:`run`; a caller that interleaves attacks calls it itself."""
        victim = getattr(model, "source", "") or type(model).__name__
        validate(model, data)
        todo = self.indices if self.indices is not None else list(range(len(data)))
        bad = next((i for i in todo if not 0 <= i < len(data)), None)
        if bad is not None:
            raise TightropeError(f"Example {bad} is not in the dataset ({len(data)} examples).")
        rank, world, state = 0, 1, None
        if self.shard:
            from accelerate import PartialState  # noqa: PLC0415 - only for multi-process runs

            state = PartialState()
            rank, world = state.process_index, state.num_processes
            with state.split_between_processes(todo) as part:
                todo = list(part)
        windows = dict(zip(todo, model_windows(model, [data.texts[i] for i in todo], self.long_texts)))
        meta = self.describe_run(model, data)
        settings = {k: meta[k] for k in SETTINGS if k in meta}
        file, done = None, {}
        if self.out is not None:
            check_meta(self.out, meta, write=rank == 0)
            file = self.out / (f"results.{rank}-of-{world}.jsonl" if world > 1 else "results.jsonl")
            done = {r.index: r for r in read_results(file)}
        self._opened = (model, data, victim, windows, settings, file, done, todo, rank, world, state)
        return [i for i in todo if i not in done]

    def attack_example(self, i: int) -> AttackResult:
        """Attack example ``i`` of the opened dataset and keep the result (appended and fsynced)."""
        return self._keep(i, self._attack(i))

    def _attack(self, i: int) -> AttackResult:
        if self._opened is None:
            raise TightropeError("Open the attacker on a model and a dataset first (Attacker.open).")
        model, data, victim, windows = self._opened[:4]
        return self.attack.attack(model, data.texts[i], data.labels[i], index=i, seed=self.seed,
                                  window_words=windows.get(i), victim=victim)

    def _keep(self, i: int, result: AttackResult) -> AttackResult:
        file, done = self._opened[5], self._opened[6]
        if file is not None:
            append_result(file, result)
        done[i] = result
        return result

    def _results(self, pending: list[int]):
        """``(index, result)`` for every pending example: one after the other, or ``streams`` at a time on
        threads, each result kept (written) by the calling thread as soon as it is done."""
        if self.streams == 1 or len(pending) < 2:
            for i in pending:
                yield i, self.attack_example(i)
            return
        queue = iter(pending)
        pool = ThreadPoolExecutor(self.streams, thread_name_prefix="tightrope-attack")
        try:
            running = {pool.submit(self._attack, i): i for i in itertools.islice(queue, self.streams)}
            while running:
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in sorted(finished, key=running.get):
                    i = running.pop(future)
                    yield i, self._keep(i, future.result())
                    nxt = next(queue, None)
                    if nxt is not None:
                        running[pool.submit(self._attack, nxt)] = nxt
        finally:  # on an error or an interrupt, start nothing new; examples in flight finish unrecorded
            pool.shutdown(wait=False, cancel_futures=True)

    def describe_run(self, model: Classifier, data) -> dict:
        """What ``attack.json`` holds: the attack, the victim, the data and the settings; a folder takes
        results only from runs that describe themselves the same way (:func:`check_meta`)."""
        victim = getattr(model, "source", "") or type(model).__name__
        meta = {"attack": self.attack.describe(), "victim": victim, "task": data.name, "split": data.split,
                "seed": self.seed, "data_fingerprint": data.fingerprint(), "examples": len(data),
                "long_texts": self.long_texts, "max_length": getattr(model, "max_length", None)}
        if getattr(model, "temperature", None) is not None:  # an attack on tempered logits is another run
            meta["temperature"] = model.temperature
        return meta

    # --- a whole dataset -------------------------------------------------------------------------------------

    def run(self, model: Classifier, data,
            progress: Callable[[AttackResult, list[AttackResult]], None] | None = None) -> AttackReport:
        """Attack every example still to do, then report over all of them (resumed ones included)."""
        pending = self.open(model, data)
        _, _, victim, _, settings, file, done, todo, rank, world, state = self._opened
        started = time.perf_counter()
        mine = [done[i] for i in todo if i in done]
        for _, result in self._results(pending):
            mine.append(result)
            if progress is not None:
                progress(result, mine)
        if state is not None:
            state.wait_for_everyone()
        results = mine
        if self.out is not None and world > 1:
            results = [r for k in range(world) for r in read_results(self.out / f"results.{k}-of-{world}.jsonl")]
        results.sort(key=lambda r: r.index)
        report = summarize(results, recipe=self.attack.name, victim=victim, task=f"{data.name}:{data.split}",
                           attack=self.attack.describe(),
                           settings={**settings, "wall_seconds_this_run": time.perf_counter() - started})
        if self.out is not None and rank == 0:
            write_json_atomic(self.out / "summary.json", report.to_dict())
        return report


# --- checks and files -----------------------------------------------------------------------------------


def validate(model: Classifier, data) -> None:
    if len(data) == 0:
        raise TightropeError("The dataset is empty, so there is nothing to attack.")
    k = model.num_labels
    if data.num_labels != k:
        raise TightropeError(
            f"The task '{data.name}' has {data.num_labels} labels ({', '.join(data.label_names)}) but the model "
            f"predicts {k}; attack a model trained on this task."
        )
    bad = next((y for y in data.labels if not 0 <= y < k), None)
    if bad is not None:
        raise TightropeError(f"The task '{data.name}' has label {bad}, which the model (labels 0..{k - 1}) does not have.")


def model_windows(model: Classifier, texts: list[str], long_texts: str) -> list[int | tuple[int, int] | None]:
    """For each text, which words the model sees: None (all of them, or unknown), the number of leading
    words (head truncation), or ``(head words, first tail word)`` (head+tail truncation).

    Words the truncation drops never reach the model, so changing them only wastes queries;
    ``long_texts="error"`` refuses such texts instead. A word cut in two by the boundary counts as seen
    under head+tail (part of it reaches the model) and as unseen under head truncation.
    """
    tokenizer, max_length = getattr(model, "tokenizer", None), getattr(model, "max_length", None)
    if tokenizer is None or max_length is None:
        return [None] * len(texts)
    truncation = getattr(model, "truncation", "head")
    out: list[int | tuple[int, int] | None] = []
    for i, text in enumerate(texts):
        full = len(tokenizer(text, verbose=False)["input_ids"])  # the full length, on purpose
        if full <= max_length:
            out.append(None)
            continue
        if long_texts == "error":
            raise TightropeError(
                f"Example {i} is {full} tokens long but the model takes {max_length}; pass --long-texts window "
                "to attack only the words the model sees, or a larger --max-length."
            )
        words = AttackedText.from_text(text)
        if truncation == "head+tail":
            out.append(_head_tail_window(tokenizer, words, text, max_length))
            continue
        enc = tokenizer(text, truncation=True, max_length=max_length, return_offsets_mapping=True)
        seen = max(b for _, b in enc["offset_mapping"])
        out.append(sum(1 for _, end in words.spans() if end <= seen))
    return out


def _head_tail_window(tokenizer, words: AttackedText, text: str, max_length: int) -> tuple[int, int]:
    """(head words, first tail word): the words that own a token of ``encoding.encode``'s head+tail cut."""
    _, spans = encode_with_offsets(tokenizer, [text], max_length, "head+tail")
    seen = sorted(word_tokens(words, spans[0]))
    head = next((k for k, w in enumerate(seen) if w != k), len(seen))  # the unbroken run from word 0
    return head, seen[head] if head < len(seen) else len(words)


def check_meta(out: Path, meta: dict, write: bool) -> None:
    """Refuse to mix results of different attacks in one folder; write the description on first use."""
    file = out / "attack.json"
    normalized = json.loads(json.dumps(meta, default=str))
    if file.exists():
        try:
            old = json.loads(file.read_text())
        except json.JSONDecodeError:
            old = None
        if old != normalized:
            raise TightropeError(
                f"{out} holds results of a different attack (recipe, model, data or settings differ); "
                "use another --out folder or delete it."
            )
    elif write:
        write_json_atomic(file, normalized)


def append_result(file: Path, result: AttackResult) -> None:
    """Append one result as a JSON line, flushed and fsynced: a kill loses at most the line being written."""
    append_json_lines(file, [result.to_dict()])


def read_results(file: Path) -> list[AttackResult]:
    """Finished results of a JSON Lines file; a last line cut short by a kill is dropped (and trimmed)."""
    results = []
    for number, line in complete_lines(file):
        try:
            results.append(AttackResult.from_dict(json.loads(line)))
        except (json.JSONDecodeError, TypeError) as err:
            raise TightropeError(f"{file} line {number} is not an attack result ({err}); the file is damaged.") from err
    return results
