"""Where an ONNX Runtime model spends its time, per operator type (ONNX Runtime's own profiler).

    python benchmarks/onnx_profile.py runs/small/model.onnx --seq-len 256 --threads 2 --runs 40

Runs the saved session at batch 1 x ``--seq-len`` with the same session options as tightrope's int8
path (all graph optimizations, sequential execution), then sums ONNX Runtime's per-node kernel times
by operator type. docs/benchmarks.md quotes it for the fused int8 default.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="an .onnx file, or a model directory holding model.onnx")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=40)
    args = ap.parse_args(argv)
    import onnxruntime as ort  # noqa: PLC0415

    path = Path(args.model)
    path = path / "model.onnx" if path.is_dir() else path
    if not path.is_file():
        sys.exit(f"No ONNX model at {path}.")
    if args.seq_len < 2 or args.runs < 1 or args.threads < 1:
        sys.exit("--seq-len must be at least 2, --runs and --threads at least 1.")
    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.intra_op_num_threads, opts.inter_op_num_threads = args.threads, 1
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        feed = {}
        for i in session.get_inputs():
            dtype = np.int64 if "int64" in i.type else np.int32
            if "mask" in i.name:
                feed[i.name] = np.ones((1, args.seq_len), dtype)
            elif "type" in i.name:
                feed[i.name] = np.zeros((1, args.seq_len), dtype)
            else:
                feed[i.name] = rng.integers(1000, 20000, (1, args.seq_len)).astype(dtype)
        for _ in range(5):
            session.run(None, feed)
        times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            session.run(None, feed)
            times.append((time.perf_counter() - start) * 1000)
        events = json.loads(Path(session.end_profiling()).read_text())
    total: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            total[e["args"]["op_name"]] += e["dur"]
            calls[e["args"]["op_name"]] += 1
    print(f"{path}: median {statistics.median(times):.1f} ms at 1 x {args.seq_len}, {args.threads} threads (profiling on)")
    print("| operator | share | us per call | calls per run |\n|---|---|---|---|")
    whole = sum(total.values()) or 1
    for op, us in total.most_common():
        print(f"| {op} | {100 * us / whole:.1f}% | {us / calls[op]:.1f} | {calls[op] / (args.runs + 5):g} |")


if __name__ == "__main__":
    main()
