"""The Typer app every command module registers on, and what they share: the ``command`` decorator
(one-sentence errors), the ``MODEL`` argument and the ``--out`` option with its check, the
``--verbose`` switch. The library never imports :mod:`tightrope.cli`."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from tightrope import progress
from tightrope.cli.progress import RichReporter
from tightrope.errors import TightropeError
from tightrope.quiet import configure

app = typer.Typer(
    help="Compress language models (quantization, pruning) and keep them robust against attacks.\n\n"
    "Every command takes --help. Models are hub ids, local directories, or offline aliases "
    "(minilm, mpnet-base, smollm2-135m, gemma3-270m); tasks are names (imdb, sst2, mr, rotten-tomatoes, "
    "textfooler-imdb) or a CSV / JSON Lines / Parquet file.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True)
out_console = Console()


@app.callback()
def _global_options(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Also show third-party progress bars, warnings and logs.")] = False,
):
    configure(verbose)
    progress.use(RichReporter(console))  # the library reports progress through this; it draws nothing itself


def user_errors(fn):
    """Show a TightropeError as one red sentence and exit 2, never as a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            _check_out_is_a_folder(kwargs.get("out"))
            return fn(*args, **kwargs)
        except TightropeError as err:
            # one line whatever the width (the terminal wraps it, a log keeps it whole), and the message's
            # own brackets ("[UNK]", "[0, 1]") shown as written, not read as markup
            console.print(f"[bold red]error:[/] {escape(str(err))}", soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted; a checkpoint, if any, is kept and the same command resumes.[/]")
            raise typer.Exit(130) from None

    return wrapper


def command(name: str | None = None):
    """Register a module-level function as ``tightrope NAME``; its TightropeErrors print as one sentence."""

    def register(fn):
        return app.command(name)(user_errors(fn))

    return register


def model_argument(what: str):
    """The positional model of a command: ``what``, then how a model is named (a directory, an alias, a hub id)."""
    return typer.Argument(help=f"{what}: a model directory, alias or hub id.")


def out_option(what: str):
    """``--out`` / ``-o``: the folder a command writes ``what`` to; created if missing, and an existing file
    there is refused before any work (``user_errors`` checks it)."""
    return typer.Option("--out", "-o", help=f"Folder for {what}; created if missing.")


def _check_out_is_a_folder(out) -> None:
    """Every command's ``--out`` is a folder; an existing file there is refused before any work."""
    if out is not None and Path(out).expanduser().exists() and not Path(out).expanduser().is_dir():
        raise TightropeError(f"--out {out} is an existing file; give a folder (it is created if missing).")


def validation_error(err) -> TightropeError:
    """A pydantic ValidationError as one sentence naming the first invalid option."""
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "options"
    return TightropeError(f"Invalid value for {where}: {first['msg']}.")
