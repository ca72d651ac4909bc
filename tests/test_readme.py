"""The README's examples still work: every ``tightrope ...`` command it shows parses against the
current command line (command names, options, choices and types), without running the work.

The examples themselves take minutes to hours (IMDB fine-tuning, attack grids). Here a renamed
option or a removed command fails at once, every command the README names answers ``--help``, the
study files it runs are valid, and its example block runs in order on a tiny model and task
(:func:`test_the_readme_examples_run_on_a_tiny_model`); the few that stay long even then (``LONG``)
are run at small scale by the tests named there.
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


# --- the examples, run ---------------------------------------------------------------------------------

# README commands too long for the suite even when scaled down, and the tests that run each at small scale.
LONG = {
    "run": "test_study_e2e.py runs a study end to end on tiny models; test_study_spec.py parses the README's study files",
    "search": "test_search.py and test_search_defenses.py run a search on tiny models",
    "qattack-lm": "test_qattack_causal.py runs both scenarios on a tiny Llama",
    "audit": "test_qattack_audit.py audits tiny planted and clean models",
    "serve": "test_serving.py serves a bundle over HTTP",
}
SCALE = {"--n-train": "16", "--max-length": "32", "--eval-every": "2", "--recover-steps": "2", "--n": "4"}


def scaled(line: str, model: str, task: str) -> list[str] | None:
    """A README command line shrunk to the tiny model and task (same command, same options), or None
    where it is one of the LONG ones or a Ray run (tests/test_sweep_ray.py)."""
    args = shlex.split(line)
    if args[0] in LONG or "--ray" in args:
        return None
    out = []
    for i, arg in enumerate(args):
        before = args[i - 1] if i else ""
        if before == "--model" and not arg.startswith("runs/"):
            arg = model
        elif before == "--task":
            arg = task
        elif before in SCALE:
            arg = SCALE[before]
        out.append(arg)
    if out[0] == "eval":
        out.append("--no-memory")  # the memory probe is a second process that imports torch again
    return out


def test_the_study_files_the_readme_runs_are_valid():
    from tightrope.study.spec import load_spec

    files = [shlex.split(c)[1] for c in COMMANDS if c.split()[0] in ("run", "search")]
    assert "studies/quickstart.yaml" in files and "studies/mr-search.yaml" in files
    for name in files:
        load_spec(README.parent / name)


@pytest.mark.parametrize("name", sorted({c.split()[0] for c in COMMANDS}
                                        | set(re.findall(r"`tightrope (\w[\w-]*)", README.read_text()))))
def test_every_command_the_readme_names_has_help(name):
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, [name, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output


def test_the_readme_examples_run_on_a_tiny_model(tmp_path, tiny_model_dir, tiny_task, monkeypatch):
    """The README's example block, in its order, on the tiny model and task (``runs/`` in a temporary
    folder): train, eval, the hardened and the canonical variants, compress, export, predict, the attack's
    dry run. The long commands (LONG) are run at small scale by the tests they name."""
    from typer.testing import CliRunner

    monkeypatch.chdir(tmp_path)
    (tmp_path / "reviews.jsonl").write_text('{"text": "a fine film"}\n{"text": "a dull film"}\n')
    ran = []
    for line in COMMANDS:
        args = scaled(line, str(tiny_model_dir), str(tiny_task))
        if args is None:
            continue
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, f"`tightrope {' '.join(args)}`: {result.output}"
        ran.append(args[0])
    assert {"train", "eval", "compress", "export", "predict", "attack"} <= set(ran)
    assert (tmp_path / "runs/hardened/model").is_dir() and (tmp_path / "runs/canonical").is_dir()
    assert len((tmp_path / "predictions.jsonl").read_text().splitlines()) == 2
