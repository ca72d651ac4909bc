"""The command line: thin fronts, one clear sentence and exit 2 on bad input, nothing half-written."""

import pytest
from typer.testing import CliRunner

from tightrope.cli import app

runner = CliRunner()


def _run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, " ".join(result.output.split())


def test_help_lists_commands():
    code, out = _run("--help")
    assert code == 0 and "train" in out and "eval" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("eval", "/nonexistent/model"), "does not exist"),
        (("train", "--out", "{tmp}/o", "--task", "/nonexistent.csv"), "does not exist"),
        (("train", "--out", "{tmp}/o", "--batch-size", "0"), "batch_size"),
        (("eval", "no-such-org/no-such-model"), "hub"),
    ],
)
def test_bad_input_is_one_sentence_and_exit_2(tmp_path, args, message):
    code, out = _run(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert code == 2, out
    assert message in out and "Traceback" not in out
    assert not (tmp_path / "o").exists()  # nothing half-written


def test_eval_refuses_a_bare_encoder(tmp_path, tokenizer):
    from transformers import BertConfig, BertModel

    from tightrope.models import save_model

    enc = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1,
                               num_attention_heads=4, intermediate_size=64))
    path = save_model((enc, tokenizer), tmp_path / "enc")
    code, out = _run("eval", path, "--task", "rotten-tomatoes")
    assert code == 2 and "not a sequence classifier" in out


def test_eval_of_a_file_without_label_column(tmp_path, tiny_model_dir):
    (tmp_path / "d.csv").write_text("text,stars\ngood,1\nbad,0\n")
    code, out = _run("eval", tiny_model_dir, "--task", tmp_path / "d.csv", "--no-speed", "--no-memory")
    assert code == 2 and "no label column" in out


def test_eval_writes_json(tmp_path, tiny_model_dir, tiny_task):
    code, out = _run("eval", tiny_model_dir, "--task", tiny_task, "--no-speed", "--no-memory", "--json", tmp_path / "r.json")
    assert code == 0, out
    assert (tmp_path / "r.json").exists()


@pytest.fixture
def truncated_model_dir(tmp_path, tiny_model_dir):
    import shutil

    broken = tmp_path / "truncated"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / "model.safetensors"
    with weights.open("r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    return broken


@pytest.mark.parametrize("command", [["eval", "{model}", "--task", "{task}"], ["audit", "{model}"],
                                     ["compress", "{model}", "--quantize", "int8", "--out", "{tmp}/out"]],
                         ids=lambda c: c[0])
def test_a_truncated_safetensors_file_is_one_sentence(tmp_path, truncated_model_dir, tiny_task, command):
    args = [a.format(model=truncated_model_dir, task=tiny_task, tmp=tmp_path) for a in command]
    code, out = _run(*args)
    assert code == 2, out
    assert "not a complete safetensors file" in out and "Traceback" not in out
    assert not (tmp_path / "out").exists()  # nothing half-written


@pytest.mark.parametrize("command", [["compress", "{model}", "--quantize", "int8"], ["train", "--model", "{model}"],
                                     ["attack", "{model}", "--recipe", "deepwordbug"], ["run", "studies/quickstart.yaml"]],
                         ids=lambda c: c[0])
def test_out_naming_an_existing_file_is_one_sentence(tmp_path, tiny_model_dir, command):
    existing = tmp_path / "a-file"
    existing.write_text("keep me")
    code, out = _run(*[a.format(model=tiny_model_dir) for a in command], "--out", existing)
    assert code == 2 and "is an existing file; give a folder" in out and "Traceback" not in out
    assert existing.read_text() == "keep me"


def test_third_party_output_is_quiet_unless_verbose(tmp_path, tiny_model_dir, tiny_task):
    import logging
    import warnings

    from tightrope import quiet

    code, out = _run("eval", tiny_model_dir, "--task", tiny_task, "--no-speed", "--no-memory")
    assert code == 0, out
    assert "Loading weights" not in out and "it/s]" not in out and "Warning" not in out
    assert logging.getLogger("bitsandbytes").getEffectiveLevel() == logging.ERROR
    with warnings.catch_warnings(record=True) as caught:
        quiet.configure(verbose=False)
        warnings.warn_explicit("third-party noise", UserWarning, "x.py", 1, module="transformers.modeling_utils")
        warnings.warn_explicit("ours", UserWarning, "y.py", 1, module="tightrope.defenses.distill")
    assert [str(w.message) for w in caught] == ["ours"]
    quiet.configure(verbose=True)
    assert logging.getLogger("tightrope").getEffectiveLevel() == logging.DEBUG
