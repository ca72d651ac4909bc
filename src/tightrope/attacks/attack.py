"""An attack is a composition, as in TextAttack: goal (untargeted classification) + constraints +
transformation + search. ``Attack.run(model, data, out=...)`` attacks every example of a TaskData,
appends one JSON line per finished example (fsynced), skips finished examples when started again, and
returns an :class:`AttackReport` computed from the file, so a killed run resumes to the same report.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable
from pathlib import Path

from tightrope.attacks.constraints import CandidateConstraint, Constraint, ModelWindow, PreTransformationConstraint
from tightrope.attacks.goal import Classifier, OutputCache, QueryBudgetExhausted, UntargetedClassification
from tightrope.attacks.results import AttackReport, AttackResult, TransferResult, summarize
from tightrope.attacks.search import Search, SearchState
from tightrope.attacks.text import AttackedText, word_tokens
from tightrope.attacks.words import Transformation, WordSwapGradient
from tightrope.encoding import encode_with_offsets
from tightrope.errors import TightropeError
from tightrope.evaluate.results import write_json_atomic

LONG_TEXTS = ("window", "error")


class Attack:
    def __init__(self, name: str, transformation: Transformation, constraints: list[Constraint], search: Search, *,
                 citation: str = "", query_budget: int | None = None, notes: list[str] | None = None):
        if query_budget is not None and query_budget < 1:
            raise TightropeError(f"The query budget must be at least 1, got {query_budget}.")
        self.name, self.transformation, self.constraints, self.search = name, transformation, list(constraints), search
        self.citation, self.query_budget, self.notes = citation, query_budget, list(notes or [])

    @property
    def pre(self) -> list[PreTransformationConstraint]:
        return [c for c in self.constraints if isinstance(c, PreTransformationConstraint)]

    @property
    def post(self) -> list[CandidateConstraint]:
        return [c for c in self.constraints if isinstance(c, CandidateConstraint)]

    def describe(self) -> dict:
        return {"recipe": self.name, "citation": self.citation, "goal": "untargeted_classification",
                "constraints": [c.describe() for c in self.constraints],
                "transformation": self.transformation.describe(), "search": self.search.describe(),
                "query_budget": self.query_budget, "notes": self.notes}

    # --- one example ----------------------------------------------------------------------------------

    def attack_one(self, model: Classifier, text: str, label: int, *, index: int = 0, seed: int = 0,
                   window_words: int | tuple[int, int] | None = None, victim: str = "") -> AttackResult:
        """Attack one example; queries (and so every success) are on ``model`` itself."""
        start = time.perf_counter()
        goal = UntargetedClassification(model, label, query_budget=self.query_budget, cache=OutputCache())
        original = AttackedText.from_text(text)
        window = ModelWindow.of(window_words)
        constraints = [c.describe() for c in self.constraints] + [window.describe()]
        first = goal.evaluate([text])[0]
        gradient_source = None
        if isinstance(self.transformation, WordSwapGradient):
            self.transformation.label = label
            gradient_source = self.transformation.params()["gradient_source"]
        state = SearchState(original, goal, self.transformation, [*self.pre, window], self.post,
                            random.Random(seed * 1_000_003 + index), current=original, output=first)
        exhausted = False
        if not first.succeeded:  # correctly classified: attack it
            try:
                self.search.perform(state)
            except QueryBudgetExhausted:
                exhausted = True
        status = "skipped" if first.succeeded else ("succeeded" if state.output.succeeded else "failed")
        final = state.current if status == "succeeded" else original
        out = state.output if status == "succeeded" else first
        changed = original.diff(final)
        return AttackResult(
            index=index, status=status, label=label, original_text=text, perturbed_text=final.text,
            original_prediction=first.predicted, perturbed_prediction=out.predicted,
            original_true_prob=float(first.probs[label]), perturbed_true_prob=float(out.probs[label]),
            queries=goal.queries, words=len(original), words_perturbed=len(changed), modified_indices=changed,
            budget_exhausted=exhausted, recipe=self.name, victim=victim, constraints=constraints,
            gradient_source=gradient_source, seconds=time.perf_counter() - start, model_queries=goal.model_queries,
        )

    # --- a dataset -----------------------------------------------------------------------------------------

    def run(self, model: Classifier, data, *, out: str | Path | None = None, seed: int = 0,
            long_texts: str = "window", shard: bool = False,
            progress: Callable[[AttackResult, list[AttackResult]], None] | None = None) -> AttackReport:
        """Attack every example of ``data`` (a TaskData); with ``out``, results are kept and resumable.

        ``shard=True`` splits the examples between the processes of an ``accelerate launch``; each
        process appends to its own file and the main process writes the report.
        """
        victim = getattr(model, "source", "") or type(model).__name__
        validate(model, data)
        if long_texts not in LONG_TEXTS:
            raise TightropeError(f"long_texts must be one of {', '.join(LONG_TEXTS)}, not '{long_texts}'.")
        windows = model_windows(model, data.texts, long_texts)
        settings = {"seed": seed, "data_fingerprint": data.fingerprint(), "examples": len(data),
                    "long_texts": long_texts, "max_length": getattr(model, "max_length", None)}
        meta = {"attack": self.describe(), "victim": victim, "task": data.name, "split": data.split, **settings}
        todo = list(range(len(data)))
        rank, world, state = 0, 1, None
        if shard:
            from accelerate import PartialState  # noqa: PLC0415

            state = PartialState()
            rank, world = state.process_index, state.num_processes
            with state.split_between_processes(todo) as part:
                todo = list(part)
        file = None
        done: dict[int, AttackResult] = {}
        if out is not None:
            out = Path(out)
            check_meta(out, meta, write=rank == 0)
            file = out / (f"results.{rank}-of-{world}.jsonl" if world > 1 else "results.jsonl")
            done = {r.index: r for r in read_results(file)}
        mine = [done[i] for i in todo if i in done]
        started = time.perf_counter()
        with (open(file, "a", encoding="utf-8") if file else _nullfile()) as sink:
            for i in todo:
                if i in done:
                    continue
                result = self.attack_one(model, data.texts[i], data.labels[i], index=i, seed=seed,
                                         window_words=windows[i], victim=victim)
                if file is not None:
                    sink.write(json.dumps(result.to_dict()) + "\n")
                    sink.flush()
                    os.fsync(sink.fileno())
                mine.append(result)
                if progress is not None:
                    progress(result, mine)
        if state is not None:
            state.wait_for_everyone()
        results = mine
        if out is not None and world > 1:
            results = [r for k in range(world) for r in read_results(out / f"results.{k}-of-{world}.jsonl")]
        results.sort(key=lambda r: r.index)
        report = summarize(results, recipe=self.name, victim=victim, task=f"{data.name}:{data.split}",
                           attack=self.describe(), settings={**settings, "wall_seconds_this_run": time.perf_counter() - started})
        if out is not None and rank == 0:
            write_json_atomic(out / "summary.json", report.to_dict())
        return report


class _nullfile:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# --- checks and files ----------------------------------------------------------------------------------------


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


def read_results(file: Path) -> list[AttackResult]:
    """Finished results of a JSON Lines file; a last line cut short by a kill is dropped (and trimmed)."""
    if not file.exists():
        return []
    raw = file.read_bytes()
    keep = raw.rfind(b"\n") + 1
    if keep < len(raw):
        with open(file, "r+b") as f:  # trim the partial line so that appends start on a fresh line
            f.truncate(keep)
    results = []
    for number, line in enumerate(raw[:keep].decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            results.append(AttackResult.from_dict(json.loads(line)))
        except (json.JSONDecodeError, TypeError) as err:
            raise TightropeError(f"{file} line {number} is not an attack result ({err}); the file is damaged.") from err
    return results


# --- transfer -----------------------------------------------------------------------------------------------------


def transfer(results: list[AttackResult], targets: dict[str, Classifier], batch_size: int = 64) -> list[TransferResult]:
    """Evaluate texts crafted on one model on other models, on the same examples, in batched passes."""
    if not results:
        raise TightropeError("There are no attack results to transfer.")
    labels = [r.label for r in results]
    adversarial = [r.perturbed_text if r.status == "succeeded" else r.original_text for r in results]
    out = []
    for name, model in targets.items():
        clean = model.logits([r.original_text for r in results], batch_size=batch_size).argmax(-1).tolist()
        adv = model.logits(adversarial, batch_size=batch_size).argmax(-1).tolist()
        eligible = [k for k, r in enumerate(results) if r.status == "succeeded" and clean[k] == labels[k]]
        fooled = sum(adv[k] != labels[k] for k in eligible)
        out.append(TransferResult(
            source=results[0].victim, target=name, examples=len(results),
            original_accuracy=sum(c == y for c, y in zip(clean, labels)) / len(results),
            accuracy_under_transfer=sum(a == y for a, y in zip(adv, labels)) / len(results),
            transfer_success_rate=fooled / len(eligible) if eligible else None, transferable=len(eligible),
            fooled=fooled,
        ))
    return out
