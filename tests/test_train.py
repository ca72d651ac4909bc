import json

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from tightrope.errors import TightropeError
from tightrope.train import TrainConfig, epoch_order, lr_lambda, train


def _config(model_dir, task, **kw):
    base = dict(model=str(model_dir), task=str(task), n_eval=8, max_length=16, batch_size=4, epochs=2, lr=1e-3,
                checkpoint_every=2, seed=3)
    return TrainConfig(**{**base, **kw})


def test_training_writes_model_and_card(tiny_model_dir, tiny_task, tmp_path):
    card = train(_config(tiny_model_dir, tiny_task), tmp_path / "out", progress=False)
    out = tmp_path / "out"
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    assert not (out / "checkpoint").exists()
    saved = json.loads((out / "card.json").read_text())
    assert saved["config"]["seed"] == 3 and saved["data"]["train_examples"] == 40
    assert saved["environment"]["libraries"]["torch"].startswith("2.13")
    assert [h["epoch"] for h in saved["history"]] == [1.0, 2.0]
    assert card["steps"] == 20 and saved["train_seconds"] > 0


def test_training_learns_the_tiny_task(tiny_model_dir, tiny_task, tmp_path):
    card = train(_config(tiny_model_dir, tiny_task, epochs=8, lr=5e-3, warmup_ratio=0.0), tmp_path / "out", progress=False)
    assert card["metrics"]["best_validation_accuracy"] >= 0.75


def test_same_seed_same_weights_and_resume_matches(tiny_model_dir, tiny_task, tmp_path):
    config = _config(tiny_model_dir, tiny_task)
    train(config, tmp_path / "a", progress=False)
    # Simulate a kill after 7 of 20 steps, then start the same command again.
    assert train(config, tmp_path / "b", progress=False, stop_after_steps=7) == {"interrupted_at": 7}
    assert (tmp_path / "b" / "checkpoint" / "state.json").exists()
    train(config, tmp_path / "b", progress=False)
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key


def test_different_settings_refuse_to_overwrite(tiny_model_dir, tiny_task, tmp_path):
    train(_config(tiny_model_dir, tiny_task, epochs=1), tmp_path / "out", progress=False)
    with pytest.raises(TightropeError, match="other settings"):
        train(_config(tiny_model_dir, tiny_task, epochs=1, lr=2e-3), tmp_path / "out", progress=False)


def test_config_is_validated():
    with pytest.raises(ValidationError):
        TrainConfig(batch_size=0)
    with pytest.raises(ValidationError):
        TrainConfig(unknown_option=1)


def test_schedule_and_order_are_pure():
    f = lr_lambda("linear", warmup=10, total=110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(110) == 0.0
    assert lr_lambda("cosine", 0, 100)(50) == pytest.approx(0.5)
    assert epoch_order(10, 1, 0) == epoch_order(10, 1, 0) != epoch_order(10, 1, 1)
    assert sorted(epoch_order(10, 1, 0)) == list(range(10))


def test_a_task_too_small_to_carve_a_validation_set_is_one_sentence(tmp_path):
    import json

    from tightrope.errors import TightropeError
    from tightrope.train import TrainConfig, split_train_eval

    task = tmp_path / "four.jsonl"
    task.write_text("\n".join(json.dumps({"text": t, "label": y}) for t, y in [("good", 1), ("bad", 0), ("fine", 1), ("dull", 0)]))
    with pytest.raises(TightropeError, match="too few to carve a validation set"):
        split_train_eval(TrainConfig(model="minilm", task=str(task), n_eval=2))


@pytest.mark.parametrize("defended", [False, True], ids=["train", "train --defense"])
def test_a_structurally_pruned_model_trains_and_keeps_its_structure(tokenizer, tiny_task, tmp_path, defended):
    """A pruned directory's config.json names the unpruned sizes: the run rebuilds it from its plan, and the
    trained model is saved with that plan, so it reloads (the defended-compressed path: prune, then defend)."""
    from conftest import make_tiny_classifier

    from tightrope import inference
    from tightrope.compress.api import compress_, count_parameters
    from tightrope.compress.formats import save_pruned
    from tightrope.compress.prune import StructuredPruning
    from tightrope.defenses.config import defense_config
    from tightrope.defenses.run import harden, prepare

    model = make_tiny_classifier(tokenizer)
    compress_(model, StructuredPruning(heads=0.5, ffn=0.5))
    pruned = save_pruned(model, tokenizer, tmp_path / "pruned", card={"tokenization": {"max_length": 16}})
    config = _config(pruned, tiny_task, epochs=1)
    if defended:
        defense = defense_config("none", {"flood_level": 0.1})
        loaded, objective = prepare(config, defense)
        out = harden(loaded, objective, config, defense, tmp_path / "out", progress=False).model_dir
    else:  # the library refuses it in one sentence; `tightrope train` loads it from its plan
        with pytest.raises(TightropeError, match="structurally pruned"):
            train(config, tmp_path / "refused", progress=False)
        from typer.testing import CliRunner

        from tightrope.cli import app

        out = tmp_path / "out"
        result = CliRunner().invoke(app, ["train", "--model", str(pruned), "--task", str(tiny_task), "--n-eval", "8",
                                          "--max-length", "16", "--batch-size", "4", "--lr", "1e-3", "--out", str(out)])
        assert result.exit_code == 0, result.output
    clf = inference.load(str(out))
    assert clf.card["format"] == "pruned-structured" and clf.card["structure"]
    assert count_parameters(clf.model)[0] == count_parameters(model)[0]  # (stored, non-zero): the same shapes
    assert clf.logits(["a fine film"]).shape == (1, 2)
