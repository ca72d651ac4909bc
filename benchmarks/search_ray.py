"""`tightrope search` on one machine: one process, two local processes (--workers 2), and Ray (--ray local
--workers 2), each from an empty run folder, on the same small grid; prints the wall times as a Markdown table.

The victim is MiniLM with a seeded, untrained classification head (only costs mean anything here); the grid is
quantization (none, int8) x magnitude pruning (0, 30%): 4 trials, each compressing the model, evaluating it on
64 MR test sentences and attacking 16 of them with DeepWordBug.

    python benchmarks/search_ray.py --out runs/search-ray-bench
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

BACKENDS = {"local process": [], "2 local processes": ["--workers", "2"], "Ray, 2 workers": ["--ray", "local", "--workers", "2"]}


def victim(out: Path) -> Path:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tightrope import assets
    from tightrope.models import save_model

    path = out / "minilm-clf"
    if not (path / "config.json").exists():
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(str(assets.minilm_dir()), num_labels=2)
        save_model((model, AutoTokenizer.from_pretrained(str(assets.minilm_dir()))), path)
    return path


def study(out: Path, model: Path, n_test: int, n_attack: int) -> Path:
    spec = {"name": "search-ray-bench", "seed": 0, "model": {"source": str(model), "fine_tuned": True},
            "data": {"task": "mr", "n_test": n_test, "max_length": 64}, "attacks": [{"recipe": "deepwordbug", "n": n_attack}],
            "evaluate": {"speed": False, "memory": False, "threads": 1},
            "search": {"trials": 4, "objectives": ["accuracy", "asr"], "quant": ["none", "Int8Dynamic"], "sparsity": [0.0, 0.3]}}
    path = out / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/search-ray-bench"))
    ap.add_argument("--n-test", type=int, default=64)
    ap.add_argument("--n-attack", type=int, default=16)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    spec = study(args.out, victim(args.out), args.n_test, args.n_attack)
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"), "RAY_USAGE_STATS_ENABLED": "0",
           "OMP_NUM_THREADS": "1"}
    rows = []
    for k, (name, extra) in enumerate(BACKENDS.items()):
        run = args.out / f"run-{k}"
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "tightrope.cli", "search", str(spec), "--out", str(run), *extra],
                              capture_output=True, text=True, env=env)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"{name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
        load = os.getloadavg()[0]
        rows.append(f"| {name} | {wall:.1f} s | {4 * 60 / wall:.2f} | {load:.1f} |")
        print(rows[-1], flush=True)
    print("| backend | wall (4 trials) | trials/min | load average after |\n|---|---|---|---|\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
