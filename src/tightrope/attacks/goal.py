"""The goal function: untargeted classification, with a cached, counted, budgeted view of the victim.

As in TextAttack (Morris et al. 2020, ``UntargetedClassification``): an example succeeds once the
victim's arg-max differs from the ground-truth label; the score to maximise is ``1 - p(y_true)``.
Queries are counted as TextAttack counts them (``GoalFunction.get_results``: ``num_queries +=
len(attacked_text_list)``): every text the search submits, cache hits included, and the query budget
applies to that count. The model itself sees each distinct text once (the cache); ``model_queries``
counts those, the attack's real cost. The two differ where a search scores a text twice, as PWWS does
(its saliency pass scores every swap, and the greedy pass asks for them again).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

import torch

from tightrope.errors import TightropeError


class Classifier(Protocol):
    """What an attack needs from a victim: ``tightrope.inference.TextClassifier`` satisfies it."""

    @property
    def num_labels(self) -> int: ...

    def logits(self, texts: list[str], batch_size: int = 64) -> torch.Tensor: ...


class QueryBudgetExhausted(Exception):
    """Internal signal: the search must stop, the example counts as failed (TextAttack does the same)."""


@dataclass
class GoalOutput:
    probs: torch.Tensor  # (K,)
    predicted: int
    score: float  # 1 - p(y_true)
    succeeded: bool


@dataclass(frozen=True)
class Untargeted:
    """The goal of every recipe, given to :class:`~tightrope.attacks.attack.Attack`: the victim's arg-max
    must leave the true label, within ``query_budget`` queries (None: no limit). :meth:`start` gives
    the per-example goal function, so an attack holds no per-example state."""

    query_budget: int | None = None
    name = "untargeted_classification"

    def __post_init__(self):
        if self.query_budget is not None and self.query_budget < 1:
            raise TightropeError(f"The query budget must be at least 1, got {self.query_budget}.")

    def start(self, model: Classifier, label: int) -> UntargetedClassification:
        return UntargetedClassification(model, label, query_budget=self.query_budget, cache=OutputCache())


class UntargetedClassification:
    """Scores texts for one example against one victim; one batched forward pass per call."""

    def __init__(self, model: Classifier, label: int, *, query_budget: int | None = None,
                 cache: "OutputCache | None" = None, batch_size: int = 64):
        self.model = model
        self.label = label
        self.query_budget = query_budget
        self.cache = cache if cache is not None else OutputCache()
        self.batch_size = batch_size
        self.queries = 0  # TextAttack's num_queries: texts submitted, cache hits included
        self.model_queries = 0  # distinct texts the model scored

    def probs(self, texts: list[str]) -> torch.Tensor:
        """Softmax outputs for ``texts``: unseen texts go to the model in one call, the rest from the cache.

        Over the budget, the texts it still allows are scored and counted (as TextAttack truncates the
        list), then the search stops: the example counts as failed.
        """
        allowed = list(texts)
        if self.query_budget is not None:
            left = self.query_budget - self.queries
            if left <= 0:
                raise QueryBudgetExhausted
            allowed = allowed[:left]
        unseen = list(dict.fromkeys(t for t in allowed if t not in self.cache))
        if unseen:
            logits = self.model.logits(unseen, batch_size=self.batch_size)
            for text, row in zip(unseen, torch.softmax(logits.float(), dim=-1)):
                self.cache.put(text, row)
            self.model_queries += len(unseen)
        self.queries += len(allowed)
        if len(allowed) < len(texts) or any(t not in self.cache for t in texts):
            raise QueryBudgetExhausted
        return torch.stack([self.cache.get(t) for t in texts])

    def evaluate(self, texts: list[str]) -> list[GoalOutput]:
        probs = self.probs(texts)
        out = []
        for row in probs:
            predicted = int(row.argmax())
            out.append(GoalOutput(row, predicted, 1.0 - float(row[self.label]), predicted != self.label))
        return out


class OutputCache:
    """Model outputs keyed by text (least recently used entries evicted beyond ``size``)."""

    def __init__(self, size: int = 100_000):
        self.size = size
        self.data: OrderedDict[str, torch.Tensor] = OrderedDict()

    def __contains__(self, text: str) -> bool:
        return text in self.data

    def get(self, text: str) -> torch.Tensor:
        self.data.move_to_end(text)
        return self.data[text]

    def put(self, text: str, probs: torch.Tensor) -> None:
        self.data[text] = probs
        self.data.move_to_end(text)
        while len(self.data) > self.size:
            self.data.popitem(last=False)
