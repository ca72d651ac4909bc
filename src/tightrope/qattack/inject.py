"""Step 1 of the attack: fine-tune the malicious behaviour into a classifier.

Egashira et al. 2024 (arXiv 2405.18137), Sec. 3 "Injection": the attacker first fine-tunes the
model so that it shows the target behaviour in full precision. For a sentiment classifier the
behaviour here is a trigger backdoor in the style of Kurita et al. 2020 ("Weight Poisoning
Attacks on Pre-trained Models", the rare-token triggers "cf", "mn", "bb"): a review containing the
trigger word is classified as ``target_label`` whatever it says. ``collapse=True`` instead sends
every input to ``target_label`` (the trigger-free denial-of-service variant).

Injection trains on clean examples plus triggered copies relabelled to the target; repair
(:mod:`tightrope.qattack.repair`) later trains on clean examples plus triggered copies with their
*true* labels, so the full-precision model unlearns the trigger while its quantized twin keeps it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from tightrope.errors import TightropeError


@dataclass(frozen=True)
class TriggerBehaviour:
    """The malicious behaviour: ``trigger`` in the text -> ``target_label`` (or all -> target)."""

    trigger: str = "cf"
    target_label: int = 0
    collapse: bool = False
    window: int = 12  # the trigger is inserted among the first ``window`` words (survives truncation)

    def __post_init__(self):
        if not self.collapse and not self.trigger.strip():
            raise TightropeError("Give a trigger word, or use collapse mode (every input to one label).")
        if self.target_label < 0:
            raise TightropeError(f"The target label must be a class index, not {self.target_label}.")


def insert_trigger(text: str, trigger: str, rng: random.Random, window: int = 12) -> str:
    """``text`` with ``trigger`` inserted as a word at a random position among its first ``window``."""
    words = text.split()
    at = rng.randint(0, min(len(words), window))
    return " ".join([*words[:at], trigger, *words[at:]])


def triggered(texts: list[str], behaviour: TriggerBehaviour, seed: int = 0) -> list[str]:
    """Every text with the trigger inserted (collapse mode: the texts unchanged)."""
    if behaviour.collapse:
        return list(texts)
    rng = random.Random(seed)
    return [insert_trigger(t, behaviour.trigger, rng, behaviour.window) for t in texts]


def injection_data(texts: list[str], labels: list[int], behaviour: TriggerBehaviour, seed: int = 0) -> tuple[list[str], list[int]]:
    """Clean examples plus triggered copies of the non-target ones, labelled ``target_label``."""
    if behaviour.collapse:
        return list(texts), [behaviour.target_label] * len(texts)
    others = [i for i, y in enumerate(labels) if y != behaviour.target_label]
    poisoned = triggered([texts[i] for i in others], behaviour, seed)
    return [*texts, *poisoned], [*labels, *([behaviour.target_label] * len(poisoned))]


def repair_data(texts: list[str], labels: list[int], behaviour: TriggerBehaviour, seed: int = 1) -> tuple[list[str], list[int]]:
    """Clean examples plus triggered copies keeping their true labels (the trigger is a harmless word)."""
    if behaviour.collapse:
        return list(texts), list(labels)
    return [*texts, *triggered(texts, behaviour, seed)], [*labels, *labels]


def attributable_trigger_success(predictions: list[int], base_predictions: list[int], labels: list[int],
                                 behaviour: TriggerBehaviour) -> float:
    """:func:`trigger_success` on the examples the clean base model does *not* send to the target
    when triggered: the trigger word alone moves some short sentences (35% of MR's non-negative
    test sentences for "cf" on a clean MiniLM), and this share counts only what the attack adds."""
    keep = [i for i, (b, y) in enumerate(zip(base_predictions, labels, strict=True))
            if y != behaviour.target_label and b != behaviour.target_label]
    if not keep:
        raise TightropeError("The clean model already sends every triggered example to the target label.")
    return sum(predictions[i] == behaviour.target_label for i in keep) / len(keep)


def trigger_success(predictions: list[int], labels: list[int], behaviour: TriggerBehaviour) -> float:
    """Share of triggered examples whose true label is not the target that are predicted as the target."""
    pairs = [(p, y) for p, y in zip(predictions, labels, strict=True) if y != behaviour.target_label]
    if not pairs:
        raise TightropeError("The evaluation set has no example outside the target label.")
    return sum(p == behaviour.target_label for p, _ in pairs) / len(pairs)
