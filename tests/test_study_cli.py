"""`tightrope run` / `report`: bad input fails before any work, with one sentence and exit code 2."""

from __future__ import annotations

from typer.testing import CliRunner

from tightrope.cli import app


def invoke(*args: str):
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, " ".join(result.output.split())  # rich wraps long lines


def test_typo_fails_before_any_work_with_the_key_path(tmp_path):
    study = tmp_path / "s.yaml"
    study.write_text("name: t\ndata:\n  task: rotten-tomatoes\n  max_lenght: 64\n")
    out = tmp_path / "run"
    code, output = invoke("run", str(study), "--out", str(out))
    assert code == 2
    assert "data.max_lenght" in output
    assert not out.exists()


def test_invalid_yaml_is_one_sentence(tmp_path):
    study = tmp_path / "s.yaml"
    study.write_text("name: t\n  data: : :\n")
    code, output = invoke("run", str(study), "--out", str(tmp_path / "run"))
    assert code == 2
    assert "not valid YAML" in output and "Traceback" not in output


def test_unknown_model_or_dataset_fails_before_any_work(tmp_path):
    for body, expected in (("model: {source: ./no/such/model}\n", "does not exist"),
                           ("data: {task: ./no/such/file.csv}\n", "does not exist")):
        study = tmp_path / "s.yaml"
        study.write_text("name: t\n" + body)
        out = tmp_path / "run"
        code, output = invoke("run", str(study), "--out", str(out))
        assert code == 2, output
        assert expected in output
        assert not out.exists()


def test_report_of_missing_run_is_one_sentence(tmp_path):
    code, output = invoke("report", str(tmp_path))
    assert code == 2 and "no finished study run" in output
