"""Temperature scaling, and the check that keeps a miscalibrated model from looking robust.

Raina et al. (2024), "Extreme Miscalibration and the Illusion of Adversarial Robustness": a model
whose logits are scaled far up (over-confident: the softmax saturates, so a score-based attack sees
no change in p(y) until the label flips) or far down looks robust against the attacks that search on
scores, while its arg-max, and so its real robustness, is unchanged. The remedy is the attacker's:
divide the logits by a temperature before scoring. Temperature scaling changes no prediction, so an
attack on the tempered model is an attack on the same decision function.

- :func:`fit_temperature` is Guo et al. (2017)'s temperature scaling: the T > 0 that minimises the
  negative log-likelihood of softmax(z / T) on clean labelled data (Eq. in Sec. 4.2 of Guo et al.).
- :func:`expected_calibration_error` is the usual 15-bin ECE (Guo et al. 2017, Eq. 3 / Naeini 2015).
- :func:`tempered` gives a view of a classifier whose logits are divided by T.
- :func:`miscalibration_verdict` compares the attack success rate with and without temperature: a
  defense whose success rate rises by ``margin`` or more once the attacker tempers the logits owes
  part of its robustness to miscalibration.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from tightrope.errors import TightropeError


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor | list[int], *, bounds: tuple[float, float] = (1e-3, 1e4)) -> float:
    """The temperature minimising NLL(softmax(logits / T), labels), searched on log T.

    The NLL is convex in 1/T (a log-sum-exp of a linear function minus a linear one), hence unimodal in
    log T; a golden-section search on log T within ``bounds`` finds the minimum without gradients.
    Written here (not torch's LBFGS, as in Guo et al.'s code) because 60 evaluations of a closed form
    are exact and need no learning rate; scipy would be one more import for one scalar.
    """
    z = torch.as_tensor(logits, dtype=torch.float64)
    y = torch.as_tensor(labels, dtype=torch.long)
    if z.ndim != 2 or z.shape[0] != y.shape[0] or z.shape[0] == 0:
        raise TightropeError(f"Temperature scaling needs (n, K) logits and n labels, got {tuple(z.shape)} and {tuple(y.shape)}.")
    nll = lambda log_t: float(F.cross_entropy(z / math.exp(log_t), y))  # noqa: E731
    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = nll(a), nll(b)
    for _ in range(80):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = nll(b)
    return math.exp((lo + hi) / 2)


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor | list[int], bins: int = 15) -> float:
    """ECE: the confidence-weighted gap between confidence and accuracy over ``bins`` equal-width bins."""
    probs = torch.as_tensor(logits, dtype=torch.float64).softmax(-1)
    y = torch.as_tensor(labels, dtype=torch.long)
    confidence, predicted = probs.max(-1)
    correct = (predicted == y).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    ece = 0.0
    for low, high in zip(edges[:-1], edges[1:]):
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            ece += float(inside.double().mean() * (confidence[inside].mean() - correct[inside].mean()).abs())
    return ece


def tempered(classifier, temperature: float):
    """A shallow copy of a :class:`tightrope.inference.TextClassifier` (or any classifier whose logits all
    pass through ``forward_ids``) whose logits are divided by ``temperature``; the original is untouched
    and the copy shares its model, tokenizer and input transform."""
    if not temperature > 0 or not math.isfinite(temperature):
        raise TightropeError(f"A temperature is a positive number, got {temperature}.")
    if not hasattr(classifier, "forward_ids"):
        raise TightropeError(f"{type(classifier).__name__} has no forward_ids to temper; temperature scaling needs "
                             "a tightrope TextClassifier.")
    view = copy.copy(classifier)
    inner = classifier.forward_ids
    view.forward_ids = lambda input_ids, attention_mask: inner(input_ids, attention_mask) / temperature
    view.temperature = float(temperature)
    return view


@dataclass(frozen=True)
class MiscalibrationVerdict:
    """The attack success rate on the model as it is and under each temperature the attacker tried."""

    plain_asr: float
    tempered_asr: dict[str, float]  # temperature -> ASR
    worst_temperature: float
    margin: float
    flagged: bool  # the success rate rose by >= margin under some temperature

    def to_dict(self) -> dict:
        return asdict(self)

    def sentence(self) -> str:
        worst = self.tempered_asr[f"{self.worst_temperature:g}"]
        if self.flagged:
            return (f"Miscalibration flagged: the attack succeeds on {worst:.1%} once the logits are divided by "
                    f"T={self.worst_temperature:g}, against {self.plain_asr:.1%} on the model as it is; part of its "
                    "apparent robustness is saturated scores.")
        return (f"No miscalibration found: the best tempered attack succeeds on {worst:.1%} (T={self.worst_temperature:g}), "
                f"within {self.margin:.0%} of {self.plain_asr:.1%} on the model as it is.")


def miscalibration_verdict(plain_asr: float, tempered_asr: dict[float, float], margin: float = 0.10) -> MiscalibrationVerdict:
    """Flag when some temperature raises the attack success rate by ``margin`` (absolute) or more."""
    if not tempered_asr:
        raise TightropeError("The temperature check needs at least one tempered attack.")
    worst = max(tempered_asr, key=tempered_asr.get)
    return MiscalibrationVerdict(plain_asr, {f"{t:g}": a for t, a in tempered_asr.items()}, float(worst), margin,
                                 tempered_asr[worst] - plain_asr >= margin)


__all__ = ["MiscalibrationVerdict", "expected_calibration_error", "fit_temperature", "miscalibration_verdict", "tempered"]
