"""`tightrope harden` and `tightrope noise`: thin fronts, clean errors, warnings that are shown."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from conftest import make_tiny_classifier
from tightrope.cli import app
from tightrope.defenses.config import DefenseConfig, build_objective
from tightrope.errors import TightropeError


@pytest.fixture
def teacher_dir(tmp_path, tokenizer):
    from tightrope.models import save_model

    model = make_tiny_classifier(tokenizer, seed=9)
    model.config.id2label = {0: "negative", 1: "positive"}
    model.config.label2id = {"negative": 0, "positive": 1}
    return save_model((model, tokenizer), tmp_path / "teacher")


def _harden(tiny_model_dir, tiny_task, out, *extra):
    return CliRunner().invoke(app, ["harden", "--model", str(tiny_model_dir), "--task", str(tiny_task), "--out", str(out),
                                    "--n-eval", "8", "--max-length", "16", "--batch-size", "8", "--lr", "1e-3", *extra])


def test_harden_with_distillation_and_pruning_writes_a_model_and_its_record(tiny_model_dir, tiny_task, teacher_dir, tmp_path):
    result = _harden(tiny_model_dir, tiny_task, tmp_path / "run", "--defense", "fast", "--epsilon", "0.01",
                     "--teacher", str(teacher_dir), "--a", "0.5", "--order", "prune,train,quantize",
                     "--prune-sparsity", "0.2", "--quantize", "int8-dynamic")
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "run" / "harden.json").read_text())
    assert [s["step"] for s in record["steps"]] == ["prune", "train", "quantize"]
    assert "pending" in record["steps"][2]
    card = json.loads((tmp_path / "run" / "model" / "card.json").read_text())
    assert card["defense"]["teacher"] == str(teacher_dir) and card["defense"]["kind"] == "fast"
    from tightrope import inference

    assert inference.load(str(tmp_path / "run" / "model")).predict(["a joy to watch"])[0] in (0, 1)


@pytest.mark.parametrize("extra,match", [
    (["--epsilon", "0"], "epsilon is 0"),
    (["--defense", "pgd", "--mix", "0"], "plain fine-tuning"),
    (["--defense", "magic"], "kind"),
    (["--order", "train,oops"], "Unknown pipeline step"),
    (["--a", "0.3"], "needs a --teacher"),
    (["--order", "prune,train"], "no prune settings"),
])
def test_bad_harden_input_is_one_sentence_and_exit_2(tiny_model_dir, tiny_task, tmp_path, extra, match):
    result = _harden(tiny_model_dir, tiny_task, tmp_path / "run", *extra)
    assert result.exit_code == 2
    assert match in " ".join(result.output.split()) and "Traceback" not in result.output


def test_teacher_with_another_label_set_is_refused(tiny_model_dir, tiny_task, tmp_path):
    # The tiny model's labels are LABEL_0 / LABEL_1; the task's are negative / positive.
    result = _harden(tiny_model_dir, tiny_task, tmp_path / "run", "--teacher", str(tiny_model_dir))
    assert result.exit_code == 2 and "same label set" in " ".join(result.output.split())


def test_a_equal_one_with_a_teacher_warns(teacher_dir):
    with pytest.warns(UserWarning, match="teacher is ignored"):
        build_objective(DefenseConfig(kind="none", teacher=str(teacher_dir), a=1.0), student_labels=["negative", "positive"])


def test_defense_config_builds_each_kind():
    from tightrope.defenses.adversarial import FastAdversarial, FreeLB, PGDTraining
    from tightrope.defenses.fakequant import QuantAware

    assert isinstance(build_objective(DefenseConfig(kind="pgd")), PGDTraining)
    assert isinstance(build_objective(DefenseConfig(kind="fast")), FastAdversarial)
    assert isinstance(build_objective(DefenseConfig(kind="freelb", norm="l2", epsilon=1.0)), FreeLB)
    qat = build_objective(DefenseConfig(kind="fast", fake_quant="nf4"))
    assert isinstance(qat, QuantAware) and qat.describe()["fake_quant"] == "nf4"
    with pytest.raises(TightropeError, match="no mix"):
        build_objective(DefenseConfig(kind="freelb", mix=0.5))


def test_noise_command(tiny_model_dir, tmp_path):
    result = CliRunner().invoke(app, ["noise", str(tiny_model_dir), "--out", str(tmp_path / "noised"), "--sigma", "0.5",
                                      "--relative", "--scheme", "nf4"])
    assert result.exit_code == 0, result.output
    card = json.loads((tmp_path / "noised" / "card.json").read_text())
    assert card["noise"]["relative"] and card["noise"]["scheme"] == "nf4"
    bad = CliRunner().invoke(app, ["noise", str(tiny_model_dir), "--out", str(tmp_path / "x"), "--sigma", "0"])
    assert bad.exit_code == 2 and "sigma is 0" in bad.output
