"""`tightrope run` / `report`: bad input fails before any work, with one sentence and exit code 2."""

from __future__ import annotations

from typer.testing import CliRunner

from tightrope.cli import app


def test_typo_fails_before_any_work_with_the_key_path(tmp_path):
    study = tmp_path / "s.yaml"
    study.write_text("name: t\ndata:\n  task: rotten-tomatoes\n  max_lenght: 64\n")
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", str(study), "--out", str(out)])
    assert result.exit_code == 2
    assert "data.max_lenght" in result.output
    assert not out.exists()


def test_invalid_yaml_is_one_sentence(tmp_path):
    study = tmp_path / "s.yaml"
    study.write_text("name: t\n  data: : :\n")
    result = CliRunner().invoke(app, ["run", str(study), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "not valid YAML" in result.output and "Traceback" not in result.output


def test_unknown_model_or_dataset_fails_before_any_work(tmp_path):
    for body, expected in (("model: {source: ./no/such/model}\n", "does not exist"),
                           ("data: {task: ./no/such/file.csv}\n", "does not exist")):
        study = tmp_path / "s.yaml"
        study.write_text("name: t\n" + body)
        out = tmp_path / "run"
        result = CliRunner().invoke(app, ["run", str(study), "--out", str(out)])
        assert result.exit_code == 2, result.output
        assert expected in result.output
        assert not out.exists()


def test_report_of_missing_run_is_one_sentence(tmp_path):
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "no finished study run" in result.output
