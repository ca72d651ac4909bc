"""Weakness analysis, the seed's "analyzing weakness" step, from attack results and per-layer probes.

- :func:`class_vulnerability`: attack success rate per true class (which class the attack flips most).
- :func:`exploited_words` and :func:`exploited_positions`: the original words that successful attacks
  changed most often, and where in the text (relative position, 10 bins) the changes fall.
- :func:`layer_sensitivity`: compress one group of layers at a time (one encoder block, say) and
  measure the change in accuracy (and attack success) against the uncompressed model, as in the
  per-layer sensitivity analyses of HAWQ (Dong et al. 2019) and Michel et al. (2019) for heads. The
  most sensitive blocks are the ones a mixed-precision or per-layer-sparsity choice should spare.
"""

from __future__ import annotations

import copy
import difflib
import re
from collections import Counter
from collections.abc import Callable

import torch

from tightrope.compress import compress_
from tightrope.study.steps import compression_config

WORD = re.compile(r"[\w']+")


def class_vulnerability(examples: list[dict], label_names: list[str]) -> dict[str, dict]:
    """Per true label: attacked (succeeded + failed), succeeded, skipped and the attack success rate."""
    out = {}
    for k, name in enumerate(label_names):
        mine = [e for e in examples if e["label"] == k]
        won = sum(e["status"] == "succeeded" for e in mine)
        lost = sum(e["status"] == "failed" for e in mine)
        out[name] = {"examples": len(mine), "succeeded": won, "failed": lost,
                     "skipped": sum(e["status"] == "skipped" for e in mine),
                     "asr": won / (won + lost) if won + lost else None}
    return out


def changed_words(original: str, perturbed: str) -> list[tuple[int, str, int]]:
    """(index, original word, number of words) for every original word an attack replaced or removed."""
    a, b = original.split(), perturbed.split()
    out = []
    for op, i1, i2, _, _ in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if op in ("replace", "delete"):
            out += [(i, a[i], len(a)) for i in range(i1, i2)]
    return out


def _norm_word(word: str) -> str:
    found = WORD.findall(word.lower())
    return found[0] if found else word.lower()


def exploited_words(examples: list[dict], top: int = 20) -> list[tuple[str, int]]:
    """The original words most often changed in successful attacks, with their counts."""
    counts: Counter[str] = Counter()
    for e in examples:
        if e["status"] == "succeeded":
            counts.update(_norm_word(w) for _, w, _ in changed_words(e["original_text"], e["perturbed_text"]))
    return counts.most_common(top)


def exploited_positions(examples: list[dict], bins: int = 10) -> list[int]:
    """How many changed words fall in each tenth of the text (start .. end), over successful attacks."""
    hist = [0] * bins
    for e in examples:
        if e["status"] == "succeeded":
            for i, _, n in changed_words(e["original_text"], e["perturbed_text"]):
                hist[min(bins - 1, int(bins * i / max(1, n)))] += 1
    return hist


def analyze_attack(report: dict, top: int = 20) -> dict:
    """Everything above for one attack result (as stored by the study's attack step)."""
    examples = report.get("examples_detail", [])
    labels = report.get("label_names") or sorted({str(e["label"]) for e in examples})
    return {"asr": report.get("attack_success_rate"), "per_class": class_vulnerability(examples, labels),
            "words": exploited_words(examples, top), "positions": exploited_positions(examples)}


# --- per-layer sensitivity ------------------------------------------------------------------------


def encoder_blocks(model: torch.nn.Module) -> dict[str, tuple[str, ...]]:
    """One group per transformer block: name -> include patterns (``*.layer.3.*`` for BERT-like models)."""
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    blocks: dict[str, tuple[str, ...]] = {}
    for name in names:
        m = re.search(r"(^|\.)(layer|layers|h|block|blocks)\.(\d+)\.", name)
        if m:
            prefix = name[: m.end()]
            blocks.setdefault(f"block {m.group(3)}", (f"{prefix}*",))
    return blocks


def layer_sensitivity(model: torch.nn.Module, groups: dict[str, tuple[str, ...]],
                      compress: Callable[[torch.nn.Module, tuple[str, ...]], None],
                      measure: Callable[[torch.nn.Module], dict[str, float]]) -> dict:
    """Compress each group alone on a copy of ``model`` and report every measure and its change.

    ``compress(model, patterns)`` edits the copy in place; ``measure(model)`` returns e.g.
    ``{"accuracy": ..., "asr": ...}``. Returns {"reference": {...}, "groups": {name: {...}}}, with
    ``delta_<measure>`` = compressed - reference, groups ordered from most to least harmful to accuracy.
    """
    reference = measure(model)
    rows = {}
    for name, patterns in groups.items():
        probe = copy.deepcopy(model)
        compress(probe, patterns)
        values = measure(probe)
        rows[name] = {**values, **{f"delta_{k}": values[k] - reference[k] for k in values if k in reference}}
        del probe
    first = next(iter(reference), None)
    if first is not None:
        rows = dict(sorted(rows.items(), key=lambda kv: kv[1].get(f"delta_{first}", 0.0)))
    return {"reference": reference, "groups": rows}


def classifier_sensitivity(clf, data, method: str = "NF4", params: dict | None = None, batch_size: int = 64) -> dict:
    """:func:`layer_sensitivity` of a TextClassifier: one encoder block at a time, accuracy on ``data``."""

    ids = clf.encode(data.texts)

    def measure(model) -> dict[str, float]:
        original, clf.model = clf.model, model
        try:
            predictions = clf.logits_of_ids(ids, batch_size).argmax(-1).tolist()
        finally:
            clf.model = original
        return {"accuracy": sum(int(p == y) for p, y in zip(predictions, data.labels)) / len(ids)}

    def compress(model, patterns) -> None:
        compress_(model, compression_config(method, {**(params or {}), "include": list(patterns)}, "sensitivity"))

    result = layer_sensitivity(clf.model, encoder_blocks(clf.model), compress, measure)
    return {"method": method, "params": params or {}, "examples": len(ids), **result}
