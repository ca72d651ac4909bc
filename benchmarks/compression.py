"""Issue 4's acceptance table: every compression variant of one fine-tuned model, side by side, in one run.

    python benchmarks/compression.py MODEL_DIR --task imdb --n 500 --out runs/bench-compression

Each tightrope variant is compressed, saved, reloaded from disk and evaluated (accuracy, F1, stored
MB, parameters total / non-zero, latency at batch 1 x 256 (median, p95), throughput at batch
32 x 128, peak RSS in a fresh process). Peers run in memory on the same code path: torch's own
``quantize_dynamic``, torchao int8 weight-only and ONNX Runtime's dynamic int8 used directly.
Every fast variant's batch-1 latency is then taken again, each variant in its own process, visited in
shuffled interleaved rounds (OUT/interleaved.json; ``perf.isolated_latency`` says why processes),
which is where speed-ups are read on a machine whose speed drifts. Writes
OUT/compression.json and a Markdown fragment (command + machine) to OUT/compression.md, to paste
into docs/benchmarks.md. Unstructured sparsity does not make dense products faster; the table says
so by measuring it.

    python benchmarks/compression.py MODEL_DIR --int8-options --n 500 --out runs/bench-int8

measures the int8 dynamic options instead (graph fusion, per channel / per tensor, reduced range,
backend): accuracy on the same examples, and batch-1 latency taken *interleaved* (each round visits
fp32 eager and every option once, each in its own process), so that load from other jobs on a shared
machine falls on all of them alike. Writes OUT/int8-options.json and the Markdown fragment OUT/int8-options.md.
"""

from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import os
import platform
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tightrope import inference, workflows
from tightrope.compress import FP4, GPTQ, NF4, Int8Dynamic, LLMInt8, compress_, formats, onnxrt, recovery
from tightrope.compress.wanda import set_tokenizer
from tightrope.data import load_task
from tightrope.errors import TightropeError
from tightrope.evaluate.results import write_json_atomic
from tightrope.workflows.evaluate import evaluate_model


@dataclass(frozen=True)
class Recover:
    """Not a compression config: a step of this benchmark that runs ``recovery.recover`` (short fine-tuning
    on the task's train split, sparsity held) on the model pruned so far; cached in OUT by name."""

    steps: int = 200
    max_length: int = 128


def tightrope_variants(calibration: str, recover_steps: int = 200) -> dict[str, list]:
    from tightrope.compress import prune  # noqa: PLC0415

    structured = prune.StructuredPruning(heads=0.3, ffn=0.3)
    return {
        "fp32": [],
        "int8 (tightrope default)": [Int8Dynamic()],
        "int8 torch backend": [Int8Dynamic(backend="torch")],
        "LLM.int8": [LLMInt8()],
        "NF4": [NF4()],
        "FP4": [FP4()],
        # one pass of the dense model calibrates every layer, as when docs/benchmarks.md's table was measured
        "GPTQ 4-bit g128": [GPTQ(bits=4, group_size=128, calibration_texts=calibration, n_calibration=128,
                                 sequential=False)],
        "magnitude 30%": [prune.MagnitudePruning(sparsity=0.3)],
        "int8 onnxruntime unfused (previous default)": [Int8Dynamic(backend="onnxruntime", fuse=False)],
        "structured 30%": [structured],
        "structured 30% + int8": [structured, Int8Dynamic()],
        f"structured 30% + recovery ({recover_steps} steps)": [structured, Recover(recover_steps)],
        f"structured 30% + recovery ({recover_steps} steps) + int8": [structured, Recover(recover_steps), Int8Dynamic()],
    }


def peer_torch_dynamic(model):
    from torch.ao.quantization import quantize_dynamic  # noqa: PLC0415

    return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def peer_torchao_int8_weight_only(model):
    # torchao is installed only for this benchmark: transformers imports it on every model import
    # once it is present (noisy "Failed to load _C_mxfp8" lines on CPU builds).
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_  # noqa: PLC0415
    except ImportError as err:
        raise TightropeError("torchao is not installed: pip install torchao==0.18.0 to run this peer.") from err

    quantize_(model, Int8WeightOnlyConfig())
    return model


def peer_ort_dynamic(model):
    """Whole-graph ORT dynamic int8 on every MatMul, straight from onnxruntime.quantization."""
    from onnxruntime.quantization import QuantType, quantize_dynamic  # noqa: PLC0415
    from transformers.modeling_outputs import SequenceClassifierOutput  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as tmp:
        fp32, int8 = Path(tmp) / "m.onnx", Path(tmp) / "m8.onnx"
        onnxrt.export_onnx(model, fp32)
        quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8)
        session = onnxrt.ort_session(int8.read_bytes())

    def forward(input_ids=None, attention_mask=None, **_):
        return SequenceClassifierOutput(logits=onnxrt.run_session(session, input_ids, attention_mask))

    model.forward = forward
    return model


INT8_OPTIONS = {
    "ORT fused, per channel (default)": Int8Dynamic(backend="onnxruntime"),
    "ORT fused, per channel, reduce_range": Int8Dynamic(backend="onnxruntime", reduce_range=True),
    "ORT fused, per tensor": Int8Dynamic(backend="onnxruntime", per_channel=False),
    "ORT fused, per tensor, reduce_range": Int8Dynamic(backend="onnxruntime", per_channel=False, reduce_range=True),
    "ORT unfused, per channel (previous default)": Int8Dynamic(backend="onnxruntime", fuse=False),
    "torch backend, per channel": Int8Dynamic(backend="torch"),
}


def build_int8_option(model_dir: str, name: str):
    """One int8 option of ``model_dir``, built in a latency worker's process."""
    clf = workflows.load(model_dir)
    compress_(clf.model, INT8_OPTIONS[name])
    return clf


def build_peer(model_dir: str, name: str):
    """A peer applied to ``model_dir``, built in a latency worker's process."""
    base = workflows.load(model_dir)
    return inference.TextClassifier(PEERS[name](base.model), base.tokenizer, max_length=base.max_length,
                                    truncation=base.truncation, label_names=base.label_names, card=base.card)


def int8_options(base, args) -> list[dict]:
    """Accuracy of each int8 option, then interleaved batch-1 latency of fp32 eager and all options."""
    import statistics  # noqa: PLC0415

    from tightrope.evaluate import perf  # noqa: PLC0415

    rows: dict[str, dict] = {"fp32 eager": {"variant": "fp32 eager"}}
    clfs = {"fp32 eager": base}
    for name, config in INT8_OPTIONS.items():
        model = copy.deepcopy(base.model)
        summary = compress_(model, config)
        clfs[name] = inference.TextClassifier(model, base.tokenizer, max_length=base.max_length, truncation=base.truncation,
                                              label_names=base.label_names, card=base.card)
        rows[name] = {"variant": name, "config": summary.config, "notes": summary.notes}
    for name, clf in clfs.items():
        result = evaluate_model(args.model_dir, args.task, args.split, n=args.n, clf=clf, speed=False, memory=False,
                                progress=False)
        rows[name].update(accuracy=result.metrics.accuracy, f1=result.metrics.macro_f1)
        print(f"{name:46s} acc {result.metrics.accuracy:.4f}", flush=True)
    del clfs  # the latencies are taken in fresh processes, each building its own option
    builders = {"fp32 eager": functools.partial(inference.load, args.model_dir)}
    builders |= {name: functools.partial(build_int8_option, args.model_dir, name) for name in INT8_OPTIONS}
    sample = max(load_task(args.task, args.split, n=args.n).texts, key=len)
    times = perf.isolated_latency(builders, sample, seq_len=args.seq_len, rounds=args.latency_runs, runs=args.runs_per_turn)
    fp32 = statistics.median(times["fp32 eager"])
    for name, t in times.items():
        median = statistics.median(t)
        rows[name].update(latency_median_ms=median, latency_p95_ms=perf.percentile(t, 0.95), speedup=fp32 / median,
                          runs=len(t), threads=torch.get_num_threads())
        print(f"{name:46s} {median:6.1f} ms  {fp32 / median:.2f}x", flush=True)
    return list(rows.values())


def int8_markdown(rows: list[dict], command: str, seq_len: int, load: str) -> str:
    lines = ["## int8 dynamic options", "", f"Command: `{command}`", "",
             f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
             f"latency at batch 1 x {seq_len}, interleaved rounds; load average {load}.", "",
             "| option | accuracy | latency median ms | p95 ms | speed-up vs fp32 eager |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['accuracy']:.4f} | {r['latency_median_ms']:.1f} | {r['latency_p95_ms']:.1f} | "
                     f"{r['speedup']:.2f}x |")
    return "\n".join(lines) + "\n"


PEERS = {"peer: torch quantize_dynamic": peer_torch_dynamic, "peer: torchao int8 weight-only": peer_torchao_int8_weight_only,
         "peer: onnxruntime dynamic int8": peer_ort_dynamic}


def row(name: str, result, seconds: float) -> dict:
    m = result.metrics
    lat, thr = result.latency, result.throughput
    return {
        "variant": name, "accuracy": m.accuracy, "f1": m.macro_f1,
        "stored_mb": result.weight_bytes / 1e6 if result.weight_bytes else None,
        "parameters": result.parameters, "nonzero_parameters": result.nonzero_parameters,
        "latency_median_ms": lat.median_ms if lat else None, "latency_p95_ms": lat.p95_ms if lat else None,
        "throughput_per_s": thr.examples_per_s if thr else None,
        "peak_rss_mb": result.peak_rss_bytes / 1e6 if result.peak_rss_bytes else None,
        "threads": torch.get_num_threads(), "compress_seconds": seconds,
    }


def markdown(rows: list[dict], command: str, seq_len: int = 256, load: str = "not recorded") -> str:
    def f(v, spec):
        return "-" if v is None else format(v, spec)

    lines = [
        "## Compression (issue 4)", "", f"Command: `{command}`", "",
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"Python {platform.python_version()}, torch {torch.__version__}; latency at batch 1 x {seq_len} tokens, "
        f"throughput at batch 32 x 128, fp32 activations; load average (1, 5, 15 min) {load}.", "",
        "| variant | accuracy | F1 | stored MB | parameters | non-zero | latency median ms | p95 ms | ex/s (32x128) | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['variant']} | {f(r['accuracy'], '.4f')} | {f(r['f1'], '.4f')} | {f(r['stored_mb'], '.1f')} | "
                     f"{f(r['parameters'], ',')} | {f(r['nonzero_parameters'], ',')} | {f(r['latency_median_ms'], '.1f')} | "
                     f"{f(r['latency_p95_ms'], '.1f')} | {f(r['throughput_per_s'], '.1f')} | {f(r['peak_rss_mb'], '.0f')} |")
    lines += ["", "Unstructured (magnitude) sparsity leaves matrices dense: it changes no latency. LLM.int8() trades "
              "speed for memory on CPU. Peers run in memory (stored MB and peak RSS not measured for them)."]
    return "\n".join(lines) + "\n"


def interleaved_markdown(rows: list[dict], args) -> str:
    if not rows:
        return ""
    lines = ["", f"Batch-1 x {args.seq_len} latency again, every fast variant in its own process, visited in each of "
             f"{args.latency_runs} rounds in shuffled order, {args.runs_per_turn} timed runs a visit (the speed-up goals are "
             "read here):", "",
             "| variant | latency median ms | p95 ms | speed-up vs fp32 |", "|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['latency_median_ms']:.1f} | {r['latency_p95_ms']:.1f} | {r['speedup']:.2f}x |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir")
    ap.add_argument("--task", default="imdb")
    ap.add_argument("--split", default="test")
    ap.add_argument("--n", type=int, default=500, help="evaluation examples (seeded subset)")
    ap.add_argument("--calibration", default=None, help="task for GPTQ calibration (default: --task)")
    ap.add_argument("--out", default="runs/bench-compression")
    ap.add_argument("--only", nargs="*", default=None, help="variant names to run (default: all)")
    ap.add_argument("--latency-runs", type=int, default=50, help="runs per variant for the table's latency; rounds "
                    "of the interleaved measurement")
    ap.add_argument("--runs-per-turn", type=int, default=3, help="back-to-back timed runs at each visit of a variant "
                    "in the interleaved measurement")
    ap.add_argument("--seq-len", type=int, default=256, help="tokens for the batch-1 latency")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--doc", default=None, help="Markdown fragment (default OUT/compression.md, "
                    "or OUT/int8-options.md with --int8-options)")
    ap.add_argument("--int8-options", action="store_true", help="compare the int8 dynamic options instead of the table")
    ap.add_argument("--speed-only", action="store_true", help="only the interleaved latency of the fast variants "
                    "already saved in OUT (and the peers)")
    ap.add_argument("--recover-steps", type=int, default=200, help="recovery fine-tuning steps after structured pruning")
    args = ap.parse_args(argv)
    if args.latency_runs < 1 or args.runs_per_turn < 1:
        ap.error("--latency-runs and --runs-per-turn must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    rows: list[dict] = []
    base = workflows.load(args.model_dir)
    command = "python " + shlex.join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    if args.int8_options:
        rows = int8_options(base, args)
        load = f"{load} (start) / {' '.join(f'{x:.1f}' for x in os.getloadavg())} (end)"
        write_json_atomic(out / "int8-options.json", {"load_average": load, "rows": rows})
        doc = Path(args.doc or out / "int8-options.md")
        doc.parent.mkdir(parents=True, exist_ok=True)
        doc.write_text(int8_markdown(rows, command, args.seq_len, load))
        print(f"wrote {out / 'int8-options.json'} and {doc}")
        return
    variants = tightrope_variants(args.calibration or args.task, args.recover_steps)
    if args.speed_only:  # the interleaved latencies again, from the variants saved in OUT by an earlier run
        names = [n for n in [*variants, *PEERS] if n in PEERS or not variants[n] or (out / slug(n)).is_dir()]
        checked = speed_check(base, speed_set(names, variants), variants, args, out)
        write_json_atomic(out / "interleaved.json", checked)
        load = f"{load} (start) / {' '.join(f'{x:.1f}' for x in os.getloadavg())} (end)"
        doc = Path(args.doc or out / "interleaved.md")
        doc.parent.mkdir(parents=True, exist_ok=True)
        doc.write_text(f"Command: `{command}`; load average {load}.\n" + interleaved_markdown(checked, args))
        print(f"wrote {out / 'interleaved.json'} and {doc}")
        return
    todo = [*variants, *PEERS]
    for name in todo:
        if args.only and name not in args.only:
            continue
        try:
            r = run_variant(name, base, variants, args, out)
        except TightropeError as err:  # e.g. a group size that does not divide this model's widths
            print(f"{name:34s} skipped: {err}", flush=True)
            rows.append({"variant": name, "skipped": str(err)})
            continue
        rows.append(r)
        print(f"{name:34s} acc {r['accuracy']:.4f}  lat {r['latency_median_ms']:.1f} ms  "
              f"stored {r['stored_mb'] or 0:.1f} MB", flush=True)
        write_json_atomic(out / "compression.json", rows)
    done = [r for r in rows if "skipped" not in r]
    checked = speed_check(base, speed_set([r["variant"] for r in done], variants), variants, args, out)
    if checked:
        write_json_atomic(out / "interleaved.json", checked)
    load = f"{load} (start) / {' '.join(f'{x:.1f}' for x in os.getloadavg())} (end)"
    doc = Path(args.doc or out / "compression.md")
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(markdown(done, command, args.seq_len, load) + interleaved_markdown(checked, args))
    print(f"wrote {out / 'compression.json'} and {doc}")


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


SLOW_PATHS = (LLMInt8, NF4, FP4, GPTQ)  # no fast CPU kernel: dequantize + fp32 GEMM, or bitsandbytes' CPU path


def speed_set(names: list[str], variants: dict) -> list[str]:
    """The variants the speed-up goals are about: fp32, every int8 and structured variant and every
    peer. 4-bit, LLM.int8 and unstructured variants stay out: on CPU they are not speed paths (the
    table shows them at or below fp32), and each one would add a process and minutes to the
    interleaved measurement."""
    from tightrope.compress import prune  # noqa: PLC0415

    def fast(name: str) -> bool:
        steps = variants.get(name)
        if steps is None:
            return name in PEERS
        if not steps:
            return True
        return not any(isinstance(c, (*SLOW_PATHS, prune.MagnitudePruning)) for c in steps)

    chosen = [n for n in names if fast(n)]
    return chosen if "fp32" in chosen else []


def speed_check(base, names: list[str], variants: dict, args, out: Path) -> list[dict]:
    """Batch-1 latency of the fast variants again, each in its own process, interleaved in shuffled
    rounds (perf.isolated_latency): the table's per-row latencies are taken minutes apart, so the
    speed-up goals are read here."""
    import statistics  # noqa: PLC0415

    from tightrope.evaluate import perf  # noqa: PLC0415

    if not names:
        return []
    builders = {}
    for name in names:
        if name == "fp32":
            builders[name] = functools.partial(inference.load, args.model_dir)
        elif name in variants:
            builders[name] = functools.partial(inference.load, str(out / slug(name)))
        else:
            builders[name] = functools.partial(build_peer, args.model_dir, name)
    sample = max(load_task(args.task, args.split, n=args.n).texts, key=len)
    times = perf.isolated_latency(builders, sample, seq_len=args.seq_len, rounds=args.latency_runs, runs=args.runs_per_turn)
    fp32 = statistics.median(times["fp32"])
    rows = []
    for name, t in times.items():
        median = statistics.median(t)
        rows.append({"variant": name, "latency_median_ms": median, "latency_p95_ms": perf.percentile(t, 0.95),
                     "speedup": fp32 / median, "runs": len(t)})
        print(f"{name:46s} {median:6.1f} ms  {fp32 / median:.2f}x (interleaved)", flush=True)
    return rows


def run_variant(name: str, base, variants: dict, args, out: Path) -> dict:
    """Compress (tightrope variants: save and reload from disk) or apply a peer, then evaluate."""
    start = time.perf_counter()
    model = copy.deepcopy(base.model)
    set_tokenizer(model, base.tokenizer)
    if name in variants:
        for i, config in enumerate(variants[name]):
            if isinstance(config, Recover):  # cached under the steps that led to it, shared by variants
                key = hashlib.sha256(repr(variants[name][: i + 1]).encode()).hexdigest()[:12]
                model = recovery.recover_model(model, base.tokenizer, args.task, steps=config.steps, max_length=config.max_length,
                                            card={k: base.card[k] for k in ("tokenization",) if k in base.card},
                                            out_dir=out / f"recovered-{key}")
            else:
                compress_(model, config)
        seconds = time.perf_counter() - start
        if variants[name]:
            target = formats.save_compressed(model, base.tokenizer, out / slug(name), card={k: base.card[k] for k in ("tokenization",) if k in base.card})
            path, clf, memory = str(target), None, True
        else:
            path, clf, memory = args.model_dir, None, True
    else:
        model = PEERS[name](model)
        seconds = time.perf_counter() - start
        clf = inference.TextClassifier(model, base.tokenizer, max_length=base.max_length, truncation=base.truncation,
                                       label_names=base.label_names, card=base.card)
        path, memory = args.model_dir, False
    result = evaluate_model(path, args.task, args.split, n=args.n, clf=clf, memory=memory, latency_runs=args.latency_runs,
                            latency_seq_len=args.seq_len, progress=False)
    r = row(name, result, seconds)
    if clf is not None:
        r["stored_mb"] = None
    return r


if __name__ == "__main__":
    main()
