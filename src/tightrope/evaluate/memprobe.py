"""Run in a fresh process by :func:`tightrope.evaluate.perf.peak_memory`; prints one JSON line."""

from __future__ import annotations

import argparse
import json
import resource

import psutil


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    import torch

    from tightrope import inference
    from tightrope.evaluate.perf import fixed_length_batch

    if args.threads:
        torch.set_num_threads(args.threads)
    baseline = psutil.Process().memory_info().rss
    clf = inference.load(args.model)
    with torch.inference_mode():
        clf.forward_ids(**fixed_length_batch(clf, "a good film", 1, args.seq_len))
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"peak_rss_bytes": peak_kib * 1024, "baseline_rss_bytes": baseline}))


if __name__ == "__main__":
    main()
