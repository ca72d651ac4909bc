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
