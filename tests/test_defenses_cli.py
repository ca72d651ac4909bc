"""`tightrope train --defense` (and its deprecated alias `harden`) and `tightrope noise`: thin fronts,
clean errors, warnings that are shown."""

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


def _train(tiny_model_dir, tiny_task, out, *extra, command="train"):
    return CliRunner().invoke(app, [command, "--model", str(tiny_model_dir), "--task", str(tiny_task), "--out", str(out),
                                    "--n-eval", "8", "--max-length", "16", "--batch-size", "8", "--lr", "1e-3", *extra])


def _flat(result) -> str:
    return " ".join(result.output.split())


def test_train_with_distillation_and_pruning_writes_a_model_and_its_record(tiny_model_dir, tiny_task, teacher_dir, tmp_path):
    result = _train(tiny_model_dir, tiny_task, tmp_path / "run", "--defense", "fast", "--epsilon", "0.01",
                    "--teacher", str(teacher_dir), "--a", "0.5", "--order", "prune,train,quantize",
                    "--prune-sparsity", "0.2", "--quantize", "int8", "--truncation", "head+tail")
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "run" / "pipeline.json").read_text())
    assert [s["step"] for s in record["steps"]] == ["prune", "train", "quantize"]
    assert "pending" in record["steps"][2]
    card = json.loads((tmp_path / "run" / "model" / "card.json").read_text())
    assert card["defense"]["teacher"] == str(teacher_dir) and card["defense"]["kind"] == "fast"
    # The card records the training run's tokenization, not a hard-coded head truncation.
    assert card["tokenization"] == {"max_length": 16, "truncation": "head+tail"}
    from tightrope import inference

    clf = inference.load(str(tmp_path / "run" / "model"))
    assert clf.truncation == "head+tail" and clf.max_length == 16
    assert clf.predict(["a joy to watch"])[0] in (0, 1)


def test_train_with_a_defense_alone_writes_the_model_in_out(tiny_model_dir, tiny_task, tmp_path):
    result = _train(tiny_model_dir, tiny_task, tmp_path / "run", "--defense", "pgd", "--epsilon", "0.01", "--steps", "2")
    assert result.exit_code == 0, result.output
    card = json.loads((tmp_path / "run" / "card.json").read_text())
    assert card["defense"]["kind"] == "pgd" and card["defense"]["objective"]["steps"] == 2
    assert card["tokenization"] == {"max_length": 16, "truncation": "head"} and card["pipeline"] == ["train"]
    assert not (tmp_path / "run" / "pipeline.json").exists()



def test_freelb_plus_plus_settings_reach_the_objective(tiny_model_dir, tiny_task, tmp_path):
    """FreeLB++ (Li et al. 2021) from the command line: more ascent steps, an unreachable bound, its own start."""
    result = _train(tiny_model_dir, tiny_task, tmp_path / "run", "--defense", "freelb", "--steps", "3", "--step-size",
                    "0.03", "--epsilon", "10", "--norm", "l2", "--init-magnitude", "0.05")
    assert result.exit_code == 0, result.output
    objective = json.loads((tmp_path / "run" / "card.json").read_text())["defense"]["objective"]
    assert (objective["defense"], objective["steps"], objective["epsilon"], objective["init_magnitude"]) == ("freelb", 3, 10.0, 0.05)

def test_the_removed_harden_alias_is_no_command():
    result = CliRunner().invoke(app, ["harden", "--help"])
    assert result.exit_code != 0


def test_train_help_groups_the_defense_options():
    result = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    text = result.output
    assert "Defense" in text and "--defense" in text and "--query-budget" in text
    panel = text.index("─ Defense ─")  # the options sit in their own panel, after the training options
    assert text.index("--trust-remote-code") < panel < text.index("--query-budget")


@pytest.mark.parametrize("extra,match", [
    (["--defense", "fast", "--epsilon", "0"], "epsilon is 0"),
    (["--defense", "pgd", "--epsilon", "0"], "epsilon is 0"),
    (["--defense", "pgd", "--mix", "0"], "plain fine-tuning"),
    (["--defense", "magic"], "Unknown defense 'magic'; choose one of none, pgd"),
    (["--defense", "pgd", "--order", "train,oops"], "Unknown pipeline step"),
    (["--defense", "pgd", "--a", "0.3"], "needs a --teacher"),
    (["--defense", "pgd", "--order", "prune,train"], "no prune settings"),
    (["--defense", "pgd", "--prune-sparsity", "0.3"], "has no 'prune' step"),
    (["--epsilon", "0.02"], "no defense is chosen"),
    (["--defense", "a2t", "--epsilon", "0.02"], "does not use --epsilon"),
    (["--defense", "pgd", "--query-budget", "10"], "does not use --query-budget"),
    (["--defense", "fast", "--steps", "3"], "does not use --steps"),
    (["--defense", "a2t", "--adv-share", "0"], "adv_share"),
    (["--defense", "pgd", "--noise-relative"], "needs --noise-sigma"),
])
def test_bad_defense_input_is_one_sentence_and_exit_2(tiny_model_dir, tiny_task, tmp_path, extra, match):
    result = _train(tiny_model_dir, tiny_task, tmp_path / "run", *extra)
    assert result.exit_code == 2, result.output
    assert match in _flat(result) and "Traceback" not in result.output
    assert not (tmp_path / "run" / "card.json").exists()


def test_teacher_with_another_label_set_is_refused(tiny_model_dir, tiny_task, tmp_path):
    # The tiny model's labels are LABEL_0 / LABEL_1; the task's are negative / positive.
    result = _train(tiny_model_dir, tiny_task, tmp_path / "run", "--defense", "fast", "--teacher", str(tiny_model_dir))
    assert result.exit_code == 2 and "same label set" in _flat(result)
    assert result.output.count("error:") == 1


def test_a_equal_one_with_a_teacher_is_a_warning_on_the_command_line(tiny_model_dir, tiny_task, teacher_dir, tmp_path):
    result = _train(tiny_model_dir, tiny_task, tmp_path / "run", "--teacher", str(teacher_dir), "--a", "1")
    assert result.exit_code == 0, result.output
    assert "warning:" in result.output and "teacher is ignored" in _flat(result)


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
    with pytest.raises(TightropeError, match="does not use --mix"):
        build_objective(DefenseConfig(kind="freelb", mix=0.5))
    with pytest.raises(TightropeError, match="tokenizer"):
        build_objective(DefenseConfig(kind="a2t"))


def test_defense_config_builds_a2t_with_the_run_tokenization(tokenizer):
    from tightrope.defenses.a2t import A2TTraining

    a2t = build_objective(DefenseConfig(kind="a2t", query_budget=7, adv_share=0.25), student_tokenizer=tokenizer,
                          max_length=64, truncation="head+tail")
    assert isinstance(a2t, A2TTraining)
    assert (a2t.query_budget, a2t.adv_share, a2t.mix, a2t.max_length, a2t.truncation) == (7, 0.25, 0.5, 64, "head+tail")


def test_noise_command(tiny_model_dir, tmp_path):
    result = CliRunner().invoke(app, ["noise", str(tiny_model_dir), "--out", str(tmp_path / "noised"), "--sigma", "0.5",
                                      "--relative", "--scheme", "nf4"])
    assert result.exit_code == 0, result.output
    card = json.loads((tmp_path / "noised" / "card.json").read_text())
    assert card["noise"]["relative"] and card["noise"]["scheme"] == "nf4"
    bad = CliRunner().invoke(app, ["noise", str(tiny_model_dir), "--out", str(tmp_path / "x"), "--sigma", "0"])
    assert bad.exit_code == 2 and "sigma is 0" in bad.output
