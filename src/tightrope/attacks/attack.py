"""An attack is a composition, as in TextAttack (Morris et al. 2020): a goal, constraints, a
transformation and a search. :meth:`Attack.attack` attacks one example; the dataset loop, its
checkpoints and its parallelism belong to :class:`tightrope.attacks.attacker.Attacker`.

Nothing in an attack holds per-example state: the goal starts a fresh goal function per example
(:meth:`Untargeted.start`), and the label reaches a transformation that needs it through the search
state, never by mutation.
"""

from __future__ import annotations

import random
import time

from tightrope.attacks.constraints import (
    CandidateConstraint,
    Constraint,
    ModelWindow,
    PreTransformationConstraint,
)
from tightrope.attacks.goal import Classifier, QueryBudgetExhausted, Untargeted
from tightrope.attacks.results import AttackResult, TransferResult
from tightrope.attacks.search import Search, SearchState
from tightrope.attacks.text import AttackedText
from tightrope.attacks.words import Transformation
from tightrope.errors import TightropeError

LONG_TEXTS = ("window", "error")


class Attack:
    """``Attack(name, goal, constraints, transformation, search)``, TextAttack's four parts and a name."""

    def __init__(self, name: str, goal: Untargeted, constraints: list[Constraint], transformation: Transformation,
                 search: Search, *, citation: str = "", notes: list[str] | None = None):
        self.name, self.goal, self.constraints = name, goal, list(constraints)
        self.transformation, self.search = transformation, search
        self.citation, self.notes = citation, list(notes or [])

    @property
    def query_budget(self) -> int | None:
        return self.goal.query_budget

    @property
    def pre(self) -> list[PreTransformationConstraint]:
        return [c for c in self.constraints if isinstance(c, PreTransformationConstraint)]

    @property
    def post(self) -> list[CandidateConstraint]:
        return [c for c in self.constraints if isinstance(c, CandidateConstraint)]

    def describe(self) -> dict:
        return {"recipe": self.name, "citation": self.citation, "goal": self.goal.name,
                "constraints": [c.describe() for c in self.constraints],
                "transformation": self.transformation.describe(), "search": self.search.describe(),
                "query_budget": self.query_budget, "notes": self.notes}

    # --- one example ----------------------------------------------------------------------------------

    def attack(self, model: Classifier, text: str, label: int, *, index: int = 0, seed: int = 0,
               window_words: int | tuple[int, int] | None = None, victim: str = "") -> AttackResult:
        """Attack one example; queries (and so every success) are on ``model`` itself."""
        start = time.perf_counter()
        goal = self.goal.start(model, label)
        original = AttackedText.from_text(text)
        window = ModelWindow.of(window_words)
        constraints = [c.describe() for c in self.constraints] + [window.describe()]
        first = goal.evaluate([text])[0]
        gradient_source = self.transformation.params().get("gradient_source")
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
