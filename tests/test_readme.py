"""The README's examples still work: every ``tightrope ...`` command it shows parses against the
current command line (command names, options, choices and types), without running the work.

The examples themselves take minutes to hours (IMDB fine-tuning, attack grids); the tests of each
command run them on tiny models. Here a renamed option or a removed command fails at once.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest
import typer

from tightrope.cli import app

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands() -> list[str]:
    """Every ``tightrope`` command line of the README's shell blocks (continuations joined, comments cut)."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" # ")[0].split("   #")[0].strip()
            for part in re.split(r"&&|;", line):
                part = part.strip()
                m = re.match(r"^(?:\.venv/bin/)?tightrope\s+(.*)$", part)
                if m:
                    commands.append(m.group(1))
    return commands


COMMANDS = readme_commands()


def test_the_readme_shows_commands():
    assert len(COMMANDS) >= 10 and any(c.startswith("run ") for c in COMMANDS)


@pytest.mark.parametrize("line", COMMANDS, ids=lambda c: c[:60])
def test_a_readme_command_parses(line):
    group = typer.main.get_command(app)
    args = shlex.split(line)
    with group.make_context("tightrope", list(args), resilient_parsing=False) as ctx:
        name, *rest = [*ctx._protected_args, *ctx.args] if hasattr(ctx, "_protected_args") else [*ctx.protected_args, *ctx.args]
        command = group.get_command(ctx, name)
        assert command is not None, f"the README shows `tightrope {name}`, which is no command"
        try:
            command.make_context(name, list(rest), parent=ctx)
        except click.ClickException as err:
            pytest.fail(f"`tightrope {line}`: {err.format_message()}")
