"""The `tightrope` command line: parse options, build a config, call one library function.

No logic lives only here: every command is a thin front over a function a user can import.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from tightrope.errors import TightropeError

app = typer.Typer(
    help="Compress language models (quantization, pruning) and keep them robust against attacks.\n\n"
    "Every command takes --help. Models are hub ids, local directories, or offline aliases "
    "(minilm, mpnet-base, smollm2-135m); tasks are names (imdb, sst2, mr, rotten-tomatoes, "
    "textfooler-imdb) or a CSV / JSON Lines / Parquet file.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True)
out_console = Console()


def user_errors(fn):
    """Show a TightropeError as one red sentence and exit 2, never as a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except TightropeError as err:
            console.print(f"[bold red]error:[/] {err}")
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted; a checkpoint, if any, is kept and the same command resumes.[/]")
            raise typer.Exit(130) from None

    return wrapper


def _validation_error(err) -> TightropeError:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "options"
    return TightropeError(f"Invalid value for {where}: {first['msg']}.")


@app.command()
@user_errors
def train(
    out: Annotated[Path, typer.Option("--out", "-o", help="Model directory to write (resumes if a checkpoint is there).")],
    model: Annotated[str, typer.Option(help="Base model: alias, local directory or hub id.")] = "minilm",
    task: Annotated[str, typer.Option(help="Task name or data file.")] = "rotten-tomatoes",
    data_dir: Annotated[Optional[str], typer.Option(help="Folder of named datasets (else $TIGHTROPE_DATA_DIR, then the hub).")] = None,
    n_train: Annotated[Optional[int], typer.Option(help="Seeded subset of training examples (default: all).")] = None,
    n_eval: Annotated[int, typer.Option(help="Validation examples evaluated each epoch.")] = 1000,
    eval_split: Annotated[Optional[str], typer.Option(help="Validation split (default: the task's, else carved from train).")] = None,
    max_length: Annotated[int, typer.Option(help="Maximum tokens per text.")] = 128,
    truncation: Annotated[str, typer.Option(help="head, or head+tail (keeps the end of long reviews).")] = "head",
    batch_size: int = 16,
    epochs: Annotated[float, typer.Option(help="Epochs; fractions allowed (0.5 = half the data once).")] = 1.0,
    lr: float = 5e-5,
    schedule: Annotated[str, typer.Option(help="linear, cosine or constant, after a linear warm-up.")] = "linear",
    warmup_ratio: float = 0.06,
    seed: int = 0,
    eval_every: Annotated[Optional[int], typer.Option(help="Also evaluate every N steps.")] = None,
    patience: Annotated[Optional[int], typer.Option(help="Early stopping after N evaluations without improvement.")] = None,
    checkpoint_every: Annotated[int, typer.Option(help="Write a resumable checkpoint every N steps.")] = 50,
    trust_remote_code: Annotated[bool, typer.Option(help="Allow a model's own Python code to run. Only for models you trust.")] = False,
):
    """Fine-tune a sequence classifier and write a model directory with card.json.

    Example: tightrope train --model minilm --task imdb --max-length 256 --n-train 10000 --out runs/minilm-imdb
    """
    from pydantic import ValidationError

    from tightrope.train import TrainConfig
    from tightrope.train import train as run_training

    try:
        config = TrainConfig(
            model=model, task=task, data_dir=data_dir, n_train=n_train, n_eval=n_eval, eval_split=eval_split,
            max_length=max_length, truncation=truncation, batch_size=batch_size, epochs=epochs, lr=lr,
            schedule=schedule, warmup_ratio=warmup_ratio, seed=seed, eval_every=eval_every, patience=patience,
            checkpoint_every=checkpoint_every, trust_remote_code=trust_remote_code,
        )
    except ValidationError as err:
        raise _validation_error(err) from None
    card = run_training(config, out)
    best = card["metrics"]["best_validation_accuracy"]
    out_console.print(f"[green]wrote[/] {out}  (validation accuracy {best:.4f}, {card['train_seconds']:.0f} s)")


@app.command("eval")
@user_errors
def eval_(
    models: Annotated[list[str], typer.Argument(help="One or more model directories, aliases or hub ids.")],
    task: Annotated[str, typer.Option(help="Task name or data file.")] = "rotten-tomatoes",
    split: str = "test",
    n: Annotated[Optional[int], typer.Option(help="Seeded subset of examples (default: the whole split).")] = None,
    seed: int = 0,
    data_dir: Optional[str] = None,
    batch_size: int = 64,
    max_length: Annotated[Optional[int], typer.Option(help="Override the model card's max length.")] = None,
    speed: Annotated[bool, typer.Option(help="Measure latency and throughput.")] = True,
    memory: Annotated[bool, typer.Option(help="Measure peak memory in a fresh process.")] = True,
    latency_seq_len: int = 256,
    threads: Annotated[Optional[int], typer.Option(help="torch threads (default: torch's choice, recorded).")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the results as JSON here.")] = None,
):
    """Accuracy, macro-F1, confusion matrix, latency, throughput, stored bytes and peak memory, side by side."""
    import torch

    from tightrope.evaluate.results import write_json_atomic
    from tightrope.evaluate.run import evaluate_model
    from tightrope.report.tables import eval_table

    if threads:
        torch.set_num_threads(threads)
    results = [
        evaluate_model(m, task, split, n=n, seed=seed, data_dir=data_dir, batch_size=batch_size,
                       max_length=max_length, speed=speed, memory=memory, latency_seq_len=latency_seq_len)
        for m in models
    ]
    out_console.print(eval_table(results))
    if json_out:
        write_json_atomic(json_out, [r.to_dict() for r in results])
        out_console.print(f"[green]wrote[/] {json_out}")


# Each capability adds its own commands from its package (tightrope.<area>.commands.register(app)),
# so that this file stays a list of thin fronts and areas do not edit each other's code.
COMMAND_MODULES = (
    "tightrope.compress.commands",
    "tightrope.attacks.commands",
    "tightrope.defenses.commands",
    "tightrope.qattack.commands",
    "tightrope.study.commands",
)


def _register_area_commands() -> None:
    import importlib

    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name and name.startswith(err.name):
                continue  # that area is not built yet
            raise
        module.register(app, user_errors)


_register_area_commands()


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
