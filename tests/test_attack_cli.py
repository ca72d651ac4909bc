"""`tightrope attack` end to end on a tiny model saved in a temporary folder."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from tightrope.cli import app


@pytest.fixture()
def tiny_model_dir(tmp_path, tokenizer):
    from tests.conftest import make_tiny_classifier
    from tightrope import models

    model = make_tiny_classifier(tokenizer)
    card = {"format": "torch", "tokenization": {"max_length": 32, "truncation": "head"}}
    return models.save_model((model, tokenizer), tmp_path / "tiny", extra={"card.json": card})


def write_task(path, rows):
    path.write_text("\n".join(json.dumps({"text": t, "label": y}) for t, y in rows))
    return path


def test_attack_command_writes_results_and_resumes(tmp_path, tiny_model_dir):
    task = write_task(tmp_path / "toy.jsonl", [("a wonderful moving film", 1), ("a dull boring mess", 0),
                                               ("great acting and a superb script", 1), ("stupid and tedious", 0)])
    out = tmp_path / "attack"
    args = ["attack", str(tiny_model_dir), "--recipe", "deepwordbug", "--task", str(task), "--out", str(out)]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["examples"] == 4 and summary["succeeded"] + summary["failed"] + summary["skipped"] == 4
    assert {c["name"] for c in summary["attack"]["constraints"]} >= {"levenshtein_edit_distance", "stopword_modification"}
    assert len((out / "results.jsonl").read_text().splitlines()) == 4
    again = CliRunner().invoke(app, args)  # everything done: resumes to the same report
    assert again.exit_code == 0
    assert json.loads((out / "summary.json").read_text())["succeeded"] == summary["succeeded"]


def test_attack_command_bad_input_is_one_clean_line(tmp_path, tiny_model_dir):
    task = write_task(tmp_path / "three.jsonl", [("a", 0), ("b", 1), ("c", 2)])
    result = CliRunner().invoke(app, ["attack", str(tiny_model_dir), "--recipe", "deepwordbug", "--task", str(task)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    error = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "has 3 labels (0, 1, 2) but the model predicts 2" in error[0]  # whole, on one line
    result = CliRunner().invoke(app, ["attack", str(tiny_model_dir), "--recipe", "nope", "--task", str(task)])
    assert result.exit_code == 2 and "Unknown attack recipe" in result.output


def test_attack_command_streams_give_the_same_results(tmp_path, tiny_model_dir):
    task = write_task(tmp_path / "toy.jsonl", [("a wonderful moving film", 1), ("a dull boring mess", 0),
                                               ("great acting and a superb script", 1), ("stupid and tedious", 0)])
    found = {}
    for streams in (1, 2):
        out = tmp_path / f"attack-{streams}"
        result = CliRunner().invoke(app, ["attack", str(tiny_model_dir), "--recipe", "deepwordbug", "--task", str(task),
                                          "--out", str(out), "--threads", "2", "--streams", str(streams)])
        assert result.exit_code == 0, result.output
        rows = sorted((json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()),
                      key=lambda r: r["index"])
        found[streams] = [(r["status"], r["perturbed_text"], r["queries"]) for r in rows]
    assert found[1] == found[2] and len(found[1]) == 4
    bad = CliRunner().invoke(app, ["attack", str(tiny_model_dir), "--task", str(task), "--streams", "0"])
    assert bad.exit_code == 2 and "at least 1" in bad.output
