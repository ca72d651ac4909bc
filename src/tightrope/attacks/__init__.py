"""Text attacks as compositions (goal, constraints, transformation, search) with recipes named after
their papers: TextFooler, PWWS, DeepWordBug, HotFlip. An :class:`Attack` attacks one example; an
:class:`Attacker` runs one over a dataset: ``Attacker(recipes.build(name, victim), out=...).run(victim, data)``.

Embedding-space attacks (FGSM, PGD) live in ``tightrope.attacks.embedding``.
"""

from tightrope.attacks.attack import Attack, transfer
from tightrope.attacks.attacker import Attacker
from tightrope.attacks.goal import Untargeted
from tightrope.attacks.recipes import RECIPES, build
from tightrope.attacks.results import (
    AttackReport,
    AttackResult,
    TransferResult,
    summarize,
)

__all__ = ["RECIPES", "Attack", "AttackReport", "Attacker", "Untargeted", "AttackResult", "TransferResult", "build", "summarize", "transfer"]
