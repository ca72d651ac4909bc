"""Shared fixtures: tiny models built in code (seconds), and the packaged MiniLM tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

POSITIVE = ["a wonderful, moving film", "great acting and a superb script", "i loved every minute of it",
            "brilliant and funny", "a joy to watch", "excellent direction, warm and touching"]
NEGATIVE = ["a dull, boring mess", "terrible acting and an awful script", "i hated every minute of it",
            "stupid and tedious", "a waste of time", "poor direction, cold and lifeless"]


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    from tightrope import assets

    return AutoTokenizer.from_pretrained(str(assets.minilm_dir()))


def make_tiny_classifier(tokenizer, num_labels: int = 2, seed: int = 0, layers: int = 2, hidden: int = 32,
                         intermediate: int = 64):
    """A BERT classifier small enough for unit tests (4 heads, 128 positions), seeded."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=4, intermediate_size=intermediate, max_position_embeddings=128,
                        num_labels=num_labels)
    model = BertForSequenceClassification(config)
    model.eval()
    return model


def null_without(root: Path, *transforms: str) -> Path:
    """The shipped audit null with ``transforms`` taken out, written under ``root``: the path for a test of how the
    audit judges a transform its null has no values for (fixed thresholds, never clean)."""
    import json
    from importlib import resources

    data = json.loads(resources.files("tightrope.qattack").joinpath("null", "minilm-classifiers.json").read_text())
    for name in transforms:
        data["statistics"].pop(name, None)
        data["layer_models"].pop(name, None)
    path = root / "null-without.json"
    path.write_text(json.dumps(data))
    return path


def save_audit_pair(root: Path, tokenizer, clean, attacked, rows: int = 60) -> tuple[Path, Path, Path]:
    """A clean and an attacked tiny classifier saved under ``root`` (max length 16) and a toy probe task of
    ``rows`` reviews (JSON Lines, labels alternating): ``(clean dir, attacked dir, probe file)``."""
    import json

    from tightrope.models import save_model

    card = {"card.json": {"tokenization": {"max_length": 16, "truncation": "head"}}}
    lines = [{"text": f"review {i} was {'great' if i % 2 else 'awful'}", "label": i % 2} for i in range(rows)]
    (root / "probe.jsonl").write_text("\n".join(json.dumps(r) for r in lines))
    return (save_model((clean, tokenizer), root / "clean", extra=card),
            save_model((attacked, tokenizer), root / "attacked", extra=card), root / "probe.jsonl")


@pytest.fixture
def tiny_model_dir(tmp_path, tokenizer) -> Path:
    """A saved tiny BERT classifier (2 layers, hidden 32) with the MiniLM tokenizer."""
    from tightrope.models import save_model

    model = make_tiny_classifier(tokenizer)
    return save_model((model, tokenizer), tmp_path / "tiny")


def tiny_preset_llama():
    """A 2-block Llama whose ``down_proj`` rows (256 inputs) are whole k-quant super-blocks under a llama-quantize
    preset, while its other layers (64 inputs) fall back to legacy GGUF types."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def tiny_gemma3(vocab: int, seed: int = 0):
    """Gemma 3's text model in miniature: tied embeddings, (1 + w) RMS norms, q/k norms, sliding and full attention."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
                           sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                           tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    return Gemma3ForCausalLM(cfg).eval()


@pytest.fixture
def tiny_task(tmp_path) -> Path:
    """A small sentiment CSV with string labels."""
    import pandas as pd

    rows = [(t, "positive") for t in POSITIVE] * 4 + [(t, "negative") for t in NEGATIVE] * 4
    path = tmp_path / "tiny.csv"
    pd.DataFrame(rows, columns=["text", "label"]).to_csv(path, index=False)
    return path


def shared_data_dir() -> str | None:
    env = os.environ.get("TIGHTROPE_DATA_DIR")
    if env and Path(env).is_dir():
        return env
    here = Path(__file__).resolve().parents[2] / "shared" / "data"
    return str(here) if here.is_dir() else None


@pytest.fixture
def data_dir() -> str:
    path = shared_data_dir()
    if path is None:
        pytest.skip("the shared data folder is not here (set TIGHTROPE_DATA_DIR)")
    return path


def grouped_embedding(groups: list[list[str]], lonely: list[str]):
    """Hand-made unit word vectors: the words of one group nearly parallel (synonyms), each lonely word
    orthogonal to everything else; seeded, so every test sees the same neighbours."""
    import numpy as np

    from tightrope.attacks.counterfit import WordEmbedding

    rng = np.random.default_rng(0)
    dim = len(groups) + len(lonely) + 4
    words, vectors = [], []
    for g, group in enumerate(groups):
        for w in group:
            v = np.zeros(dim)
            v[g] = 1.0
            v[-4:] = rng.normal(0, 0.1, 4)
            words.append(w)
            vectors.append(v / np.linalg.norm(v))
    for j, w in enumerate(lonely):
        v = np.zeros(dim)
        v[len(groups) + j] = 1.0
        words.append(w)
        vectors.append(v)
    return WordEmbedding(words, np.array(vectors, dtype=np.float32), {"source": "hand-made test vectors"})
