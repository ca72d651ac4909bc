"""Text attacks as compositions (goal, constraints, transformation, search) with recipes named after
their papers: TextFooler, PWWS, DeepWordBug, HotFlip. ``recipes.build(name, victim).run(victim, data)``.

Embedding-space attacks (FGSM, PGD) live in ``tightrope.attacks.embedding``.
"""

from tightrope.attacks.attack import Attack, transfer
from tightrope.attacks.recipes import RECIPES, build
from tightrope.attacks.results import AttackReport, AttackResult, TransferResult, summarize

__all__ = ["RECIPES", "Attack", "AttackReport", "AttackResult", "TransferResult", "build", "summarize", "transfer"]
