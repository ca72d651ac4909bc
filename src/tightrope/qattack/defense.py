"""The defense of Egashira et al. 2024 (arXiv 2405.18137, Sec. 5): Gaussian noise on the weights
before the transform, swept over sigma.

Noise of a few box widths moves most weights out of the boxes the repair exploited, so the codes
the user's quantizer produces are no longer the injected ones: the quantized behaviour returns to
the full-precision one, while sigma small against the weights keeps utility (the paper: sigma
about 1e-3 on Phi-2). The noise itself is :func:`tightrope.defenses.noise.add_weight_noise_`,
applied to exactly the layers a quantizer replaces.

The same sweep runs for a pruning (``prune:magnitude:0.5`` ...): there the box of a removed weight is the
interval below its group's smallest kept score, so noise reorders the scores near that threshold and changes
which weights the pruner removes. Whether that undoes a pruning-conditioned repair is measured, not assumed
(docs/qattack-results.md).
"""

from __future__ import annotations

import copy
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from tightrope import models
from tightrope.compress.recovery import trained_task
from tightrope.compress.specs import prune_config
from tightrope.data import load_task
from tightrope.defenses.noise import add_weight_noise_
from tightrope.errors import TightropeError, read_user_file
from tightrope.inference import read_card
from tightrope.qattack.boxes import quantized_linears
from tightrope.qattack.calibration import upgrade_report
from tightrope.qattack.inject import TriggerBehaviour, insert_trigger, triggered
from tightrope.qattack.pruning import Calibration, parse_pruning
from tightrope.qattack.scenario import measure
from tightrope.qattack.transform import is_pruning, resolve
from tightrope.workflows.compress import compress_model


@dataclass(frozen=True)
class NoisePoint:
    sigma: float  # absolute standard deviation added to every weight the transform touches
    transform: str | None  # None = full precision after noise
    clean_accuracy: float
    trigger_success: float

    def to_dict(self) -> dict:
        return asdict(self)


def noise_sweep(classifier, texts: list[str], labels: list[int], behaviour: TriggerBehaviour, sigmas: list[float],
                transforms: tuple[str, ...] = ("llm-int8", "nf4", "fp4"), seed: int = 0,
                calibration: str | tuple[str, ...] | None = None) -> list[NoisePoint]:
    """Clean accuracy and trigger success of the noised model, full precision and transformed, per sigma.
    ``calibration``: what a Wanda pruning reads (a task name, a data file or texts; default: ``texts``)."""

    clean_ids = classifier.encode(texts)
    trig_ids = classifier.encode(triggered(texts, behaviour, seed=seed + 17))
    names = tuple(quantized_linears(classifier.model))
    cal = Calibration(calibration if calibration is not None else tuple(texts), classifier.tokenizer)
    chosen = [t for t in (resolve(name, cal) for name in transforms) if t.missing() is None]
    points = []
    for sigma in sigmas:
        model = copy.deepcopy(classifier.model).float().eval()
        if sigma > 0:
            add_weight_noise_(model, sigma, relative=False, seed=seed, include=names)
        for t, m in [(None, model), *((t.name, t.apply(model)) for t in chosen)]:
            b = measure(m, classifier.pad_id, clean_ids, trig_ids, labels, behaviour, "noised", t)
            points.append(NoisePoint(sigma, t, b.clean_accuracy, b.trigger_success))
    return points


def guided_recovery_data(texts: list[str], labels: list[int], phrases: list[str], seed: int = 0,
                         window: int = 12) -> tuple[list[str], list[int]]:
    """Recovery data against a transform-conditioned backdoor whose trigger is unknown: every text, plus one copy
    with one of ``phrases`` inserted (a random one, at a random position among the first ``window`` words),
    keeping its true label.

    ``phrases`` are the insertions the audit's differential search found (:mod:`tightrope.qattack.search`): the
    inputs on which the model and its transformed copy disagree most, the real trigger among them when there is
    one. Distilling the transformed model toward the full-precision one (``tightrope compress ...
    --recover-teacher auto --recover-task FILE``) on these texts teaches it the full-precision answer exactly
    where the two diverge. Plain recovery on clean texts does not: the trigger never occurs in them, so the
    backdoor survives it (docs/qattack-results.md)."""
    if not phrases:
        raise TightropeError("The audit found no insertion to train against; run its trigger search first.")
    rng = random.Random(seed)
    guided = [insert_trigger(t, rng.choice(phrases), rng, window) for t in texts]
    return [*texts, *guided], [*labels, *labels]


def search_phrases(entry: dict, keep: int = 3) -> list[str]:
    """The ``keep`` best insertions of one transform's trigger search in an audit report (``[]`` without a search)."""
    return [c["text"] for c in ((entry.get("search") or {}).get("candidates") or [])[:keep]]


def write_recovery_data(path: Path, texts: list[str], labels: list[int], label_names) -> Path:
    """``texts`` and their labels as the JSON Lines data file a recovery reads (``--recover-task FILE``), written
    through a ``.partial`` file so that a killed run never leaves half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    names = list(label_names)
    partial.write_text("".join(json.dumps({"text": t, "label": names[y]}) + "\n" for t, y in zip(texts, labels, strict=True)))
    return partial.replace(path)


def guided_phrases(report: dict, prune_configs: list, source: str = "the audit report", keep: int = 3) -> list[str]:
    """The ``keep`` best insertions the audit's trigger search found (``tightrope audit --json``, read as a dict)
    for each pruning in it that ``prune_configs`` (:mod:`tightrope.compress.prune` configs, as ``tightrope compress
    --prune`` builds them) will apply: the phrases of :func:`guided_recovery_data`. One sentence when the report
    has none for these prunings.

    Then the best insertions of every transform the audit *flagged*: a plant made through a proxy of the pruning
    scores fires under every pruner, and the search may find its trigger through one pruned copy and not another
    (on the MiniLM plant made for SparseGPT through Wanda's scores, the search put "cf" first through Wanda's copy
    and found nothing through SparseGPT's; docs/qattack-results.md). A clean model has no flagged transform, so
    nothing is added there."""
    wanted = set()
    for c in prune_configs:
        kind = type(c).__name__
        if kind == "SemiStructured24":
            wanted.add(("n:m", 0.5, c.n, c.m))
        elif kind in ("MagnitudePruning", "Wanda") or (kind == "SparseGPT" and not c.m):
            method = {"MagnitudePruning": "magnitude", "Wanda": "wanda", "SparseGPT": "sparsegpt"}[kind]
            wanted.add((method, round(float(c.sparsity), 6), 0, 0))
    transforms = upgrade_report(report)["transforms"]
    audited = [t["transform"] for t in transforms if is_pruning(t["transform"])]
    phrases: list[str] = []
    for t in transforms:
        if not is_pruning(t["transform"]):
            continue
        method, sparsity, n, m = parse_pruning(t["transform"])
        if (method, round(sparsity, 6) if method != "n:m" else 0.5, n, m) in wanted:
            phrases.extend(p for p in search_phrases(t, keep) if p not in phrases)
    if not phrases:
        raise TightropeError(f"{source} has no trigger-search result for the pruning given to --prune (it audited "
                             f"{', '.join(audited) or 'no pruning'}); audit the model with that --transform and the "
                             "search on first.")
    for t in transforms:
        if t.get("verdict") == "flagged":
            phrases.extend(p for p in search_phrases(t, keep) if p not in phrases)
    return phrases


def _read_report(report_path: str) -> dict:
    try:
        return json.loads(read_user_file(report_path, "audit report"))
    except json.JSONDecodeError as err:
        raise TightropeError(f"The audit report {report_path} is not JSON ({err.msg}, line {err.lineno}).") from None


def _guided_file(report_path: str, phrases: list[str], task: str, path: Path) -> tuple[Path, dict]:
    """The task's training texts plus a copy of each with one of the audit's insertions ``phrases``
    (:func:`guided_phrases`), written to ``path``; and the record the card keeps of it."""
    train = load_task(task, "train")
    texts, labels = guided_recovery_data(train.texts, train.labels, phrases)
    written = write_recovery_data(path, texts, labels, train.label_names)
    return written, {"audit": str(report_path), "phrases": phrases, "task": str(task), "texts": len(texts)}


#: Pruners whose result depends on the calibration texts (what ``--calibration-guided`` changes).
CALIBRATED_PRUNERS = ("Wanda", "SparseGPT")


def guided_compress(model: str, out: str | Path, report_path: str | None = None, *, prune: list[str],
                    recover_steps: int, recover_teacher: str | None, recover_task: str | None = None,
                    include: tuple[str, ...] = (), exclude: tuple[str, ...] = (), calibration: str | None = None,
                    calibration_report: str | None = None, **options):
    """``tightrope compress --recover-guided REPORT`` and / or ``--calibration-guided REPORT``.

    - ``report_path`` (``--recover-guided``): prune ``model`` and recover it, distilled toward the unpruned model, on
      the recovery task's training texts plus a copy of each with one of the insertions the audit's trigger search
      found (:func:`guided_phrases`, :func:`guided_recovery_data`). Written beside ``out``
      (``.<out name>.guided.jsonl``); the phrases go in the card's ``recovery.guided``.
    - ``calibration_report`` (``--calibration-guided``): a calibrated pruner (Wanda, SparseGPT) reads the calibration
      task's training texts plus the same guided copies ("security-aware calibration", "Fewer Weights, More
      Problems" Sec. 6.3, with the audit's finds in place of known malicious inputs). SparseGPT rebuilds each layer's
      dense output on its calibration texts, so on the guided copies it rebuilds the unpruned model's benign answer to
      the trigger; no training. Written beside ``out`` (``.<out name>.calibration.jsonl``); the card's
      ``calibration_guided`` records it.

    ``options``: the rest of :func:`tightrope.workflows.compress.compress_model`'s settings. Returns its summaries."""
    if report_path is None and calibration_report is None:
        raise TightropeError("Give an audit report to --recover-guided or --calibration-guided.")
    if not prune:
        raise TightropeError("--recover-guided and --calibration-guided defend a pruning: give --prune too.")
    if report_path is not None and not recover_steps:
        raise TightropeError("--recover-guided trains during the recovery after pruning: give --recover-steps N too.")
    if report_path is not None and recover_teacher is None:
        raise TightropeError("--recover-guided distils the pruned model toward the unpruned one on the search's "
                             "inputs: add --recover-teacher auto.")
    configs = [prune_config(p, include, exclude, calibration) for p in prune]
    if calibration_report is not None and not any(type(c).__name__ in CALIBRATED_PRUNERS for c in configs):
        raise TightropeError("--calibration-guided changes the texts a calibrated pruner reads (wanda, sparsegpt); "
                             f"{', '.join(prune)} reads none.")
    trained = trained_task(read_card(Path(models.resolve(model))))  # the card only: compress loads the model
    out = Path(out)
    source, task = calibration or trained, recover_task or trained
    if calibration_report is not None and not source:
        raise TightropeError(f"{model} does not record the task it was trained on: give --calibration.")
    if report_path is not None and not task:
        raise TightropeError(f"{model} does not record the task it was trained on: give --recover-task.")
    # every report read and checked before any file is written, so a bad second report leaves nothing behind
    finds = {r: guided_phrases(_read_report(r), configs, str(r)) for r in (calibration_report, report_path) if r}
    card_extra, recovery_extra = {}, {}
    if calibration_report is not None:
        path, card_extra["calibration_guided"] = _guided_file(calibration_report, finds[calibration_report], source,
                                                              out.parent / f".{out.name}.calibration.jsonl")
        calibration = str(path)
    if report_path is not None:
        path, recovery_extra["guided"] = _guided_file(report_path, finds[report_path], task,
                                                      out.parent / f".{out.name}.guided.jsonl")
        recover_task = str(path)
    return compress_model(model, out, prune=prune, recover_steps=recover_steps, recover_teacher=recover_teacher,
                          recover_task=recover_task, include=include, exclude=exclude, calibration=calibration,
                          recovery_extra=recovery_extra or None, card_extra=card_extra or None, **options)
