"""The `tightrope` command line: parse options, build a config, call one library function.

Every command is a module-level function in a module of this package (``core``: train and eval;
``compress``; ``attack``; ``defenses``: noise; ``qattack`` and ``qattack_lm``; ``study``: run,
search, report, weakness; ``serve``: export, predict, serve), registered on :data:`app` when its
module is imported. No logic lives only here, and the library never imports this package.
"""

from __future__ import annotations

import importlib
import sys

from tightrope.cli.base import app

COMMAND_MODULES = ("core", "compress", "attack", "defenses", "qattack", "qattack_lm", "study", "serve")
# Commands that run without torch: when one of them is invoked, only its module is imported, so a
# serving machine never imports torch or transformers (the other modules' library imports do).
TORCH_FREE_COMMANDS = {"predict": "serve", "serve": "serve"}


def _invoked_command(argv: list[str]) -> str | None:
    """The command word of a `tightrope ...` command line (its first argument that is not an option)."""
    return next((a for a in argv[1:] if not a.startswith("-")), None)


def _register_commands() -> None:
    light = TORCH_FREE_COMMANDS.get(_invoked_command(sys.argv) or "")
    for name in (light,) if light else COMMAND_MODULES:
        importlib.import_module(f"tightrope.cli.{name}")


_register_commands()


def main() -> None:  # pragma: no cover - console entry point
    app()


__all__ = ["app", "main"]
