"""Run in a fresh process by :func:`tightrope.evaluate.perf.peak_memory`; prints one JSON line."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import psutil

from tightrope import workflows
from tightrope.evaluate.perf import fixed_length_batch


def high_water_rss() -> int:
    """Peak resident set of this process image, in bytes (VmHWM).

    Not ``getrusage().ru_maxrss``: Linux keeps that across ``execve``, so a probe started from a
    large parent would report the parent's peak.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource  # not Linux: the best we have

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    import torch


    if args.threads:
        torch.set_num_threads(args.threads)
    baseline = psutil.Process().memory_info().rss
    clf = workflows.load(args.model)
    with torch.inference_mode():
        clf.forward_ids(**fixed_length_batch(clf, "a good film", 1, args.seq_len))
    print(json.dumps({"peak_rss_bytes": high_water_rss(), "baseline_rss_bytes": baseline}))


if __name__ == "__main__":
    main()
