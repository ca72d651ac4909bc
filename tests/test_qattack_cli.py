"""`tightrope audit` and `tightrope qattack` from the command line: verdicts become exit codes."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import make_tiny_classifier, save_audit_pair
from typer.testing import CliRunner

from tightrope.cli import app
from tightrope.qattack.boxes import model_boxes
from tightrope.qattack.repair import FitConfig, repair_

pytest.importorskip("bitsandbytes")
runner = CliRunner()


def text(result) -> str:
    return " ".join(result.output.split())  # rich wraps long sentences


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, tokenizer):
    tok = tokenizer
    clean = make_tiny_classifier(tok, hidden=64, intermediate=128)
    attacked = copy.deepcopy(clean)
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(1000, 5000, (12,), generator=g).tolist() for _ in range(32)]
    repair_(attacked, model_boxes(clean, "nf4"), ids, [i % 2 for i in range(32)], 0,
            FitConfig(steps=10, lr=3e-3, batch_size=8), progress=False)
    return save_audit_pair(tmp_path_factory.mktemp("cli"), tok, clean, attacked)


def test_audit_flags_with_exit_1_and_writes_json(dirs, tmp_path):
    _, attacked, probe = dirs
    out = tmp_path / "audit.json"
    result = runner.invoke(app, ["audit", str(attacked), "--task", str(probe), "--split", "train", "--n-probe", "60",
                                 "--quantizer", "nf4", "--json", str(out)])
    assert result.exit_code == 1, result.output
    assert "FLAGGED" in result.output
    assert json.loads(out.read_text())["verdict"] == "flagged"


def test_audit_small_probe_is_inconclusive_exit_3(dirs):
    clean, _, probe = dirs
    result = runner.invoke(app, ["audit", str(clean), "--task", str(probe), "--split", "train", "--n-probe", "10",
                                 "--quantizer", "nf4"])
    assert result.exit_code == 3, result.output
    assert "fewer than the 50" in text(result) and "CLEAN" not in result.output


def test_bad_input_is_one_sentence_exit_2(dirs, tmp_path):
    clean, _, _ = dirs
    result = runner.invoke(app, ["audit", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "does not exist" in text(result)
    result = runner.invoke(app, ["audit", str(clean), "--quantizer", "int3"])
    assert result.exit_code == 2 and "Unknown transform" in text(result)
    result = runner.invoke(app, ["qattack", str(clean), "--out", str(tmp_path / "x"), "--margin", "0.7"])
    assert result.exit_code == 2 and "margin" in text(result)


def test_audit_alpha_is_validated_and_taught(dirs):
    clean, _, _ = dirs
    for bad in ("0", "0.7", "-1"):
        result = runner.invoke(app, ["audit", str(clean), "--alpha", bad])
        assert result.exit_code == 2 and "alpha" in text(result), result.output
    result = runner.invoke(app, ["audit", "--help"])
    assert result.exit_code == 0
    assert "False-positive rate" in text(result) and "--no-search" in text(result) and "--null" in text(result)


def test_audit_verdict_states_its_p_value(dirs, tmp_path):
    _, attacked, probe = dirs
    out = tmp_path / "audit.json"
    result = runner.invoke(app, ["audit", str(attacked), "--task", str(probe), "--split", "train", "--n-probe", "60",
                                 "--quantizer", "nf4", "--no-search", "--alpha", "0.001", "--json", str(out)])
    assert result.exit_code == 1, result.output
    nf4 = json.loads(out.read_text())["transforms"][0]
    assert nf4["p_value"] <= nf4["level"] == pytest.approx(0.001)
    assert nf4["reasons"][0].startswith("combined p = ") and nf4["search"] is None
    assert "false-positive rate" in text(result)
