"""Every text-attack recipe against every compressed variant of one model, on the same examples (issue 5).

    python benchmarks/attack_grid.py run --model runs/minilm-imdb --out runs/attack-grid --n 20
    python benchmarks/attack_grid.py table runs/attack-grid --md runs/attack-grid/table.md

``run`` builds the variants it is not given (``tightrope compress``: int8 = the fastest int8 backend,
nf4 = bitsandbytes NF4 blocksize 64, pruned30 = 30% global magnitude pruning) and attacks each with
TextFooler, PWWS, DeepWordBug and HotFlip on the first ``--n`` examples of a seeded shuffle of the task
(default: TextFooler's 1,000-review IMDB sample). It goes round-robin: example 1 against every
(recipe, variant) cell, then example 2, ..., so that a run stopped at any point leaves every cell on
the same examples; each cell appends to its own JSON Lines file and a rerun resumes. ``--variants`` and
``--recipes`` pick cells, so two processes (one thread each) can share the grid. Every query, and so
every success, is on the variant itself. HotFlip needs gradients: a variant without them (the ONNX
Runtime int8 session) gets them from its differentiable twin, the full-precision weights fake-quantized
with the same scheme (int8 per channel, as the study's PGD twin), and its results say so.

``transfer`` evaluates the adversarial texts each recipe crafted on one variant (default: fp32) on every
other variant, on the same examples (tightrope.attacks.attack.transfer): does an attack found on the
full-precision model still fool its compressed versions?

``table`` summarises with TextAttack's metrics (tightrope.attacks.results.summarize) on the examples
that every variant of a recipe has finished, and writes a Markdown table with the machine it ran on.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

RECIPES = ("textfooler", "pwws", "deepwordbug", "hotflip")
VARIANT_FLAGS = {
    "int8": ["--quantize", "int8"],
    "nf4": ["--quantize", "nf4"],
    "pruned30": ["--prune", "magnitude:sparsity=0.3"],
}


def shuffled_order(size: int, seed: int) -> list[int]:
    """A seeded permutation of the examples: the grid's first n examples for any n are a prefix of it."""
    return random.Random(seed).sample(range(size), size)


def build_variants(model: str, out: Path, names: list[str], given: dict[str, str], build: bool = True) -> dict[str, str]:
    """Path of each variant: given on the command line, already built under ``out``, or built now (with
    ``build=False``, as a dry run plans: only where it would be built)."""
    paths = {}
    for name in names:
        if name == "fp32":
            paths[name] = given.get(name, model)
        elif name in given:
            paths[name] = given[name]
        else:
            if name not in VARIANT_FLAGS:
                sys.exit(f"Unknown variant '{name}'; give it as --variant {name}=PATH or pick from fp32, "
                         f"{', '.join(VARIANT_FLAGS)}.")
            path = out / "variants" / name
            if build and not (path / "card.json").exists():
                print(f"building {name} -> {path}", file=sys.stderr)
                subprocess.run([sys.executable, "-m", "tightrope.cli", "compress", model, *VARIANT_FLAGS[name],
                                "--out", str(path)], check=True)
            paths[name] = str(path)
    return paths


def cell_dir(out: Path, recipe: str, variant: str) -> Path:
    return out / "cells" / f"{recipe}--{variant}"


def read_cells(out: Path) -> dict[str, dict[str, Path]]:
    """The grid's cell folders, recipe -> variant -> folder."""
    if not (out / "cells").is_dir():
        sys.exit(f"{out} holds no grid cells; run `python benchmarks/attack_grid.py run --out {out} ...` first.")
    cells: dict[str, dict[str, Path]] = {}
    for folder in sorted((out / "cells").iterdir()):
        recipe, variant = folder.name.split("--", 1)
        cells.setdefault(recipe, {})[variant] = folder
    return cells


def grid_sweep(args, out: Path, build: bool = True):
    """The grid as a tightrope.workflows.sweep.Sweep: one cell per (recipe, variant), on the first --n
    examples of a seeded shuffle of the task."""
    from tightrope.data import load_task
    from tightrope.workflows.sweep import Cell, Sweep

    bad = [v for v in args.variant if "=" not in v]
    if bad:
        sys.exit(f"--variant takes NAME=PATH, not '{bad[0]}'.")
    given = dict(v.split("=", 1) for v in args.variant)
    variants = build_variants(args.model, out, args.variants.split(","), given, build=build)
    size = len(load_task(args.task, args.split, seed=args.seed, data_dir=args.data_dir))
    order = shuffled_order(size, args.seed)[: args.n]
    cells = tuple(Cell(recipe, name, path, str(cell_dir(Path("."), recipe, name)))
                  for recipe in args.recipes.split(",") for name, path in variants.items())
    return Sweep(cells, task=args.task, split=args.split, indices=tuple(order), seed=args.seed, data_dir=args.data_dir,
                 query_budget=args.query_budget, twin=args.model, twin_scheme=args.twin_scheme, threads=args.threads or 1)


class Lines:
    """A tightrope.progress reporter that prints one line per finished example."""

    def __init__(self):
        self.started, self.done, self.total = time.perf_counter(), 0, 0

    def __call__(self, label, total, completed=0):
        self.total = total or 0
        print(f"{label}: {self.total} examples to attack", flush=True)
        return self

    def advance(self, n=1, info=""):
        self.done += n
        print(f"[{time.perf_counter() - self.started:7.0f} s] {self.done}/{self.total} {info}", flush=True)

    def close(self):
        pass

    def say(self, text):
        print(text, flush=True)


def run(args) -> None:
    """Round-robin over examples (example-major tasks), in this process or on Ray (--ray); resumable."""
    from tightrope.errors import TightropeError
    from tightrope.workflows.sweep import plan, run_sweep

    out = Path(args.out)
    try:
        sweep = grid_sweep(args, out, build=not args.dry_run)
        if args.dry_run:
            print("\n".join(plan(sweep, out, shard_size=args.shard_size).lines(sorted({1, 2, 8, 32, 128, args.workers or 1}))))
            return
        backend = None
        if args.ray:
            from tightrope.workflows.ray_backend import RayBackend

            backend = RayBackend(args.ray, workers=args.workers)
        started = time.perf_counter()
        reports = run_sweep(sweep, out, backend=backend, shard_size=args.shard_size, progress=Lines())
    except TightropeError as err:
        sys.exit(f"error: {err}")
    wall = time.perf_counter() - started
    done = sum(r.examples for r in reports.values())
    print(f"done: {len(reports)} cells, {done} examples in the folder, {wall:.1f} s wall this run", flush=True)


def machine() -> str:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{cpu}, {torch.get_num_threads()} torch threads by default, torch {torch.__version__}, {platform.platform()}"


def interval(won: int, attacked: int) -> str:
    """Wilson 95% interval of a success rate (scipy, which scikit-learn brings): with tens of examples
    per cell the interval, not the point estimate, says what the grid can tell apart."""
    if not attacked:
        return "-"
    from scipy.stats import binomtest

    ci = binomtest(won, attacked).proportion_ci(confidence_level=0.95, method="wilson")
    return f"{ci.low:.0%}-{ci.high:.0%}"


def table(args) -> None:
    from tightrope.attacks.attacker import read_results
    from tightrope.attacks.results import summarize

    out = Path(args.out)
    by_recipe = {recipe: {variant: read_results(folder / "results.jsonl") for variant, folder in variants.items()}
                 for recipe, variants in read_cells(out).items()}
    rows, raw = [], []
    header = ("| recipe | variant | examples | original acc. | acc. under attack | ASR | ASR 95% CI | succeeded / failed / skipped "
              "| avg. queries | model calls | words perturbed | s / example |")
    rows += [header, "|" + "---|" * 12]
    for recipe in [r for r in RECIPES if r in by_recipe] + sorted(set(by_recipe) - set(RECIPES)):
        cells = by_recipe[recipe]
        common = set.intersection(*({r.index for r in results} for results in cells.values()))
        for variant, results in cells.items():
            kept = [r for r in results if r.index in common]
            report = summarize(kept, recipe=recipe, victim=variant, task="")
            pct = lambda v: "-" if v is None else f"{v:.1%}"  # noqa: E731
            rows.append(f"| {recipe} | {variant} | {report.examples} | {pct(report.original_accuracy)} | "
                        f"{pct(report.accuracy_under_attack)} | **{pct(report.attack_success_rate)}** | "
                        f"{interval(report.succeeded, report.succeeded + report.failed)} | "
                        f"{report.succeeded} / {report.failed} / {report.skipped} | "
                        f"{'-' if report.average_queries is None else f'{report.average_queries:.0f}'} | "
                        f"{'-' if report.average_model_queries is None else f'{report.average_model_queries:.0f}'} | "
                        f"{pct(report.average_perturbed_share)} | "
                        f"{report.seconds / max(report.examples, 1):.1f} |")
            notes = sorted({r.gradient_source for r in kept if r.gradient_source})
            raw.append({"recipe": recipe, "variant": variant, **{k: v for k, v in report.to_dict().items()
                        if k not in ("attack", "settings", "victim", "recipe", "task")}, "gradient_source": notes})
    text = "\n".join(rows) + "\n\nCommand: `python benchmarks/attack_grid.py table " + str(out) + "`; machine: " + machine() + "\n"
    print(text)
    if args.md:
        Path(args.md).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=2))


def transfer_table(args) -> None:
    from tightrope import workflows
    from tightrope.attacks.attack import transfer
    from tightrope.attacks.attacker import read_results

    out = Path(args.out)
    cells = read_cells(out)
    if not any(args.source in variants for variants in cells.values()):
        known = sorted({v for variants in cells.values() for v in variants})
        sys.exit(f"No cell of {out} was attacked as '{args.source}'; --source is one of {', '.join(known)}.")
    models: dict[str, object] = {}  # each variant loaded once, from the path its cells attacked
    rows = ["| recipe | crafted on | evaluated on | examples | transferable | transfer success | accuracy under transfer |",
            "|---|---|---|---|---|---|---|"]
    raw = []
    for recipe in [r for r in RECIPES if r in cells]:
        if args.source not in cells[recipe]:
            continue
        results = read_results(cells[recipe][args.source] / "results.jsonl")
        for variant, folder in cells[recipe].items():
            if variant == args.source or not results:
                continue
            if variant not in models:
                models[variant] = workflows.load(json.loads((folder / "attack.json").read_text())["victim"])
            (res,) = transfer(results, {variant: models[variant]})
            rate = "-" if res.transfer_success_rate is None else f"{res.transfer_success_rate:.1%}"
            rows.append(f"| {recipe} | {args.source} | {variant} | {res.examples} | {res.transferable} | **{rate}** "
                        f"({res.fooled} / {res.transferable}), {interval(res.fooled, res.transferable)} | "
                        f"{res.accuracy_under_transfer:.1%} |")
            raw.append({"recipe": recipe, **res.to_dict()})
    text = ("\n".join(rows) + "\n\nCommand: `python benchmarks/attack_grid.py transfer " + str(out)
            + f" --source {args.source}`; machine: " + machine() + "\n")
    print(text)
    if args.md:
        Path(args.md).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="attack every (recipe, variant) cell, round-robin over examples; resumable")
    r.add_argument("--model", required=True, help="the full-precision fine-tuned classifier")
    r.add_argument("--out", required=True)
    r.add_argument("--task", default="textfooler-imdb")
    r.add_argument("--split", default="test")
    r.add_argument("--data-dir")
    r.add_argument("--n", type=int, default=20, help="examples (first n of a seeded shuffle)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--recipes", default=",".join(RECIPES))
    r.add_argument("--variants", default="fp32,int8,nf4,pruned30")
    r.add_argument("--variant", action="append", default=[], help="NAME=PATH of an already built variant")
    r.add_argument("--query-budget", type=int)
    r.add_argument("--twin-scheme", default="int8",
                   help="fake quantization of the gradient twin for variants without gradients")
    r.add_argument("--threads", type=int, help="torch threads per worker (default 1)")
    r.add_argument("--ray", help="run the tasks on Ray: auto (the cluster this machine joined), local (a Ray "
                                 "instance in this process), or HOST:PORT of a head node; default: this process")
    r.add_argument("--workers", type=int, help="Ray workers, one CPU each (default: every CPU of the cluster)")
    r.add_argument("--shard-size", type=int, default=4, help="examples per task (one task = recipe, variant, shard)")
    r.add_argument("--dry-run", action="store_true",
                   help="print the tasks, the estimated CPU hours and the wall time on N workers; run nothing")
    t = sub.add_parser("table", help="Markdown table of the cells under OUT")
    t.add_argument("out")
    t.add_argument("--md")
    t.add_argument("--json")
    x = sub.add_parser("transfer", help="adversarial texts crafted on one variant, evaluated on the others")
    x.add_argument("out")
    x.add_argument("--source", default="fp32", help="the variant the texts were crafted on")
    x.add_argument("--md")
    x.add_argument("--json")
    args = parser.parse_args()
    {"run": run, "table": table, "transfer": transfer_table}[args.command](args)


if __name__ == "__main__":
    main()
