"""Study features for a model the user already fine-tuned: use it as the baseline, harden it inside a
compression pipeline, and attack every variant in embedding space (PGD through a differentiable twin)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tightrope.errors import TightropeError
from tightrope.models import save_model
from tightrope.study.plan import plan_study, run_study
from tightrope.study.spec import parse_spec


@pytest.fixture
def tiny_model_dir(tmp_path, tokenizer):
    """A tiny classifier that predicts the tiny task's labels (the teacher's label set must match)."""
    from conftest import make_tiny_classifier

    model = make_tiny_classifier(tokenizer)
    model.config.id2label = {0: "negative", 1: "positive"}
    model.config.label2id = {"negative": 0, "positive": 1}
    return save_model((model, tokenizer), tmp_path / "tiny")


def _spec(model_dir, task, **extra) -> dict:
    spec = {
        "name": "finetuned",
        "model": {"source": str(model_dir), "fine_tuned": True},
        "data": {"task": str(task), "n_eval": 8, "n_test": 16, "max_length": 32},
        "train": {"epochs": 1, "batch_size": 8, "lr": 1e-3},
        "defenses": [{
            "name": "hardened", "method": "fast", "params": {"epsilon": 0.01, "distill": {"a": 0.5, "temperature": 2.0}},
            "train": {"n_train": 16, "epochs": 1, "batch_size": 8, "lr": 1e-3},
            "pipeline": {"order": "prune,quantize,train",
                         "prune": {"method": "MagnitudePruning", "params": {"sparsity": 0.3}},
                         "quantize": {"method": "Int8Dynamic", "params": {"backend": "torch"}}},
        }],
        "compress": [{"name": "int8", "steps": [{"method": "Int8Dynamic", "params": {"backend": "torch"}}]}],
        "attacks": [{"recipe": "pgd", "n": 8, "params": {"epsilons": [0.01, 0.05], "steps": 2, "batch_size": 4}}],
        "evaluate": {"speed": False, "memory": False},
        "report": {"after": "hardened", "html": False},
    }
    spec.update(extra)
    return spec


def test_a_fine_tuned_model_is_the_baseline_without_training(tiny_model_dir, tiny_task):
    steps, producer = plan_study(parse_spec(_spec(tiny_model_dir, tiny_task)))
    assert producer["baseline"] == "use/baseline"
    assert not any(s.kind == "train" for s in steps)
    assert [s.kind for s in steps if s.name.startswith("attack/")] == ["attack-embedding"] * 3


def test_a_model_retrained_in_place_gets_a_new_key(tiny_model_dir, tiny_task):
    before = plan_study(parse_spec(_spec(tiny_model_dir, tiny_task)))[0][0].inputs["fingerprint"]
    (tiny_model_dir / "extra.txt").write_text("changed")
    after = plan_study(parse_spec(_spec(tiny_model_dir, tiny_task)))[0][0].inputs["fingerprint"]
    assert before != after


def test_a_bad_pipeline_fails_before_any_work(tiny_model_dir, tiny_task, tmp_path):
    spec = _spec(tiny_model_dir, tiny_task)
    spec["defenses"][0]["pipeline"]["order"] = "quantize,prune"
    with pytest.raises(TightropeError, match="prune before quantize"):
        run_study(parse_spec(spec), tmp_path / "run", progress=False, report=False)
    assert not (tmp_path / "run" / "steps").exists()


@pytest.mark.slow
def test_harden_in_pipeline_and_attack_with_pgd_through_the_twin(tiny_model_dir, tiny_task, tmp_path):
    run = run_study(parse_spec(_spec(tiny_model_dir, tiny_task)), tmp_path / "run", progress=False)
    defended = run.result("defend/hardened")
    # The shipped model is quantized; its twin holds the hardened fp32 weights, 30% pruned, sparsity held.
    card = json.loads((tmp_path / "run" / defended["model_dir"] / "card.json").read_text())
    assert card["format"] == "tightrope-quant"
    twin = load_file(str(tmp_path / "run" / defended["twin"]["model_dir"] / "model.safetensors"))
    encoder = [t for n, t in twin.items() if "encoder" in n and n.endswith("weight") and t.dim() == 2]
    zeros = sum(int((t == 0).sum()) for t in encoder) / sum(t.numel() for t in encoder)
    assert 0.29 <= zeros <= 0.31
    assert defended["pipeline"]["order"] == ["prune", "quantize", "train"]
    assert defended["pipeline"]["steps"][2]["sparsity_held"] and defended["pipeline"]["steps"][2]["quantization_aware"]
    # PGD: the fp32 baseline is attacked directly, the quantized variants through their twins.
    base = run.result("attack/pgd/baseline")
    assert base["gradient_source"] == "victim"
    for name in ("int8", "hardened"):
        result = run.result(f"attack/pgd/{name}")
        assert result["gradient_source"].startswith("differentiable twin")
        assert [p["epsilon"] for p in result["points"]] == [0.01, 0.05]
        assert result["accuracy_under_attack"] <= result["original_accuracy"]
    # The baseline's weights were used as they are: no training step, same tensors.
    assert run.result("use/baseline")["model_dir"] == str(tiny_model_dir.resolve())
    assert torch.equal(load_file(str(tiny_model_dir / "model.safetensors"))["classifier.weight"],
                       load_file(str(tiny_model_dir / "model.safetensors"))["classifier.weight"])
    # The report shows every model under the attack, and the accuracy curve over epsilon.
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## Robustness: every model under every attack" in report
    assert "pgd ASR (eps=0.01)" in report and "| eps=0.01 | eps=0.05 |" in report
    assert "differentiable twin" in report
