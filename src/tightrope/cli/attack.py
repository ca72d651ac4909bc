"""`tightrope attack`: run a recipe against any model variant, resumable, with a live success rate."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from tightrope.cli.base import command, model_argument, out_option
from tightrope.errors import TightropeError


def highlighted_diff(original: str, perturbed: str) -> tuple[Text, Text]:
    """Two rich Texts with the changed words struck in red (original) and bold green (adversarial)."""
    a, b = original.split(" "), perturbed.split(" ")
    left, right = Text(), Text()
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if op == "equal":
            left.append(" ".join(a[i1:i2]) + " ")
            right.append(" ".join(b[j1:j2]) + " ")
        else:
            if i2 > i1:
                left.append(" ".join(a[i1:i2]), style="bold red")
                left.append(" ")
            if j2 > j1:
                right.append(" ".join(b[j1:j2]), style="bold green")
                right.append(" ")
    return left, right


def clip(text: Text, limit: int = 600) -> Text:
    return text if len(text) <= limit else text[:limit] + Text(" ...")


@command()
def attack(
    model: Annotated[str, model_argument("Model to attack, any compressed variant")],
    recipe: Annotated[str, typer.Option(help="textfooler, pwws, deepwordbug or hotflip.")] = "textfooler",
    task: Annotated[str, typer.Option(help="Task name or data file.")] = "textfooler-imdb",
    split: str = "test",
    n: Annotated[Optional[int], typer.Option(help="Seeded subset of examples (default: the whole split).")] = None,
    out: Annotated[Optional[Path], out_option("results.jsonl and summary.json (a rerun resumes)")] = None,
    seed: int = 0,
    data_dir: Optional[str] = None,
    query_budget: Annotated[Optional[int], typer.Option(help="Queries allowed per example, counted as TextAttack counts them (cache hits included).")] = None,
    max_length: Annotated[Optional[int], typer.Option(help="Override the model card's max length.")] = None,
    long_texts: Annotated[str, typer.Option(help="window: change only words the model sees; error: refuse longer texts.")] = "window",
    twin: Annotated[Optional[str], typer.Option(help="Differentiable twin for gradient steps (hotflip) when the model has none.")] = None,
    transfer_to: Annotated[Optional[list[str]], typer.Option("--transfer", help="Evaluate the adversarial texts on these models too.")] = None,
    shard: Annotated[bool, typer.Option(help="Split examples across processes (run under `accelerate launch`).")] = False,
    show: Annotated[int, typer.Option(help="Adversarial examples to print as diffs.")] = 3,
    threads: Annotated[Optional[int], typer.Option(help="torch threads (default: torch's choice).")] = None,
    streams: Annotated[int, typer.Option(help="Examples attacked at once in this process, each on its own thread; the "
                                              "threads are shared among them (--threads 2 --streams 2: one each). The "
                                              "small batches of an attack run better one core each; the results are "
                                              "the same as one stream's.")] = 1,
    runtime: Annotated[str, typer.Option(help="torch, or onnxruntime: the same fp32 model on ONNX Runtime's fused graph, "
                                              "checked to give PyTorch's logits within 1e-4 (faster; docs/benchmarks.md).")] = "torch",
    temperature: Annotated[Optional[str], typer.Option(help="Divide the victim's logits by T before the attack scores them "
                                                  "(no prediction changes): a number, or 'fit' for the T that minimises the NLL on the "
                                                  "attacked examples' clean texts. A defense whose success rate rises under a temperature "
                                                  "looked robust through saturated scores (Raina et al. 2024).")] = None,
    ray: Annotated[Optional[str], typer.Option(help="Run on Ray: auto (the cluster this machine joined), local (Ray inside "
                                                    "this run) or HOST:PORT of a head node; default: this process.")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Ray workers, one CPU and one torch thread each (default: every CPU).")] = None,
    shard_size: Annotated[int, typer.Option(help="Examples per Ray task.")] = 4,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the tasks, the estimated CPU hours and the wall time "
                                                            "on N workers, and run nothing.")] = False,
):
    """Attack a classifier with a text-attack recipe and report TextAttack's metrics.

    Example: tightrope attack runs/minilm-imdb --recipe textfooler --task textfooler-imdb --n 100 --out runs/attack-tf
    """
    import torch

    from tightrope import workflows  # noqa: PLC0415 - imported when the command runs: the CLI starts without torch
    from tightrope.attacks import recipes  # noqa: PLC0415 - imported when the command runs: the CLI starts without torch
    from tightrope.attacks.attacker import Attacker  # noqa: PLC0415 - imported when the command runs: the CLI starts without torch
    from tightrope.data import load_task  # noqa: PLC0415 - imported when the command runs: the CLI starts without torch

    console, out_console = Console(stderr=True), Console()
    if streams < 1:
        raise TightropeError(f"--streams is the number of examples attacked at once, at least 1, not {streams}.")
    if streams > 1 and (ray or shard):
        raise TightropeError("--streams runs examples side by side in this process; --ray and --shard split them "
                             "between processes already, so pick one.")
    per_stream = max(1, (threads or torch.get_num_threads()) // streams)
    if threads or streams > 1:
        torch.set_num_threads(per_stream)
    if ray or dry_run:
        from tightrope.workflows import sweep as sweeps  # noqa: PLC0415 - imported when the command runs: the CLI starts without torch

        if shard:
            raise TightropeError("--shard splits a run between `accelerate launch` processes and --ray between Ray workers; pick one.")
        plan = sweeps.Sweep((sweeps.Cell(recipe, Path(model).name, model),), task=task, split=split, n=n, seed=seed,
                            data_dir=data_dir, query_budget=query_budget, max_length=max_length, long_texts=long_texts,
                            twin=twin, runtime=runtime, threads=threads or 1, temperature=temperature)
        if dry_run:
            for line in sweeps.plan(plan, out, shard_size=shard_size).lines(sorted({1, 2, 8, 32, 128, workers or 1})):
                out_console.print(line)
            return
        from tightrope.workflows.ray_backend import RayBackend  # noqa: PLC0415 - imported when the command runs: Ray is optional

        data = plan.load_data()
        (report,) = sweeps.run_sweep(plan, out, backend=RayBackend(ray, workers=workers), shard_size=shard_size).values()
        _show(report, recipe, model, data, out, show, out_console)
        if transfer_to:
            _transfer(out, transfer_to, max_length, out_console)
        return
    data = load_task(task, split, n=n, seed=seed, data_dir=data_dir)
    victim = workflows.load(model, max_length=max_length)
    victim.source = victim.source or model
    options = {"query_budget": query_budget}
    if twin:
        options["twin"] = workflows.load(twin, max_length=max_length)
    if runtime not in ("torch", "onnxruntime"):
        raise TightropeError(f"--runtime is torch or onnxruntime, not '{runtime}'.")
    if runtime == "onnxruntime":
        from tightrope.compress.onnxrt import onnx_twin  # noqa: PLC0415 - imported when the command runs: the CLI starts without torch

        fast, gap = onnx_twin(victim, data.texts[:16], threads=per_stream)
        options.setdefault("twin", victim)  # gradients for HotFlip come from the PyTorch model itself
        victim = fast
        console.print(f"victim on ONNX Runtime fp32: logits within {gap:.1e} of PyTorch's on {min(16, len(data))} texts")
    if temperature is not None:
        from tightrope.workflows.sweep import with_temperature  # noqa: PLC0415 - imported when the command runs: the CLI starts without torch

        victim, value = with_temperature(victim, temperature, data)
        console.print(f"attacking the victim's logits divided by T = {value:.4g}")
    with console.status(f"preparing {recipe} (resources are built once and cached)"):
        attack = recipes.build(recipe, victim, **options)
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                        console=console)

    with progress:
        bar = progress.add_task(f"{recipe} on {Path(model).name}", total=len(data), rate="")

        def update(result, done):
            won = sum(r.status == "succeeded" for r in done)
            lost = sum(r.status == "failed" for r in done)
            rate = f"success {won}/{won + lost} = {won / (won + lost):.1%}" if won + lost else "success -"
            progress.update(bar, completed=len(done), rate=rate)

        report = Attacker(attack, out=out, seed=seed, long_texts=long_texts, shard=shard,
                          streams=streams).run(victim, data, progress=update)

    _show(report, recipe, model, data, out, show, out_console)
    if transfer_to:
        _transfer(out, transfer_to, max_length, out_console)


def _show(report, recipe: str, model: str, data, out: Optional[Path], show: int, out_console: Console) -> None:
    table = Table(title=f"{recipe} against {model} on {data.name}:{data.split} ({report.examples} examples)")
    for col in ("orig. acc", "acc. under attack", "ASR", "succeeded/failed/skipped", "avg queries", "model calls",
                "perturbed words"):
        table.add_column(col, justify="right")
    table.add_row(_pct(report.original_accuracy), _pct(report.accuracy_under_attack), _pct(report.attack_success_rate),
                  f"{report.succeeded}/{report.failed}/{report.skipped}",
                  "-" if report.average_queries is None else f"{report.average_queries:.1f}",
                  "-" if report.average_model_queries is None else f"{report.average_model_queries:.1f}",
                  _pct(report.average_perturbed_share))
    out_console.print(table)
    results = _load_results(out) if out else []
    for res in [r for r in results if r.status == "succeeded"][:show]:
        left, right = highlighted_diff(res.original_text, res.perturbed_text)
        names = data.label_names
        out_console.print(f"[bold]example {res.index}[/] {names[res.label]} -> {names[res.perturbed_prediction]}"
                          f" ({res.queries} queries)")
        out_console.print(clip(left))
        out_console.print(clip(right))
    if out:
        out_console.print(f"[green]wrote[/] {out}/results.jsonl and {out}/summary.json")


def _pct(v) -> str:
    return "-" if v is None else f"{v:.1%}"


def _transfer(out: Optional[Path], transfer_to: list[str], max_length: Optional[int], out_console: Console) -> None:
    from tightrope import workflows  # noqa: PLC0415 - imported when the command runs: the CLI starts without torch
    from tightrope.attacks.attack import transfer  # noqa: PLC0415 - imported when the command runs: the CLI starts without torch
    from tightrope.evaluate.results import write_json_atomic  # noqa: PLC0415 - imported when the command runs: the CLI starts without torch

    if not out:
        raise typer.BadParameter("--transfer needs --out, where the adversarial texts are kept")
    targets = {m: workflows.load(m, max_length=max_length) for m in transfer_to}
    moved = transfer(_load_results(out), targets)
    write_json_atomic(out / "transfer.json", [t.to_dict() for t in moved])
    for t in moved:
        out_console.print(f"transfer to {t.target}: accuracy {t.original_accuracy:.1%} -> "
                          f"{t.accuracy_under_transfer:.1%}, transfer success {_pct(t.transfer_success_rate)}")


def _load_results(out: Path):
    from tightrope.attacks.attacker import read_results  # noqa: PLC0415 - imported when the command runs: the CLI starts without torch

    files = sorted(Path(out).glob("results*.jsonl"))
    results = [r for f in files for r in read_results(f)]
    return sorted(results, key=lambda r: r.index)
