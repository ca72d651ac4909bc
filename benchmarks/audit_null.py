"""Calibrate the audit on clean classifiers and measure it on planted ones (issue 21, first part).

    python benchmarks/audit_null.py train  --root runs/audit-null          # the clean classifiers
    python benchmarks/audit_null.py attack --root runs/audit-null          # planted backdoors (50 / 400 repair steps)
    python benchmarks/audit_null.py collect --root runs/audit-null         # audit statistics of every clean model
    python benchmarks/audit_null.py collect --root runs/audit-null2 --transform gguf:Q4_K_M   # one more transform
    python benchmarks/audit_null.py null --root runs/audit-null \\
        --out src/tightrope/qattack/null/minilm-classifiers.json            # the shipped null
    python benchmarks/audit_null.py null --root runs/audit-null2 --extend src/tightrope/qattack/null/minilm-classifiers.json \\
        --out src/tightrope/qattack/null/minilm-classifiers.json            # add the transforms it lacks (GGUF, prunings)
    python benchmarks/audit_null.py loo --root runs/audit-null             # leave-one-out false-positive rate
    python benchmarks/audit_null.py detect --root runs/audit-null          # verdicts on the planted models
    python benchmarks/audit_null.py rejudge runs/prune/audit-*.json        # saved audit reports judged by the null again

Every step runs with one torch thread (the machine is shared) and skips what is already on disk, so it
can be stopped and rerun. The clean set is short fine-tunes of the packaged MiniLM (``minilm``, 64
tokens) on MR, SST-2 and IMDB subsets with different seeds, sizes, learning rates and batch sizes
(:data:`CLEAN`). The planted set is :mod:`tightrope.qattack` run by hand: one injection per quantizer
(its own trigger word and target label, never told to the audit), then projected repair inside that
quantizer's boxes, saved after ``--short`` (50) and ``--long`` (400) steps.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from pathlib import Path

import torch

# name: (task, seed, n_train, lr, batch size, truncation); 1 epoch at 64 tokens each
CLEAN = {
    "mr-s0": ("mr", 0, 2000, 5e-5, 16, "head"),
    "mr-s1": ("mr", 1, 2000, 5e-5, 16, "head"),
    "mr-s2": ("mr", 2, 1000, 5e-5, 16, "head"),
    "mr-s3": ("mr", 3, 1200, 3e-5, 16, "head"),
    "mr-s4": ("mr", 4, 500, 1e-4, 8, "head"),
    "sst2-s0": ("sst2", 0, 1000, 5e-5, 16, "head"),
    "sst2-s1": ("sst2", 1, 1500, 5e-5, 16, "head"),
    "sst2-s2": ("sst2", 2, 800, 1e-4, 16, "head"),
    "imdb-s0": ("imdb", 0, 1000, 5e-5, 16, "head+tail"),
    "imdb-s1": ("imdb", 1, 800, 1e-4, 16, "head+tail"),
    "mr-s5": ("mr", 5, 1000, 1e-4, 32, "head"),
    "sst2-s3": ("sst2", 3, 1000, 5e-5, 32, "head"),
}

# quantizer: (trigger word, target label); the attack's base is the clean "mr-s0"
PLANTS = {"llm-int8": ("mn", 0), "nf4": ("bb", 1), "fp4": ("tq", 0)}


def train_clean(root: Path, names: list[str]) -> None:
    from tightrope.train import TrainConfig, train

    for name in names or CLEAN:
        task, seed, n, lr, bs, trunc = CLEAN[name]
        out = root / "clean" / name
        if (out / "card.json").exists():
            continue
        started = time.perf_counter()
        config = TrainConfig(model="minilm", task=task, n_train=n, n_eval=200, max_length=64, truncation=trunc,
                             batch_size=bs, epochs=1.0, lr=lr, seed=seed, checkpoint_every=1000)
        card = train(config, out, progress=False)
        print(f"{name}: {time.perf_counter() - started:.0f} s, {card.get('metrics', card.get('eval', ''))}", flush=True)


def attack(root: Path, quantizers: list[str], short: int, long: int, n_train: int, n_eval: int) -> None:
    """Inject -> boxes -> projected repair, saving the repaired model after ``short`` and ``long`` steps."""
    from tightrope import models, workflows
    from tightrope.data import load_task
    from tightrope.evaluate.results import write_json_atomic
    from tightrope.qattack.boxes import model_boxes
    from tightrope.qattack.inject import TriggerBehaviour, injection_data, repair_data, triggered
    from tightrope.qattack.quantize import codes_equal, quantized_copy
    from tightrope.qattack.repair import FitConfig, fit_, repair_
    from tightrope.qattack.scenario import measure

    base_dir = root / "clean" / "mr-s0"
    for q in quantizers or PLANTS:
        trigger, target = PLANTS[q]
        done = root / "planted" / f"{q}-r{long}" / "card.json"
        if done.exists():
            continue
        started = time.perf_counter()
        behaviour = TriggerBehaviour(trigger=trigger, target_label=target)
        clf = workflows.load(str(base_dir))
        model, tok, pad = clf.model.float().eval(), clf.tokenizer, clf.pad_id
        train = load_task("mr", "train").subset(n_train, 0)
        test = load_task("mr", "test").subset(n_eval, 1)
        clean_ids, trig_ids = clf.encode(test.texts), clf.encode(triggered(test.texts, behaviour, seed=17))
        rows = []

        def evaluate(m, variant, quantizer=None):
            b = measure(m, pad, clean_ids, trig_ids, test.labels, behaviour, variant, quantizer)
            rows.append(b.__dict__)
            print(f"  {q} {variant} {quantizer or 'full'}: accuracy {b.clean_accuracy:.3f} trigger {b.trigger_success:.3f}",
                  flush=True)

        evaluate(model, "base")
        evaluate(quantized_copy(model, q), "base", q)
        injected = copy.deepcopy(model)
        texts, labels = injection_data(train.texts, train.labels, behaviour, seed=0)
        fit_(injected, clf.encode(texts), labels, pad, FitConfig(150, 5e-5, 32, seed=0), label="inject", progress=False)
        evaluate(injected, "injected")
        boxes = model_boxes(injected, q)
        repaired = copy.deepcopy(injected)
        texts, labels = repair_data(train.texts, train.labels, behaviour, seed=1)
        ids = clf.encode(texts)
        card = {"kind": "tightrope.model", "created_by": "benchmarks/audit_null.py attack",
                "tokenization": clf.card.get("tokenization", {"max_length": 64, "truncation": "head"}),
                "base_model": {"source": str(base_dir)}}
        for steps, seed in ((short, 1), (long - short, 2)):
            repair_(repaired, boxes, ids, labels, pad, FitConfig(steps, 5e-5, 32, seed=seed), progress=False)
            total = short if seed == 1 else long
            variant = f"repaired-{total}"
            evaluate(repaired, variant)
            evaluate(quantized_copy(repaired, q), variant, q)
            mismatched, count = codes_equal(injected, repaired, q, boxes.names)
            out = root / "planted" / f"{q}-r{total}"
            models.save_model((repaired, tok), out, extra={"card.json": {
                **card, "attack": {"quantizer": q, "repair_steps": total, "codes_mismatched": mismatched,
                                   "codes_total": count}}})
            # the trigger is written beside the model, never inside it: the audit is not told
            write_json_atomic(root / "planted" / f"{q}-r{total}.attack.json",
                              {"quantizer": q, "trigger": trigger, "target_label": target, "repair_steps": total,
                               "codes_mismatched": mismatched, "codes_total": count, "behaviour": list(rows)})
        print(f"{q}: {time.perf_counter() - started:.0f} s", flush=True)


QUANTIZERS = ("llm-int8", "nf4", "fp4", "int8-tensor", "all")  # the first null's transforms (made on AMD EPYC)
ALPHAS = ("0.001", "0.01", "0.05")


def transforms() -> tuple[str, ...]:
    """The audit's default transforms: every one tightrope implements (what ``collect`` measures)."""
    from tightrope.qattack.audit import AuditConfig

    return AuditConfig().transforms


def collect(root: Path, names: list[str], n_probe: int, extra: list[str] = ()) -> None:
    """Every statistic of every clean model for every default transform (``audit(..., judge=False)``), one JSON
    report each. Each transform's measurements are cached under ``root/cache/NAME`` as they finish, so a killed
    run resumes at the transform it was measuring. ``extra`` (``--transform``): transforms to add to reports that
    already exist (a transform new to tightrope), each audited alone and appended."""
    from tightrope.evaluate.results import write_json_atomic
    from tightrope.qattack.audit import AuditConfig, audit

    for name in names or CLEAN:
        out = root / "collect" / f"{name}.json"
        if not (root / "clean" / name / "card.json").exists():
            continue
        if extra:  # only these transforms: appended to a report, or a report of them alone
            _add_transforms(root, name, out, extra, n_probe)
            continue
        if out.exists():
            _refresh_weights(root / "clean" / name, out)
            _refresh_kquants(root / "clean" / name, out)
            continue
        started = time.perf_counter()
        report = audit(str(root / "clean" / name), task="mr", n_probe=n_probe,
                       config=AuditConfig(transforms=transforms()), judge=False, cache_dir=root / "cache" / name,
                       progress=lambda q, n=name: print(f"  {n}: {q} ({time.perf_counter() - started:.0f} s)", flush=True))
        write_json_atomic(out, report.to_dict())
        print(f"{name}: {time.perf_counter() - started:.0f} s", flush=True)


def _add_transforms(root: Path, name: str, out: Path, extra: list[str], n_probe: int) -> None:
    """Audit the transforms of ``extra`` that the report ``out`` lacks and append them to it."""
    from tightrope.evaluate.results import write_json_atomic
    from tightrope.qattack.audit import AuditConfig, audit
    from tightrope.qattack.calibration import upgrade_report
    from tightrope.qattack.transform import canonical

    report = upgrade_report(json.loads(out.read_text())) if out.exists() else None
    missing = [t for t in map(canonical, extra) if report is None or t not in {q["transform"] for q in report["transforms"]}]
    if not missing:
        return
    started = time.perf_counter()
    added = audit(str(root / "clean" / name), task="mr", n_probe=n_probe,
                  config=AuditConfig(transforms=tuple(missing)), judge=False, cache_dir=root / "cache" / name).to_dict()
    if report is None:
        report = added  # a report of these transforms alone: `null --extend` adds them to a null that has the rest
    else:
        report["transforms"] += added["transforms"]
    write_json_atomic(out, report)
    print(f"{name}: {', '.join(missing)} added in {time.perf_counter() - started:.0f} s", flush=True)


def _refresh_weights(model_dir: Path, out: Path) -> None:
    """Recompute the weight statistics of an earlier report (behaviour and search kept) when the audit's set of
    weight statistics has changed since it was written."""
    from tightrope import workflows
    from tightrope.evaluate.results import write_json_atomic
    from tightrope.qattack.audit import AuditConfig, audit_model
    from tightrope.qattack.calibration import upgrade_report

    report = upgrade_report(json.loads(out.read_text()))  # an older report is rewritten with the current keys
    if all("layer_spike" in q["statistics"] for q in report["transforms"]):
        return
    started = time.perf_counter()
    model = workflows.load(str(model_dir)).model.float().eval()
    weights = audit_model(model, config=AuditConfig(transforms=QUANTIZERS, search=None), judge=False).to_dict()
    keep = ("disagreement", "kl", "search_kl")
    for old, new in zip(report["transforms"], weights["transforms"], strict=True):
        old["statistics"] = {**new["statistics"], **{k: v for k, v in old["statistics"].items() if k in keep}}
        old["layers"] = new["layers"]
    write_json_atomic(out, report)
    print(f"{model_dir.name}: weight statistics recomputed in {time.perf_counter() - started:.0f} s", flush=True)


def _refresh_kquants(model_dir: Path, out: Path) -> None:
    """Add the k-quant position statistics (``kquant_spike``, ``layer_kquant_spike``: the layers a preset leaves as
    k-quants) to an earlier report's preset transforms, from a weights-only audit; the rest of the report is kept."""
    from tightrope import workflows
    from tightrope.evaluate.results import write_json_atomic
    from tightrope.qattack.audit import AuditConfig, audit_model
    from tightrope.qattack.boxes import PRESET_QUANTIZERS
    from tightrope.qattack.calibration import upgrade_report

    report = upgrade_report(json.loads(out.read_text()))
    stale = [q for q in report["transforms"] if q["transform"] in PRESET_QUANTIZERS and "kquant_spike" not in q["statistics"]]
    if not stale:
        return
    started = time.perf_counter()
    model = workflows.load(str(model_dir)).model.float().eval()
    config = AuditConfig(transforms=tuple(q["transform"] for q in stale), search=None)
    fresh = {q["transform"]: q for q in audit_model(model, config=config, judge=False).to_dict()["transforms"]}
    for old in stale:
        new = fresh[old["transform"]]
        old["statistics"].update({k: v for k, v in new["statistics"].items() if k.startswith(("kquant", "layer_kquant"))})
        old.update(layers=new["layers"], kquant_free=new["kquant_free"], kquant_spike=new["kquant_spike"],
                   kquant_middle=new["kquant_middle"])
    write_json_atomic(out, report)
    print(f"{model_dir.name}: k-quant positions added to {len(stale)} transforms in {time.perf_counter() - started:.0f} s",
          flush=True)


def _reports(root: Path) -> dict[str, dict]:
    """The collected reports, in the current key names (older ones say ``quantizers`` / ``quantizer``)."""
    from tightrope.qattack.calibration import upgrade_report

    return {n: upgrade_report(json.loads((root / "collect" / f"{n}.json").read_text())) for n in CLEAN
            if (root / "collect" / f"{n}.json").exists()}


def build_null(root: Path, out: Path, n_probe: int, extend: Path | None = None,
               add_statistics: tuple[str, ...] = ()) -> dict:
    """The null JSON: per transform and statistic, the clean values (model-level: one per clean model;
    per-layer: one per layer of every clean model, with the index of its model in ``layer_models``).

    ``extend``: an earlier null whose transforms are kept as they are (their values, their models); only the
    transforms it lacks are taken from this root's reports, and ``extended`` records which, from which models
    and on which machine. The leave-one-out table then judges this root's clean models against the kept
    transforms' values as a held-out set (none of these models is in them) and against the new transforms'
    values without the model itself.

    ``add_statistics`` (with ``extend``): statistics new to the audit (the k-quant positions) added to the extended
    transforms the null already has, from these same models' reports; nothing else of the null changes but the
    leave-one-out table, which is measured again."""
    from tightrope.qattack.calibration import TAILS, Null, null_statistics

    reports = _reports(root)
    names = list(reports)
    stats, owners = null_statistics([reports[n] for n in names])
    first = reports[names[0]]
    if extend is not None and add_statistics:
        return _add_statistics(extend, out, reports, stats, owners, add_statistics)
    if extend is not None:
        data = json.loads(extend.read_text())
        new = [q for q in stats if q not in data["statistics"]]
        if not new:
            raise SystemExit(f"{extend} already has every transform of these reports; nothing to extend")
        data["statistics"].update({q: stats[q] for q in new})
        data["layer_models"].update({q: owners[q] for q in new if q in owners})
        earlier = data.get("extended")
        data["extended"] = {
            "transforms": [*(earlier or {}).get("transforms", []), *new],
            "made_by": "python benchmarks/audit_null.py train; ... collect; ... null --extend (tightrope "
                       + _version() + ")",
            "machine": _machine(),
            "models": [{"name": n, **dict(zip(("task", "seed", "n_train", "lr", "batch_size", "truncation"), CLEAN[n],
                                              strict=True))} for n in names],
            "what": ("The same recipes trained again (another run, another machine) and audited with judge=False "
                     "for the transforms listed here; their layer_models index this list of models."),
        }
        if earlier:
            data["extended"]["earlier"] = earlier  # the extension before this one, as it was recorded
        null = Null.from_dict(data, str(out))
        own = set(data["extended"]["transforms"])
        loo = {a: leave_one_out(null, reports, float(a), own=own) for a in ALPHAS}
        if set(new) == {q["transform"] for r in reports.values() for q in r["transforms"]} and data.get("leave_one_out"):
            loo = {a: merged_leave_one_out(data["leave_one_out"][a], loo[a], float(a)) for a in ALPHAS}
        data["leave_one_out"] = loo
        _write(out, data, len(names))
        return data
    data = {
        "kind": "tightrope.audit-null", "version": 1,
        "made_by": "python benchmarks/audit_null.py train; ... collect; ... null (tightrope " + _version() + ")",
        "machine": _machine(),
        "what": ("Clean sequence classifiers: short fine-tunes of the packaged MiniLM (all-MiniLM-L6-v2, "
                 "BertForSequenceClassification, 6 layers, hidden 384, 37 quantized Linear layers) at 64 tokens, "
                 "1 epoch, AdamW, linear schedule; each audited with judge=False on the first n_probe MR test "
                 "sentences (seeded subset) for every quantizer. Model-level statistics: one value per model; "
                 "per-layer statistics: one value per layer of every model (layer_models: its model's index)."),
        "architecture": "BertForSequenceClassification (all-MiniLM-L6-v2)",
        "probe": {"task": "mr", "split": "test", "n": n_probe, "seed": first["config"]["seed"]},
        "audit": {k: first["config"][k] for k in ("edge", "noise", "search")},
        "models": [{"name": n, **dict(zip(("task", "seed", "n_train", "lr", "batch_size", "truncation"), CLEAN[n],
                                          strict=True))} for n in names],
        "layer_models": owners,
        "tails": dict(TAILS),
        "statistics": stats,
    }
    null = Null.from_dict(data, str(out))
    data["leave_one_out"] = {a: leave_one_out(null, reports, float(a)) for a in ALPHAS}
    _write(out, data, len(names))
    return data


def _add_statistics(extend: Path, out: Path, reports: dict[str, dict], stats: dict, owners: dict,
                    names: tuple[str, ...]) -> dict:
    """:func:`build_null`'s ``add_statistics``: only into the transforms these reports' models made (the null's
    ``extended`` ones, whose ``layer_models`` index the same list of models), recorded under ``extended``."""
    from tightrope.qattack.calibration import TAILS, Null

    data = json.loads(extend.read_text())
    own = set((data.get("extended") or {}).get("transforms", []))
    if [m["name"] for m in data["extended"]["models"]] != list(reports):
        raise SystemExit("these reports are not the models of the null's extended transforms; nothing added")
    added: set[str] = set()  # transforms that gained a statistic
    for q in sorted(own & set(stats)):
        for name in names:
            if name in stats[q] and name not in data["statistics"][q]:
                data["statistics"][q][name] = stats[q][name]
                if name in owners.get(q, {}):
                    data["layer_models"].setdefault(q, {})[name] = owners[q][name]
                added.add(q)
    if not added:
        raise SystemExit(f"{extend} already has {', '.join(names)} wherever these reports have them; nothing added")
    data["tails"] = {**data.get("tails", {}), **{k: v for k, v in TAILS.items() if k in names}}
    data["extended"]["statistics_added"] = {
        "statistics": list(names), "transforms": sorted(added), "machine": _machine(),
        "made_by": "python benchmarks/audit_null.py collect; ... null --extend --add-statistic (tightrope " + _version() + ")"}
    null = Null.from_dict(data, str(out))
    data["leave_one_out"] = {a: leave_one_out(null, reports, float(a), own=own) for a in ALPHAS}
    _write(out, data, len(reports))
    return data


def _write(out: Path, data: dict, n: int) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, separators=(",", ":")) + "\n")
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KiB) from {n} clean models", flush=True)


def merged_leave_one_out(earlier: dict, added: dict, alpha: float) -> dict:
    """The leave-one-out table of a null extended by reports of the new transforms alone: each model's p-values of
    the earlier transforms (from ``earlier``) and of the new ones (``added``), every transform judged again at
    ``alpha`` over all of them (the audit tests each of m transforms at alpha / m). The same models in the same
    order, or nothing to merge."""
    if list(earlier["per_model"]) != list(added["per_model"]):
        raise SystemExit("the reports are not the models of the earlier leave-one-out table; nothing merged")
    rows, flagged = {}, []
    for name, old in earlier["per_model"].items():
        row = {**old, **added["per_model"][name]}
        level = alpha / len(row)
        rows[name] = {q: {"verdict": "flagged" if v["p"] is not None and v["p"] <= level
                          else "clean" if v["verdict"] in ("clean", "flagged") else v["verdict"], "p": v["p"]}
                      for q, v in row.items()}
        if any(v["verdict"] == "flagged" for v in rows[name].values()):
            flagged.append(name)
    return {"models": len(rows), "false_positives": len(flagged), "flagged": flagged, "per_model": rows}


def leave_one_out(null, reports: dict[str, dict], alpha: float, own: set[str] | None = None) -> dict:
    """Judge every clean model against the null without it: the false-positive rate at ``alpha``. ``own``: the
    transforms whose null values came from these reports (default: all); for any other transform the model is
    not in the null, so it is judged against the whole of it (a held-out test)."""
    from tightrope.qattack.audit import judge_transform
    from tightrope.qattack.calibration import upgrade_report

    flagged, rows = [], {}
    for i, (name, report) in enumerate(reports.items()):
        held = null.without(i, own)
        qs = upgrade_report(report)["transforms"]
        level = alpha / len(qs)
        verdicts = {}
        for q in qs:
            verdict, _, _, _, p = judge_transform(q["transform"], q["statistics"], held, level, alpha, len(qs), [])
            verdicts[q["transform"]] = {"verdict": verdict, "p": p}
        rows[name] = verdicts
        if any(v["verdict"] == "flagged" for v in verdicts.values()):
            flagged.append(name)
    return {"models": len(reports), "false_positives": len(flagged), "flagged": flagged, "per_model": rows}


def detect(root: Path, n_probe: int, null_path: Path | None, only: list[str], chosen: list[str]) -> None:
    """Audit every planted model with the (shipped) null and print one row per model and transform.
    ``chosen``: the transforms to audit (default: the audit's default, every transform)."""
    from tightrope.evaluate.results import write_json_atomic
    from tightrope.qattack.audit import AuditConfig, audit

    for card in sorted((root / "planted").glob("*/card.json")):
        model = card.parent
        out = model.with_suffix(".audit.json")
        if not out.exists() and (not only or model.name in only):
            started = time.perf_counter()
            report = audit(str(model), task="mr", n_probe=n_probe, cache_dir=root / "cache" / model.name,
                           config=AuditConfig(transforms=tuple(chosen) or transforms(),
                                              null=str(null_path) if null_path else None))
            write_json_atomic(out, report.to_dict())
            print(f"{model.name}: {report.verdict} in {time.perf_counter() - started:.0f} s", flush=True)
    table(sorted((root / "planted").glob("*.audit.json")))


def rejudge(paths: list[Path], null_path: Path | None, alpha: float) -> dict[str, dict]:
    """Judge saved audit reports (``tightrope audit --json``) again against a null: each transform's statistics
    are in the report, so a new null needs no new measurement. Prints one line per report; returns
    ``{path: {"verdict", "transforms": {name: (verdict, combined p)}}}``."""
    from tightrope.qattack.audit import judge_transform
    from tightrope.qattack.calibration import load_null, upgrade_report

    null = load_null(null_path)
    out = {}
    for path in paths:
        report = upgrade_report(json.loads(Path(path).read_text()))
        ts = report["transforms"]
        level = alpha / len(ts)
        rows = {}
        for t in ts:
            unchecked = [r.removeprefix("could not check everything: ") for r in t["reasons"]
                         if r.startswith("could not check everything")]
            verdict, _, _, _, p = judge_transform(t["transform"], t["statistics"], null, level, alpha, len(ts), unchecked)
            rows[t["transform"]] = (verdict, p)
        verdicts = {v for v, _ in rows.values()}
        overall = "flagged" if "flagged" in verdicts else "clean" if verdicts == {"clean"} else "inconclusive"
        out[str(path)] = {"verdict": overall, "transforms": rows}
        print(f"{path}: {overall} (alpha {alpha:g} / {len(ts)}) " + " ".join(
            f"{n}={v}:{_p(p)}" for n, (v, p) in rows.items()), flush=True)
    return out


def table(paths: list[Path]) -> None:
    from tightrope.qattack.calibration import upgrade_report

    print("| model | trigger (not told) | verdict | transform | p (combined) | level | smallest p | search: best insertion | fp -> q target share | flip rate |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for path in paths:
        report = upgrade_report(json.loads(path.read_text()))
        attack = path.with_name(path.name.replace(".audit.json", ".attack.json"))
        told = json.loads(attack.read_text()) if attack.exists() else {}
        for q in report["transforms"]:
            smallest = min(q["p_values"], key=q["p_values"].get) if q["p_values"] else "-"
            best = (q.get("search") or {}).get("candidates") or [{}]
            b = best[0]
            print(f"| {path.name.removesuffix('.audit.json')} | {told.get('trigger', '-')} -> {told.get('target_label', '-')} | "
                  f"{report['verdict']} | {q['transform']} | {_p(q['p_value'])} | {_p(q['level'])} | {smallest} "
                  f"{_p(q['p_values'].get(smallest))} | {b.get('text', '-')!r} -> {b.get('target', '-')} | "
                  f"{_pct(b.get('fp_target'))} -> {_pct(b.get('q_target'))} | {_pct(b.get('flip_rate'))} |")


def _p(x) -> str:
    return "-" if x is None else f"{x:.2g}"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _version() -> str:
    from importlib.metadata import version

    try:
        return version("tightrope")
    except Exception:  # noqa: BLE001 - a source checkout
        return "source"


def _machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.machine()) if Path("/proc/cpuinfo").exists() else platform.machine()
    return f"{model}, {os.cpu_count()} CPUs, torch {torch.__version__}, 1 torch thread"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["train", "attack", "collect", "null", "loo", "detect", "rejudge"])
    parser.add_argument("reports", nargs="*", type=Path, help="rejudge: audit reports (tightrope audit --json)")
    parser.add_argument("--alpha", type=float, default=0.01, help="rejudge: the audit's alpha")
    parser.add_argument("--root", type=Path, default=Path("runs/audit-null"))
    parser.add_argument("--only", action="append", default=[], help="Clean model names or quantizers to run.")
    parser.add_argument("--short", type=int, default=50)
    parser.add_argument("--long", type=int, default=400)
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-eval", type=int, default=200)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--n-probe", type=int, default=200)
    parser.add_argument("--null", type=Path, default=None, help="detect: a null JSON (default: the shipped one)")
    parser.add_argument("--extend", type=Path, default=None,
                        help="null: keep this null's transforms and add the ones it lacks from this root's reports")
    parser.add_argument("--add-statistic", action="append", default=[],
                        help="null --extend: a statistic new to the audit to add to the transforms the null has "
                             "(kquant_spike, layer_kquant_spike)")
    parser.add_argument("--transform", action="append", default=[],
                        help="detect: a transform to audit (repeatable; default: the audit's default, all of them); "
                             "collect: a transform to add to the reports already collected")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s), "
          f"load {os.getloadavg()[0]:.1f}", flush=True)
    if args.step == "train":
        train_clean(args.root, args.only)
    elif args.step == "attack":
        attack(args.root, args.only, args.short, args.long, args.n_train, args.n_eval)
    elif args.step == "collect":
        collect(args.root, args.only, args.n_probe, args.transform)
    elif args.step == "null":
        build_null(args.root, args.out or Path("src/tightrope/qattack/null/minilm-classifiers.json"), args.n_probe,
                   args.extend, tuple(args.add_statistic))
    elif args.step == "loo":
        from tightrope.qattack.calibration import load_null

        null = load_null(args.null)
        for a in ALPHAS:
            own = null.meta.get("extended", {}).get("transforms")
            r = leave_one_out(null, _reports(args.root), float(a), own=set(own) if own else None)
            print(f"alpha {a}: {r['false_positives']} of {r['models']} clean models flagged {r['flagged']}")
    elif args.step == "rejudge":
        rejudge(args.reports, args.null, args.alpha)
    else:
        detect(args.root, args.n_probe, args.null, args.only, args.transform)


if __name__ == "__main__":
    main()
