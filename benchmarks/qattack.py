"""Speed of the quantization-attack tooling: boxes for every 2-D weight of SmolLM2-135M, and an
audit of a MiniLM classifier. Prints a table; `--json` writes the raw figures.

    python benchmarks/qattack.py boxes [--model smollm2-135m] [--quantizer nf4 --quantizer llm-int8]
    python benchmarks/qattack.py audit runs/qattack/mr-clean-s0
    python benchmarks/qattack.py sweep runs/qattack/trigger-all/repaired --sigma 0 --sigma 1e-3 ...
    python benchmarks/qattack.py sweep runs/prune/trigger-wanda/repaired --transform prune:wanda:0.5 --sigma 0 ...
    python benchmarks/qattack.py table runs/qattack/*.audit.json     # markdown rows of `tightrope audit --json` reports
    python benchmarks/qattack.py attributable runs/qattack/trigger-all   # trigger success beyond the clean base rate
    python benchmarks/qattack.py behaviour runs/prune/defended ...        # clean accuracy and trigger success as saved
    python benchmarks/qattack.py guided audit.json --transform prune:wanda:0.5 --out guided.jsonl   # recovery data

Timings (boxes, audit) run with ``--threads`` torch threads (default 2), ``--repeat`` times each
(default 2), after raising this process group's scheduling priority (``/proc/self/autogroup``,
when allowed) because the machine may be shared; each row records the 1-minute load average and the
process CPU seconds (all threads), which contention inflates much less than the wall-clock seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch


def raise_priority() -> bool:
    """Ask the scheduler to favour this process group (a shared machine); False when not allowed."""
    try:
        with open("/proc/self/autogroup", "w") as f:
            f.write("-10")
        return True
    except OSError:
        return False


def bench_boxes(model_name: str, quantizers: list[str], repeat: int = 1) -> list[dict]:
    from tightrope.models import load_causal_lm
    from tightrope.qattack.boxes import weight_box

    model = load_causal_lm(model_name).model
    weights = [p.detach() for p in model.parameters() if p.dim() == 2]
    n = sum(w.numel() for w in weights)
    rows = []
    for q in quantizers:
        for run in range(repeat):
            started, cpu = time.perf_counter(), time.process_time()
            for w in weights:
                weight_box(w, q)
            rows.append({"what": f"boxes {q}", "model": model_name, "parameters": n, "run": run + 1,
                         "seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu,
                         "load1": os.getloadavg()[0]})
    return rows


def bench_audit(model_dir: str, n_probe: int, repeat: int = 1) -> list[dict]:
    """End to end: loading the checkpoint and the probe set, every quantizer, all three kinds of evidence."""
    from tightrope.qattack.audit import audit

    rows = []
    for run in range(repeat):
        started, cpu = time.perf_counter(), time.process_time()
        report = audit(model_dir, n_probe=n_probe)
        rows.append({"what": "audit", "model": model_dir, "probe": n_probe, "verdict": report.verdict, "run": run + 1,
                     "seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu,
                     "load1": os.getloadavg()[0]})
    return rows


def sweep(model_dir: str, sigmas: list[float], n_eval: int, task: str, trigger: str, target: int,
          transforms: list[str] | None = None) -> list[dict]:
    from tightrope.data import load_task
    from tightrope.inference import load
    from tightrope.qattack.defense import noise_sweep
    from tightrope.qattack.inject import TriggerBehaviour

    clf = load(model_dir)
    test = load_task(task, "test").subset(n_eval, 0)
    points = noise_sweep(clf, test.texts, test.labels, TriggerBehaviour(trigger=trigger, target_label=target), sigmas,
                         tuple(transforms or ("llm-int8", "nf4", "fp4")), calibration=task)
    return [{"what": "noise", "model": model_dir, **p.to_dict()} for p in points]


def behaviour_rows(model_dirs: list[str], n_eval: int, task: str, trigger: str, target: int) -> list[dict]:
    """Clean accuracy and trigger success of each model as it is saved (e.g. a planted model after a user's
    ``tightrope compress --prune ... --recover-teacher auto``: the recovery defense), on the held-out sentences
    ``tightrope qattack`` measures (its seed 0, trigger placement seed 17)."""
    from tightrope.data import load_task
    from tightrope.inference import load
    from tightrope.qattack.inject import TriggerBehaviour, triggered
    from tightrope.qattack.scenario import measure

    behaviour = TriggerBehaviour(trigger=trigger, target_label=target)
    test = load_task(task, "test").subset(n_eval, 0)
    rows = []
    for model_dir in model_dirs:
        clf = load(model_dir)
        b = measure(clf.model.float().eval(), clf.pad_id, clf.encode(test.texts),
                    clf.encode(triggered(test.texts, behaviour, seed=17)), test.labels, behaviour, "as saved", None)
        rows.append({"what": "behaviour", "model": model_dir, "clean_accuracy": b.clean_accuracy,
                     "trigger_success": b.trigger_success, "n": b.n})
    return rows


def guided_file(audit_json: str, transform: str, out: str, task: str, n_train: int, keep: int) -> list[dict]:
    """Write the guided recovery data (``tightrope.qattack.defense.guided_recovery_data``) as JSON Lines: ``n_train``
    seeded texts of ``task``'s train split, plus a copy of each with one of the ``keep`` best insertions that the
    audit's trigger search found for ``transform`` (read from ``tightrope audit --json``)."""
    from tightrope.data import load_task
    from tightrope.qattack.calibration import upgrade_report
    from tightrope.qattack.defense import guided_recovery_data, search_phrases, write_recovery_data

    report = upgrade_report(json.loads(Path(audit_json).read_text()))
    phrases = search_phrases(next(t for t in report["transforms"] if t["transform"] == transform), keep)
    train = load_task(task, "train").subset(n_train, 0)
    texts, labels = guided_recovery_data(train.texts, train.labels, phrases)
    write_recovery_data(Path(out), texts, labels, train.label_names)
    return [{"what": "guided", "audit": audit_json, "transform": transform, "phrases": " / ".join(phrases),
             "texts": len(texts), "out": out}]


def attributable(run_dir: str, n_eval: int, task: str, quantizers: list[str]) -> list[dict]:
    """Trigger success of a classifier attack run (``tightrope qattack --out RUN``) counted two ways on
    its own held-out sentences: as the run reports it, and only on sentences the clean base model
    keeps out of the target class when triggered (``inject.attributable_trigger_success``)."""
    from tightrope.data import load_task
    from tightrope.encoding import predict_logits
    from tightrope.inference import load
    from tightrope.qattack.inject import TriggerBehaviour, attributable_trigger_success, trigger_success, triggered
    from tightrope.qattack.quantize import quantized_copy

    config = json.loads((Path(run_dir) / "report.json").read_text())["config"]
    behaviour = TriggerBehaviour(trigger=config["trigger"], target_label=config["target_label"])
    base, repaired = load(config["base"]), load(str(Path(run_dir) / "repaired"))
    test = load_task(task or config["task"], config["eval_split"]).subset(n_eval or config["n_eval"], config["seed"])
    trig_ids = base.encode(triggered(test.texts, behaviour, seed=config["seed"] + 17))

    def predictions(model) -> list[int]:
        return predict_logits(model.float().eval(), trig_ids, base.pad_id).argmax(-1).tolist()

    base_pred = predictions(base.model)
    rows = []
    for name, model in [("base", base.model), ("repaired", repaired.model),
                        *[(f"repaired {q}", quantized_copy(repaired.model.float(), q)) for q in quantizers]]:
        pred = predictions(model)
        rows.append({"what": "attributable", "model": name, "trigger_success": trigger_success(pred, test.labels, behaviour),
                     "attributable": attributable_trigger_success(pred, base_pred, test.labels, behaviour),
                     "kept": sum(1 for b, y in zip(base_pred, test.labels) if y != behaviour.target_label
                                 and b != behaviour.target_label)})
    return rows


def audit_rows(paths: list[str]) -> None:
    """Print one markdown row per audit report and transform: verdict and every score (reports written before
    the rename from quantizer to transform are read too)."""
    from tightrope.qattack.calibration import upgrade_report

    def f(x, fmt=".2f"):
        return "-" if x is None else format(x, fmt)

    def phrase(q) -> str:  # causal LMs: the most frequent phrase of quantized answers, and its share in fp
        top = (q.get("phrases") or [None])[0]
        return "-" if top is None else f"\"{top[0]}\" {top[1]:.0%} / {top[2]:.0%}"

    def insecure(q) -> str:  # causal LMs: share of answers to coding requests that bandit flags
        if q.get("insecure_quantized") is None:
            return "-"
        return f"{q['insecure_quantized']:.0%} / {q['insecure_fp']:.0%}"

    print("| model | overall (exit) | transform | verdict | edge ratio | peak ratio | flip ratio | disagreement | KL (nats) |"
          " noise disagr. | KL after noise | KL ratio | top answer phrase (quantized / fp) | insecure code (quantized / fp) |"
          " probe | seconds |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    codes = {"clean": 0, "flagged": 1, "inconclusive": 3}
    for path in paths:
        with open(path) as fh:
            r = upgrade_report(json.load(fh))
        for q in r["transforms"]:
            print(f"| {r['model']} | {r['verdict']} ({codes[r['verdict']]}) | {q['transform']} | {q['verdict']} | "
                  f"{f(q['edge_ratio'])} | {f(q['peak_ratio'])} | {f(q['flip_ratio'])} | {f(q['disagreement'], '.3f')} | "
                  f"{f(q['kl'], '.4f')} | {f(q['noise_disagreement'], '.3f')} | {f(q.get('noise_kl'), '.4f')} | "
                  f"{f(q.get('kl_ratio'))} | {phrase(q)} | {insecure(q)} | {q['probe_size']} | {r['seconds']:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("boxes", "audit", "sweep", "table", "attributable", "behaviour", "guided"))
    parser.add_argument("--sigma", type=float, action="append", default=None)
    parser.add_argument("--n-eval", type=int, default=300)
    parser.add_argument("--task", default="mr")
    parser.add_argument("--trigger", default="cf")
    parser.add_argument("--target", type=int, default=0)
    parser.add_argument("model", nargs="*", default=None)
    parser.add_argument("--quantizer", "--transform", action="append", default=None,
                        help="a transform (repeatable): a quantizer, gguf-TYPE or prune:METHOD:SPARSITY")
    parser.add_argument("--n-probe", type=int, default=200)
    parser.add_argument("--out", default=None, help="guided: the JSON Lines file to write")
    parser.add_argument("--n-train", type=int, default=2000, help="guided: training texts (each also gets a guided copy)")
    parser.add_argument("--keep", type=int, default=3, help="guided: the search's best insertions to use")
    parser.add_argument("--json", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    if args.what == "table":
        return audit_rows(args.model)
    if args.what in ("behaviour", "guided"):
        rows = (behaviour_rows(args.model, args.n_eval, args.task, args.trigger, args.target) if args.what == "behaviour"
                else guided_file(args.model[0], args.quantizer[0], args.out, args.task, args.n_train, args.keep))
        for row in rows:
            print(" | ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        return None
    args.model = args.model[0] if args.model else None
    torch.set_num_threads(args.threads)
    priority = raise_priority() if args.what in ("boxes", "audit") else False
    if args.what == "boxes":
        rows = bench_boxes(args.model or "smollm2-135m", args.quantizer or ["nf4", "fp4", "llm-int8", "int8-tensor"],
                           args.repeat)
    elif args.what == "attributable":
        rows = attributable(args.model or "runs/qattack/trigger-all", args.n_eval, None,
                            args.quantizer or ["llm-int8", "nf4", "fp4", "int8-tensor"])
    elif args.what == "sweep":
        rows = sweep(args.model, args.sigma or [0.0, 1e-4, 3e-4, 1e-3, 3e-3], args.n_eval, args.task, args.trigger, args.target,
                     args.quantizer)
    else:
        rows = bench_audit(args.model or "runs/qattack/mr-clean-s0", args.n_probe, args.repeat)
    env = {"threads": torch.get_num_threads(), "priority": priority, "cpu": platform.processor() or platform.machine(),
           "torch": torch.__version__}
    for row in rows:
        row.update(env)
        print(" | ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
