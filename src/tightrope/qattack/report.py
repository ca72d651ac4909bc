"""What a quantization-conditioned attack did, in one report type for both scenarios (a classifier's
trigger, a causal LM's content injection or insecure code), and the verification step they share:
the repaired model quantized by the real libraries must carry the injected model's codes
(Egashira et al. 2024, Sec. 3: the quantized repaired model *is* the quantized injected model).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from torch import nn

from tightrope.qattack.transform import Transform, resolve


@dataclass(frozen=True)
class CodeCheck:
    """Codes and scales of repaired vs injected under the real library (a pruning: entries of the pruner's mask):
    equal when ``mismatched == 0``."""

    quantizer: str
    mismatched: int
    total: int


@dataclass(frozen=True)
class QAttackReport:
    """One quantization-conditioned attack: its boxes, the behaviour of every variant (the scenario's
    ``Behaviour`` or ``LMBehaviour`` records), the code checks and the training losses."""

    config: dict
    boxed_parameters: int
    pinned_fraction: float
    behaviours: list
    codes: list[CodeCheck]
    inject_losses: list[float]
    repair_losses: list[float]
    seconds: float
    attacked_layers: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # quantizers not checked, with the reason

    def to_dict(self) -> dict:
        return asdict(self)

    def get(self, variant: str, quantizer: str | None):
        return next((b for b in self.behaviours if b.variant == variant and b.quantizer == quantizer), None)


def verify(injected: nn.Module, repaired: nn.Module, check: list[str | Transform], names: list[str],
           measure: Callable[[Transform], list], log: Callable[[str], None] | None = None) -> tuple[list[CodeCheck], list[str], list]:
    """For each transform of ``check`` (names or :mod:`tightrope.qattack.transform` objects) that can run here:
    compare the repaired model's codes (a pruning: its mask) with the injected model's, then ``measure(transform)``
    the transformed variants. Returns ``(code checks, transforms skipped with the reason, behaviours)``."""
    codes, skipped, behaviours = [], [], []
    for t in (resolve(q) if isinstance(q, str) else q for q in check):
        reason = t.missing()
        if reason:
            skipped.append(reason)
            continue
        mismatched, total = t.mismatch(injected, repaired, names)
        codes.append(CodeCheck(t.name, mismatched, total))
        if log is not None:
            log(f"{t.name}: {mismatched} of {total} codes and scales differ from the injected model's")
        behaviours += measure(t)
    return codes, skipped, behaviours
