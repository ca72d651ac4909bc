"""Temperature scaling and the miscalibration check (Raina et al. 2024): a model made robust-looking by
scaling its logits is flagged; temperature changes no prediction."""

from __future__ import annotations

import pytest
import torch
from conftest import NEGATIVE, POSITIVE, make_tiny_classifier

from tightrope.attacks import Attacker, recipes
from tightrope.data import TaskData
from tightrope.errors import TightropeError
from tightrope.evaluate.calibration import (
    expected_calibration_error,
    fit_temperature,
    miscalibration_verdict,
    tempered,
)
from tightrope.inference import TextClassifier

TEXTS = POSITIVE + NEGATIVE


@pytest.fixture(scope="module")
def trained(tokenizer) -> TextClassifier:
    """A tiny classifier fitted to the twelve toy texts (a few seconds), so that attacks have signal."""
    model = make_tiny_classifier(tokenizer, seed=0)
    enc = tokenizer(TEXTS, padding=True, return_tensors="pt")
    y = torch.tensor([1] * len(POSITIVE) + [0] * len(NEGATIVE))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(40):
        loss = torch.nn.functional.cross_entropy(model(**enc).logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return TextClassifier(model, tokenizer, max_length=32)


def test_fit_temperature_recovers_the_scale_of_overconfident_logits():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(4000, 3, generator=gen) * 2
    labels = torch.multinomial(z.softmax(-1), 1, generator=gen).squeeze(1)  # calibrated at T = 1
    assert fit_temperature(z, labels) == pytest.approx(1.0, rel=0.1)
    assert fit_temperature(z * 8, labels) == pytest.approx(8.0, rel=0.1)
    assert fit_temperature(z / 4, labels) == pytest.approx(0.25, rel=0.1)
    assert expected_calibration_error(z * 8, labels) > 3 * expected_calibration_error(z, labels)


def test_a_tempered_view_changes_logits_not_predictions_and_leaves_the_model_alone(trained):
    hot = tempered(trained, 0.01)
    assert torch.allclose(hot.logits(TEXTS), trained.logits(TEXTS) / 0.01, rtol=1e-5, atol=1e-4)
    assert hot.predict(TEXTS) == trained.predict(TEXTS) and hot.temperature == 0.01
    assert not hasattr(trained, "temperature") and hot.model is trained.model
    with pytest.raises(TightropeError, match="positive number"):
        tempered(trained, 0.0)


def _asr(model, labels) -> float:
    data = TaskData("toy", "test", TEXTS, labels, ["0", "1"])
    return Attacker(recipes.build("deepwordbug", model), out=None, seed=0).run(model, data).attack_success_rate


def test_the_check_flags_a_model_made_robust_looking_by_scaling_its_logits(trained):
    labels = trained.predict(TEXTS)
    saturated = tempered(trained, 1e-6)  # logits x 1e6: the softmax is exactly 0 or 1 in float32
    plain, on_saturated = _asr(trained, labels), _asr(saturated, labels)
    assert on_saturated < plain  # the scores an attack searches on are flat: it looks robust
    restored = _asr(tempered(saturated, 1e6), labels)  # the attacker divides the logits back
    verdict = miscalibration_verdict(on_saturated, {1e6: restored})
    assert verdict.flagged and verdict.worst_temperature == 1e6 and "flagged" in verdict.sentence()
    assert not miscalibration_verdict(plain, {1.0: plain, 1e6: restored}).flagged  # the model as it is: nothing to find


def test_attack_command_records_the_temperature(tmp_path, tiny_model_dir):
    import json

    from typer.testing import CliRunner

    from tightrope.cli import app

    task = tmp_path / "toy.jsonl"
    task.write_text("\n".join(json.dumps({"text": t, "label": y}) for t, y in [("a wonderful film", 1), ("a dull mess", 0)]))
    out = tmp_path / "attack"
    result = CliRunner().invoke(app, ["attack", str(tiny_model_dir), "--recipe", "deepwordbug", "--task", str(task),
                                      "--out", str(out), "--temperature", "fit"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "attack.json").read_text())["temperature"] > 0
    bad = CliRunner().invoke(app, ["attack", str(tiny_model_dir), "--recipe", "deepwordbug", "--task", str(task),
                                   "--temperature", "warm"])
    assert bad.exit_code == 2 and "positive number or 'fit'" in bad.output
