"""CLI: ``tightrope run``, ``tightrope search``, ``tightrope report``, ``tightrope weakness``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from tightrope.cli.base import app, user_errors

out_console = Console()


def _search_worker(spec_path: str, out: str, storage: str | None, study_name: str | None, trials: int | None,
                   worker: int) -> None:
    from tightrope.study.search import search_study  # noqa: PLC0415 - imported when the command runs: the CLI starts without torch
    from tightrope.study.spec import load_spec  # noqa: PLC0415 - imported when the command runs: the CLI starts without torch

    search_study(load_spec(spec_path), out, storage=storage, study_name=study_name, n_trials=trials, worker=worker,
                 progress=worker == 0)


@app.command("run")
@user_errors
def run(
    study: Annotated[Path, typer.Argument(help="Study file (YAML).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory (an interrupted run resumes there).")],
    report: Annotated[bool, typer.Option(help="Write report.html and report.md at the end.")] = True,
    update: Annotated[bool, typer.Option(help="The study file was edited since OUT was run: reuse every step whose "
                                              "settings did not change, run the new ones.")] = False,
    ray: Annotated[Optional[str], typer.Option(help="Run each step as a Ray task: auto (the cluster this machine joined), "
                                                    "local (Ray inside this run) or HOST:PORT of a head node; every node "
                                                    "must see OUT at the same path. Default: this process.")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Steps run at once on Ray, one CPU each (default: every CPU).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the steps left, the estimated CPU hours and the wall "
                                                            "time on N workers, and run nothing.")] = False,
):
    """Run a whole study: baseline, defenses, compression, attacks, evaluation, report.

    Example: tightrope run studies/quickstart.yaml --out runs/quickstart

    After adding a model or an attack to the study file: tightrope run studies/quickstart.yaml --out runs/quickstart --update

    On a Ray cluster, each step a task: tightrope run studies/quickstart.yaml --out /shared/runs/quickstart --ray auto
    """
    from tightrope.study.plan import run_study  # noqa: PLC0415 - imported when the command runs: the CLI starts without torch
    from tightrope.study.spec import load_spec  # noqa: PLC0415 - imported when the command runs: the CLI starts without torch

    spec = load_spec(study)  # every key is checked before any work starts
    backend = None
    if ray or dry_run:
        from tightrope.study.distributed import RayStepBackend, plan_run  # noqa: PLC0415 - imported when the command runs: the CLI starts without torch

        if dry_run:
            for line in plan_run(spec, out).lines(sorted({1, 2, 4, 8, workers or 1})):
                out_console.print(line)
            return
        backend = RayStepBackend(ray, workers=workers)
    run_study(spec, out, report=report, update=update, backend=backend)
    if report and (out / "report.html").exists():
        out_console.print(f"[green]report[/] {out / 'report.html'}  (and {out / 'report.md'})")
    else:
        out_console.print(f"[green]done[/] {out}")

@app.command("search")
@user_errors
def search(
    study: Annotated[Path, typer.Argument(help="Study file with a 'search' section.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory (shared with `tightrope run`).")],
    trials: Annotated[Optional[int], typer.Option(help="Complete trials wanted in total (default: the study's).")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Worker processes on this machine (default 1); with --ray, trials "
                                                       "run at once, one CPU each (default: every CPU).")] = None,
    storage: Annotated[Optional[str], typer.Option(help="Database URL shared by workers (default: SQLite in OUT/search).")] = None,
    study_name: Annotated[Optional[str], typer.Option(help="Name of the search in the store (default: study name + fingerprints of its settings and search space).")] = None,
    max_latency: Annotated[Optional[float], typer.Option(help="Latency relative to the study's baseline, timed in interleaved pairs (0.8 = at most 0.8x the baseline's).")] = None,
    max_latency_ms: Annotated[Optional[float], typer.Option(help="Absolute median latency (ms), as measured beside the baseline; it follows the machine's load.")] = None,
    min_accuracy: Optional[float] = None,
    max_asr: Optional[float] = None,
    max_memory_mb: Optional[float] = None,
    prefer: Annotated[str, typer.Option(help="Objective the choice optimizes among those meeting the limits.")] = "asr",
    export: Annotated[Optional[Path], typer.Option(help="Copy the chosen model here, ready to load, with its card.")] = None,
    ray: Annotated[Optional[str], typer.Option(help="Run each trial as a Ray task: auto, local or HOST:PORT of a head node "
                                                    "(as `tightrope run --ray`); the store stays the one record of the "
                                                    "search. Default: processes on this machine.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the steps every point of the search space needs "
                                                            "(each once), the estimated CPU hours and the wall time on "
                                                            "N workers, and run nothing.")] = False,
):
    """Multi-objective search (Optuna: a grid on small discrete spaces, else NSGA-II) over defenses and compression
    settings; Pareto front of accuracy, strongest attack's success rate and latency; constrained choice.

    Example: tightrope search studies/quickstart.yaml --out runs/quickstart --max-latency 0.8 --min-accuracy 0.75 --export runs/chosen

    On a Ray cluster, one trial a task: tightrope search studies/quickstart.yaml --out /shared/runs/quickstart --ray auto --storage postgresql+psycopg2://tightrope@db/tightrope
    """
    import multiprocessing as mp  # noqa: PLC0415

    import optuna  # noqa: PLC0415

    from tightrope.errors import TightropeError  # noqa: PLC0415 - imported when the command runs: the CLI starts without torch
    from tightrope.report.tables import markdown_table  # noqa: PLC0415 - imported when the command runs: the CLI starts without torch
    from tightrope.study.runner import write_result  # noqa: PLC0415 - imported when the command runs: the CLI starts without torch
    from tightrope.study.search import (  # noqa: PLC0415 - imported when the command runs: the CLI starts without torch
        OBJECTIVES,
        Constraints,
        default_study_name,
        export_choice,
        open_storage,
        preflight_search,
        search_study,
        storage_url,
        summarize,
    )
    from tightrope.study.spec import load_spec  # noqa: PLC0415 - imported when the command runs: the CLI starts without torch

    spec = load_spec(study)
    if spec.search is None:
        raise TightropeError(f"{study} has no 'search' section; add one (trials, objectives, quant, sparsity).")
    if workers is not None and workers < 1:
        raise TightropeError("--workers must be at least 1.")
    preflight_search(spec)  # a misspelt defense setting fails here, before the run folder is made
    if dry_run:
        from tightrope.study.distributed import plan_search  # noqa: PLC0415 - imported when the command runs: the CLI starts without torch

        size, wanted = spec.search.space_size(), trials or spec.search.trials
        if size is not None and wanted < size:
            out_console.print(f"the space has {size} points and the search runs {wanted} trials: the plan below "
                              "prices every point, an upper bound")
        for line in plan_search(spec, out).lines(sorted({1, 2, 4, 8, workers or 1})):
            out_console.print(line)
        return
    from tightrope.study.plan import identity  # noqa: PLC0415 - imported when the command runs: the CLI starts without torch
    from tightrope.study.runner import claim_run_dir  # noqa: PLC0415 - imported when the command runs: the CLI starts without torch

    claim_run_dir(out, identity(spec))  # before the SQLite file is created inside it
    url = storage_url(storage, out)
    name = study_name or default_study_name(spec)
    if ray:
        from tightrope.study.distributed import search_on_ray  # noqa: PLC0415 - imported when the command runs: Ray is optional

        search_on_ray(spec, out, storage=url, study_name=name, n_trials=trials or spec.search.trials, address=ray,
                      workers=workers)
    elif (workers or 1) == 1:
        search_study(spec, out, storage=url, study_name=name, n_trials=trials)
    else:
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_search_worker, args=(str(study), str(out), url, name, trials, w))
                 for w in range(workers)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if any(p.exitcode for p in procs):
            raise TightropeError(f"A search worker failed (exit codes {[p.exitcode for p in procs]}); "
                                 "run the same command again to continue.")
    loaded = optuna.load_study(study_name=name, storage=open_storage(url))
    constraints = Constraints(max_latency=max_latency, max_latency_ms=max_latency_ms, min_accuracy=min_accuracy,
                              max_asr=max_asr, max_memory_mb=max_memory_mb)
    summary = summarize(loaded, [OBJECTIVES[o] for o in loaded.user_attrs["objectives"]], constraints, prefer)
    write_result(out / "search" / "search.json", summary)
    from tightrope.report.render import render_search, search_rows  # noqa: PLC0415 - imported when the command runs: the CLI starts without torch

    out_console.print(markdown_table(*search_rows(summary)))
    written = render_search(out)
    out_console.print(f"[green]front[/] {written['markdown']}" + (f" and {written['figure']}" if "figure" in written else ""))
    chosen = summary["chosen"]
    out_console.print(f"[green]chosen[/] trial {chosen['number']}: {chosen['params']} -> {chosen['values']}")
    if export is not None:
        path = export_choice(chosen, export, search_info={"study": spec.name, "storage": url.split("@")[-1]})
        out_console.print(f"[green]exported[/] {path}")
    if (out / "run.json").exists():
        from tightrope.report.render import render_report  # noqa: PLC0415 - imported when the command runs: the CLI starts without torch

        render_report(out)
        out_console.print(f"[green]report[/] {out / 'report.html'}")

@app.command("report")
@user_errors
def report(run: Annotated[Path, typer.Argument(help="A study run directory.")]):
    """Render a finished run as self-contained HTML and Markdown (tables, plots, examples, environment)."""
    from tightrope.report.render import render_report  # noqa: PLC0415 - imported when the command runs: the CLI starts without torch

    paths = render_report(run)
    for kind, path in paths.items():
        out_console.print(f"[green]{kind}[/] {path}")

@app.command("weakness")
@user_errors
def weakness(
    run: Annotated[Path, typer.Argument(help="A study run directory.")],
    layers: Annotated[bool, typer.Option(help="Also measure per-block sensitivity (compress one block at a time).")] = False,
    model: Annotated[str, typer.Option(help="Model of the run probed per block.")] = "baseline",
    method: Annotated[str, typer.Option(help="Compression applied to one block at a time.")] = "NF4",
    n: Annotated[int, typer.Option(help="Test examples for the per-block probe.")] = 200,
):
    """Per-class vulnerability, most exploited words and positions; optionally per-block sensitivity."""
    from tightrope.errors import TightropeError  # noqa: PLC0415 - imported when the command runs: the CLI starts without torch
    from tightrope.report.render import load_run  # noqa: PLC0415 - imported when the command runs: the CLI starts without torch
    from tightrope.study.runner import write_result  # noqa: PLC0415 - imported when the command runs: the CLI starts without torch
    from tightrope.study.weakness import analyze_attack, classifier_sensitivity  # noqa: PLC0415 - imported when the command runs: the CLI starts without torch

    data = load_run(run)
    result: dict = {"attacks": {a: {m: analyze_attack(r) for m, r in per.items()} for a, per in data.attacks.items()}}
    for attack, per in result["attacks"].items():
        for target, info in per.items():
            words = ", ".join(f"{w} ({c})" for w, c in info["words"][:10]) or "-"
            classes = ", ".join(f"{k}: " + ("-" if v["asr"] is None else f"{v['asr']:.2f}")
                                for k, v in info["per_class"].items())
            out_console.print(f"[bold]{attack}[/] on {target}: ASR per class {classes}; most changed words: {words}")
    if layers:
        from tightrope import workflows  # noqa: PLC0415 - imported when the command runs: the CLI starts without torch
        from tightrope.data import load_task  # noqa: PLC0415 - imported when the command runs: the CLI starts without torch

        evaluated = data.evals.get(model)
        if evaluated is None:
            raise TightropeError(f"The run has no model '{model}' (it has {', '.join(data.evals)}).")
        clf = workflows.load(str(run / evaluated["model"]))
        d = data.spec["data"]
        task = load_task(d["task"], d.get("test_split", "test"), n=n, seed=data.spec.get("seed", 0),
                         data_dir=d.get("data_dir"))
        result["layers"] = classifier_sensitivity(clf, task, method)
        for name, row in result["layers"]["groups"].items():
            out_console.print(f"{name}: accuracy {row['accuracy']:.4f} ({row['delta_accuracy']:+.4f})")
    path = write_result(run / "weakness.json", result)
    out_console.print(f"[green]wrote[/] {path}")
