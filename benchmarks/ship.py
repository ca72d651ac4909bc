"""What ships: accuracy, stored size, serving memory and speed of fp32 torch, fp32 ONNX Runtime and the int8 bundles.

    # 1. export the bundles and pick the reviews (needs torch: it builds the graphs)
    python benchmarks/ship.py prepare --model runs/minilm-imdb --pruned runs/minilm-imdb-pruned --out runs/ship --n 1000
    # 2. measure each variant in its own fresh process, one after the other
    python benchmarks/ship.py run runs/ship --threads 2
    # 3. latency and throughput again, in interleaved rounds (fair on a shared machine)
    python benchmarks/ship.py speed runs/ship --threads 2 --rounds 30
    # (--only "fp32 torch" "structured+int8 bundle" on prepare, run and speed: just those variants)
    # 4. the Markdown table of docs/benchmarks.md
    python benchmarks/ship.py table runs/ship/results.json --speed runs/ship/speed.json

Variants: ``fp32 torch`` (the model directory through tightrope.inference, torch + transformers),
``fp32 ORT`` (``tightrope export --precision fp32``: the same fused graph unquantized), ``int8
bundle`` (``tightrope export``), ``int8 bundle, int4 embeddings`` (``--embeddings int4``),
``structured+int8 bundle`` (``tightrope export`` of the pruned model, when ``--pruned`` is given). Each is measured by ``ship.py measure`` in a fresh Python process that
imports only what that variant needs (the bundles: tightrope.serving, no torch; the process records
whether torch was imported), in this order:

1. load the model and classify one review: **peak RSS from start to first prediction** (VmHWM);
2. **latency** of one 1 x 256-token review (model call only, tokenization apart), 5 warm-up runs,
   then median and p95 of ``--runs``;
3. **throughput** of 32 x 128-token batches (model call only), median of ``--runs`` // 5 batches;
4. **accuracy** on the same ``--n`` IMDB test reviews (seeded), tokenized as the model was trained,
   length-bucketed batches of 32, with the end-to-end rate (tokenization included) and the
   process's peak RSS over the whole run.

On a machine shared with other jobs, one variant after the other catches whatever load the others
put on the cores at that moment. ``ship.py speed`` times latency and throughput again with every
variant loaded in its own process at once and visited in shuffled rounds, so that load falls on all
alike; ``table --speed`` uses those columns.

**Stored MB** is the weight file (model.safetensors or model.onnx) and the whole folder
(tokenizer, config and card included). Thread counts are fixed (``--threads``) and recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = [("fp32 torch", "torch", "model"), ("fp32 ORT", "bundle", "fp32-bundle"), ("int8 bundle", "bundle", "int8-bundle"),
            ("int8 bundle, int4 embeddings", "bundle", "int4-bundle"), ("structured+int8 bundle", "bundle", "pruned-int8-bundle")]


def vm(field: str) -> float:
    """A /proc/self/status memory field in MB (VmRSS now, VmHWM the peak so far)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def prepare(args) -> None:
    from tightrope.compress.export import export_bundle  # noqa: PLC0415
    from tightrope.data import load_task  # noqa: PLC0415

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_task("imdb", "test", n=args.n, seed=args.seed, data_dir=args.data_dir)
    with open(out / "data.jsonl", "w") as f:
        for text, label in zip(data.texts, data.labels):
            f.write(json.dumps({"text": text, "label": int(label)}) + "\n")
    wanted = lambda name: not args.only or name in args.only  # noqa: E731
    plan = {"fp32 torch": str(Path(args.model).resolve())}
    for name, model, folder, options in (("fp32 ORT", args.model, "fp32-bundle", {"precision": "fp32"}),
                                         ("int8 bundle", args.model, "int8-bundle", {}),
                                         ("int8 bundle, int4 embeddings", args.model, "int4-bundle", {"embeddings": "int4"}),
                                         ("structured+int8 bundle", args.pruned, "pruned-int8-bundle", {})):
        if model and wanted(name):
            export_bundle(model, out / folder, **options)
            plan[name] = str(out / folder)
    (out / "plan.json").write_text(json.dumps({"variants": plan, "n": args.n, "seed": args.seed, "model": args.model,
                                               "pruned": args.pruned}, indent=2))
    print(f"wrote {out}/plan.json, data.jsonl and the bundles")


def measure(args) -> None:
    """One variant, in this (fresh) process; prints one JSON line."""
    import numpy as np  # noqa: PLC0415

    t_start = time.perf_counter()
    records = [json.loads(line) for line in Path(args.data).read_text().splitlines()]
    texts, labels = [r["text"] for r in records], np.array([r["label"] for r in records])
    encode, run, logits = _load_runner(args.kind, args.dir, args.threads)
    weights = Path(args.dir) / ("model.safetensors" if args.kind == "torch" else "model.onnx")
    first = logits(texts[:1])
    result = {"first_prediction_s": round(time.perf_counter() - t_start, 2), "peak_rss_mb_first": round(vm("VmHWM"), 1),
              "rss_mb_first": round(vm("VmRSS"), 1), "torch_imported": "torch" in sys.modules,
              "transformers_imported": "transformers" in sys.modules, "first_label": int(first.argmax())}

    (ids, mask), (batch, bmask) = _speed_inputs(encode, args.data)
    for _ in range(5):
        run(ids, mask)
    times = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        run(ids, mask)
        times.append(1000 * (time.perf_counter() - t0))
    result["latency_1x256_median_ms"] = round(statistics.median(times), 2)
    result["latency_1x256_p95_ms"] = round(float(np.percentile(times, 95)), 2)

    for _ in range(2):
        run(batch, bmask)
    btimes = []
    for _ in range(max(args.runs // 5, 3)):
        t0 = time.perf_counter()
        run(batch, bmask)
        btimes.append(time.perf_counter() - t0)
    result["throughput_32x128_seq_per_s"] = round(32 / statistics.median(btimes), 1)

    t0 = time.perf_counter()
    predicted = logits(texts).argmax(1)
    elapsed = time.perf_counter() - t0
    result.update({"accuracy": round(float((predicted == labels).mean()), 4), "n": len(texts),
                   "end_to_end_texts_per_s": round(len(texts) / elapsed, 1), "peak_rss_mb_run": round(vm("VmHWM"), 1),
                   "stored_weights_mb": round(weights.stat().st_size / 1e6, 2),
                   "stored_folder_mb": round(sum(p.stat().st_size for p in Path(args.dir).iterdir() if p.is_file()) / 1e6, 2),
                   "threads": args.threads})
    print(json.dumps(result))


def _load_runner(kind: str, folder: str, threads: int):
    """``(encode, run, logits)`` of one variant: its tokenizer, its model call on int64 (ids, mask)
    arrays, and texts -> logits in length-bucketed batches of 32."""
    if kind == "torch":
        import torch  # noqa: PLC0415

        from tightrope import workflows  # noqa: PLC0415

        torch.set_num_threads(threads)
        clf = workflows.load(folder)

        def run(ids, mask):
            with torch.inference_mode():
                return clf.forward_ids(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()

        return clf.encode, run, lambda texts: clf.logits(texts, batch_size=32).numpy()
    from tightrope.serving import Bundle  # noqa: PLC0415

    bundle = Bundle(folder, threads=threads)
    return bundle.encode, bundle.run, lambda texts: bundle.logits(texts, batch_size=32)


def _speed_inputs(encode, data: str):
    """The 1 x 256 and 32 x 128 inputs every variant is timed on (the same reviews, each variant's own tokens)."""
    import numpy as np  # noqa: PLC0415

    texts = [json.loads(line)["text"] for line in Path(data).read_text().splitlines()]
    seqs = encode(sorted(texts, key=len, reverse=True)[:64])
    long = next(s for s in seqs if len(s) >= 256)[:256]
    one = (np.array([long], dtype=np.int64), np.ones((1, 256), dtype=np.int64))
    batch = np.array([s[:128] for s in seqs[:32]], dtype=np.int64)
    return one, (batch, np.ones_like(batch))


def worker(args) -> None:
    """A variant kept loaded in its own process; answers ``lat N`` / ``thr N`` on stdin with timings (s) on stdout."""
    encode, run, _ = _load_runner(args.kind, args.dir, args.threads)
    one, batch = _speed_inputs(encode, args.data)
    for _ in range(3):
        run(*one)
    run(*batch)
    print("ready", flush=True)
    for line in sys.stdin:
        what, n = line.split()
        inputs = one if what == "lat" else batch
        times = []
        for _ in range(int(n)):
            t0 = time.perf_counter()
            run(*inputs)
            times.append(time.perf_counter() - t0)
        print(json.dumps(times), flush=True)


def speed(args) -> None:
    """Latency and throughput in interleaved rounds: every variant in its own process, loaded once; each
    round visits them in a new random order (so a neighbour's load falls on all alike), 0.2 s apart
    (idle threads park), ``--lat-per-visit`` 1x256 runs and one 32x128 run per visit."""
    import random  # noqa: PLC0415

    import numpy as np  # noqa: PLC0415

    folder = Path(args.folder)
    plan = json.loads((folder / "plan.json").read_text())
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": str(args.threads)}
    names = [n for n, _, _ in VARIANTS if n in plan["variants"] and (not args.only or n in args.only)]
    kinds = {n: k for n, k, _ in VARIANTS}
    procs = {}
    try:
        for name in names:
            procs[name] = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "worker", kinds[name],
                                            plan["variants"][name], str(folder / "data.jsonl"), "--threads", str(args.threads)],
                                           env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                           text=True)
            while (line := procs[name].stdout.readline().strip()) != "ready":
                if not line and procs[name].poll() is not None:
                    raise SystemExit(f"the {name} worker exited")
        lat = {n: [] for n in names}
        thr = {n: [] for n in names}
        rng = random.Random(0)
        loads = []
        for _ in range(args.rounds):
            order = names[:]
            rng.shuffle(order)
            loads.append(os.getloadavg()[0])
            for name in order:
                for what, n, into in (("lat", args.lat_per_visit, lat), ("thr", 1, thr)):
                    procs[name].stdin.write(f"{what} {n}\n")
                    procs[name].stdin.flush()
                    into[name] += json.loads(procs[name].stdout.readline())
                time.sleep(0.2)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.stdin.close()
                p.wait(timeout=30)
    rows = {n: {"latency_1x256_median_ms": round(1000 * float(np.median(lat[n])), 2),
                "latency_1x256_p95_ms": round(1000 * float(np.percentile(lat[n], 95)), 2),
                "throughput_32x128_seq_per_s": round(32 / float(np.median(thr[n])), 1),
                "latency_runs": len(lat[n]), "throughput_runs": len(thr[n])} for n in names}
    report = {"rounds": args.rounds, "lat_per_visit": args.lat_per_visit, "threads": args.threads,
              "load_avg_1min_min_max": [round(min(loads), 2), round(max(loads), 2)], "rows": rows}
    out = Path(args.json or folder / "speed.json")
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


def run_all(args) -> None:
    folder = Path(args.folder)
    plan = json.loads((folder / "plan.json").read_text())
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    rows = []
    for name, kind, _ in VARIANTS:
        if name not in plan["variants"] or (args.only and name not in args.only):
            continue
        load = os.getloadavg()[0]
        cmd = [sys.executable, str(Path(__file__).resolve()), "measure", kind, plan["variants"][name], str(folder / "data.jsonl"),
               "--threads", str(args.threads), "--runs", str(args.runs)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
        if done.returncode != 0:
            raise SystemExit(f"{name} failed: {done.stderr[-3000:]}")
        row = {"variant": name, "dir": plan["variants"][name], "load_avg_1min_before": round(load, 2),
               **json.loads(done.stdout.strip().splitlines()[-1])}
        print(json.dumps(row), flush=True)
        rows.append(row)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    report = {"machine": {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()}, "plan": plan,
              "threads": args.threads, "runs": args.runs, "rows": rows}
    out = Path(args.json or folder / "results.json")
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


def table(args) -> None:
    report = json.loads(Path(args.results).read_text())
    rows = report["rows"]
    if args.speed:  # latency and throughput from the interleaved rounds instead of the one-process-each pass
        timed = json.loads(Path(args.speed).read_text())["rows"]
        rows = [{**r, **timed.get(r["variant"], {})} for r in rows]
    base = next((r for r in rows if r["variant"] == "fp32 torch"), rows[0])
    print(f"{report['machine']['cpu']}, {report['machine']['cores']} cores, {report['threads']} threads, "
          f"{base['n']} IMDB test reviews\n")
    print("| variant | accuracy | stored MB (weights / folder) | vs fp32 | peak RSS to 1st prediction MB | vs fp32 torch "
          "| torch imported | 1x256 median / p95 ms | speed-up | 32x128 seq/s | end-to-end texts/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['accuracy']:.4f} | {r['stored_weights_mb']:.1f} / {r['stored_folder_mb']:.1f} "
              f"| {base['stored_weights_mb'] / r['stored_weights_mb']:.2f}x "
              f"/ {base['stored_folder_mb'] / r['stored_folder_mb']:.2f}x | {r['peak_rss_mb_first']:.0f} "
              f"| {r['peak_rss_mb_first'] / base['peak_rss_mb_first']:.0%} | {'yes' if r['torch_imported'] else 'no'} "
              f"| {r['latency_1x256_median_ms']:.1f} / {r['latency_1x256_p95_ms']:.1f} "
              f"| {base['latency_1x256_median_ms'] / r['latency_1x256_median_ms']:.2f}x "
              f"| {r['throughput_32x128_seq_per_s']:.0f} | {r['end_to_end_texts_per_s']:.0f} |")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--model", required=True)
    p.add_argument("--pruned", default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--only", nargs="*", default=None, help="variants to export (default: all; fp32 torch is always in the plan)")
    p.set_defaults(fn=prepare)
    m = sub.add_parser("measure")
    m.add_argument("kind", choices=("torch", "bundle"))
    m.add_argument("dir")
    m.add_argument("data")
    m.add_argument("--threads", type=int, default=2)
    m.add_argument("--runs", type=int, default=50)
    m.set_defaults(fn=measure)
    w = sub.add_parser("worker")
    w.add_argument("kind", choices=("torch", "bundle"))
    w.add_argument("dir")
    w.add_argument("data")
    w.add_argument("--threads", type=int, default=2)
    w.set_defaults(fn=worker)
    sp = sub.add_parser("speed")
    sp.add_argument("folder")
    sp.add_argument("--threads", type=int, default=2)
    sp.add_argument("--rounds", type=int, default=30)
    sp.add_argument("--lat-per-visit", type=int, default=3)
    sp.add_argument("--only", nargs="*", default=None, help="variant names to time (default: all in the plan)")
    sp.add_argument("--json", default=None)
    sp.set_defaults(fn=speed)
    r = sub.add_parser("run")
    r.add_argument("folder")
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--runs", type=int, default=50)
    r.add_argument("--only", nargs="*", default=None, help="variant names to measure (default: all in the plan)")
    r.add_argument("--json", default=None)
    r.set_defaults(fn=run_all)
    t = sub.add_parser("table")
    t.add_argument("results")
    t.add_argument("--speed", default=None, help="speed.json from `ship.py speed`: its latency and throughput columns")
    t.set_defaults(fn=table)
    args = ap.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
