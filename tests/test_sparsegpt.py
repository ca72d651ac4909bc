"""SparseGPT (Frantar and Alistarh 2023): the OBS algorithm on small tensors, and the pruner on a tiny model."""

from __future__ import annotations

import pytest
import torch
from conftest import NEGATIVE, POSITIVE, make_tiny_classifier
from torch import nn

from tightrope.compress.api import compress_
from tightrope.compress.blockwise import layer_groups
from tightrope.compress.prune import MagnitudePruning, SparseGPT
from tightrope.compress.sparsegpt import sparsegpt_prune
from tightrope.compress.specs import prune_config
from tightrope.compress.wanda import input_hessians, set_tokenizer
from tightrope.errors import TightropeError

TEXTS = POSITIVE + NEGATIVE


def correlated(cols: int = 64, n: int = 400, seed: int = 0) -> torch.Tensor:
    """Calibration inputs with strongly correlated features (where SparseGPT's updates matter), (cols, n)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(cols, 6, generator=g) @ torch.randn(6, n, generator=g) + 0.3 * torch.randn(cols, n, generator=g)).double()


def quadratic(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    D = (W - W_hat).double()
    return float(torch.einsum("ij,jk,ik->", D, H, D) / 2)


def test_uncorrelated_inputs_reduce_it_to_magnitude_pruning_per_block():
    torch.manual_seed(0)
    W = torch.randn(8, 32, dtype=torch.float64)
    pruned, _ = sparsegpt_prune(W, torch.eye(32, dtype=torch.float64), 0.5, blocksize=16)
    for start in (0, 16):  # in each block the smallest half by magnitude goes, the rest is untouched
        block, out = W[:, start:start + 16], pruned[:, start:start + 16]
        removed = out == 0
        assert int(removed.sum()) == 64
        assert block[removed].abs().max() <= block[~removed].abs().min()
        assert torch.equal(out[~removed], block[~removed])


def test_its_loss_is_the_exact_reconstruction_error_and_beats_magnitude():
    X = correlated()
    H = 2 * X @ X.T / X.shape[1]
    W = torch.randn(16, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    pruned, loss = sparsegpt_prune(W, H, 0.5, blocksize=32)
    damped = H + 0.01 * torch.diag(H).mean() * torch.eye(64, dtype=H.dtype)
    assert float(loss.sum()) == pytest.approx(quadratic(W, pruned, damped), rel=1e-9)  # OBS is exact on a quadratic
    assert int((pruned == 0).sum()) == 16 * 64 // 2
    threshold = W.abs().flatten().kthvalue(W.numel() // 2).values
    magnitude = torch.where(W.abs() > threshold, W, torch.zeros_like(W))
    assert quadratic(W, pruned, H) < 0.5 * quadratic(W, magnitude, H)


def test_n_m_keeps_n_of_every_m_inputs():
    X = correlated()
    H = 2 * X @ X.T / X.shape[1]
    W = torch.randn(16, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    pruned, _ = sparsegpt_prune(W, H, n=2, m=4, blocksize=30)  # a block of 30 is trimmed to a multiple of 4
    assert torch.equal((pruned.reshape(16, 16, 4) == 0).sum(-1), torch.full((16, 16), 2))
    with pytest.raises(ValueError):
        sparsegpt_prune(W, H, n=2, m=5)


def test_dead_inputs_are_removed_and_the_dtype_kept():
    X = correlated(cols=16)
    X[3] = 0  # an input feature that is never active
    H = 2 * X @ X.T / X.shape[1]
    W = torch.randn(4, 16)
    pruned, _ = sparsegpt_prune(W, H, 0.25)
    assert pruned.dtype == torch.float32
    assert torch.all(pruned[:, 3] == 0)


def test_the_pruner_hits_the_share_and_stays_closer_to_the_dense_model(tokenizer):
    dense = make_tiny_classifier(tokenizer)
    inputs = tokenizer(list(TEXTS), padding=True, return_tensors="pt")
    with torch.no_grad():
        reference = dense(**inputs).logits
    errors, notes = {}, {}
    for name, config in {"sparsegpt": SparseGPT(sparsity=0.5, calibration_texts=TEXTS, blocksize=16),
                         "magnitude": MagnitudePruning(sparsity=0.5, scope="layer")}.items():
        model = set_tokenizer(make_tiny_classifier(tokenizer), tokenizer)
        summary = compress_(model, config)
        notes[name] = summary.notes
        for module in summary.modules:
            w = model.get_submodule(module).weight
            assert int((w == 0).sum()) == w.numel() // 2, module
        with torch.no_grad():
            errors[name] = float((model(**inputs).logits - reference).pow(2).mean())
    assert errors["sparsegpt"] < errors["magnitude"]
    assert any(note.startswith("SparseGPT 0.5 per block of 16") for note in notes["sparsegpt"])


def test_sequential_calibration_sees_the_pruned_layers_before(tokenizer):
    model = set_tokenizer(make_tiny_classifier(tokenizer), tokenizer)
    one_pass = set_tokenizer(make_tiny_classifier(tokenizer), tokenizer)
    summary = compress_(model, SparseGPT(sparsity=0.5, calibration_texts=TEXTS))
    compress_(one_pass, SparseGPT(sparsity=0.5, calibration_texts=TEXTS, sequential=False))
    groups = layer_groups({name: None for name in summary.modules})
    assert list(groups) == ["bert.encoder.layer.0", "bert.encoder.layer.1"]
    first = [n for n in summary.modules if ".layer.0." in n]
    later = [n for n in summary.modules if ".layer.1." in n]
    # layer 0 is calibrated on the same (dense) inputs either way; layer 1 on different ones
    assert all(torch.equal(model.get_submodule(n).weight, one_pass.get_submodule(n).weight) for n in first)
    assert not all(torch.equal(model.get_submodule(n).weight, one_pass.get_submodule(n).weight) for n in later)
    assert any("layer by layer" in note for note in summary.notes)


def tiny_llama(tokenizer, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("make", [make_tiny_classifier, tiny_llama], ids=["bert", "llama"])
def test_cached_block_inputs_give_what_a_whole_pass_per_block_gives(tokenizer, make, monkeypatch):
    """The blockwise path (each block run on its cached inputs) against the plain one (the whole model run again
    before each block): the same Hessians, so the same pruned weights."""
    from tightrope.compress import blockwise

    fast = set_tokenizer(make(tokenizer), tokenizer)
    slow = set_tokenizer(make(tokenizer), tokenizer)
    compress_(fast, SparseGPT(sparsity=0.5, calibration_texts=TEXTS))
    monkeypatch.setattr(blockwise, "block_of", lambda model, name: None)
    summary = compress_(slow, SparseGPT(sparsity=0.5, calibration_texts=TEXTS))
    assert len(layer_groups({n: None for n in summary.modules})) >= 2
    for name in summary.modules:
        a, b = fast.get_submodule(name).weight, slow.get_submodule(name).weight
        assert torch.equal(a == 0, b == 0), name
        assert torch.allclose(a, b, atol=1e-5), name


def test_input_hessians_count_real_tokens_only(tokenizer):
    model = make_tiny_classifier(tokenizer)
    layer = {"q": model.bert.encoder.layer[0].attention.self.query}
    enc = tokenizer(list(TEXTS[:3]), padding=True, return_tensors="pt")
    acc = input_hessians(model, layer, [{"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}])
    assert acc["q"].n == int(enc["attention_mask"].sum())
    assert torch.allclose(acc["q"].H, acc["q"].H.T)


def test_the_spec_and_bad_settings(tokenizer):
    config = prune_config("sparsegpt:sparsity=0.6,blocksize=64", calibration="mr")
    assert isinstance(config, SparseGPT) and config.sparsity == 0.6 and config.calibration_texts == "mr"
    assert prune_config("sparsegpt:n=2,m=4").m == 4
    for bad in (dict(sparsity=1.2), dict(n=4, m=4), dict(n=2, m=0), dict(blocksize=0), dict(percdamp=0.0)):
        with pytest.raises(TightropeError):
            SparseGPT(**bad)
    odd = nn.Sequential(nn.Linear(6, 4))
    with pytest.raises(TightropeError, match="divisible by 4"):
        compress_(odd, SparseGPT(n=2, m=4, include=("0",), calibration_texts=TEXTS))


def test_a_study_names_it_like_any_compression():
    from tightrope.study.steps import compression_config

    config = compression_config("SparseGPT", {"sparsity": 0.4}, defaults={"calibration_texts": "mr"})
    assert isinstance(config, SparseGPT) and config.sparsity == 0.4 and config.calibration_texts == "mr"


def test_the_command_line_prunes_with_it_and_the_model_reloads(tiny_model_dir, tiny_task, tmp_path):
    from typer.testing import CliRunner

    from tightrope import inference
    from tightrope.cli import app

    out = tmp_path / "sparse"
    result = CliRunner().invoke(app, ["compress", str(tiny_model_dir), "--out", str(out), "--prune",
                                      "sparsegpt:sparsity=0.5,n_calibration=6", "--calibration", str(tiny_task)])
    assert result.exit_code == 0, result.output
    clf = inference.load(str(out))
    (step,) = clf.card["compression"]
    assert step["method"] == "SparseGPT" and step["config"]["calibration_texts"] == str(tiny_task)
    dense = clf.model.bert.encoder.layer[1].output.dense.weight
    assert int((dense == 0).sum()) == dense.numel() // 2
    missing = CliRunner().invoke(app, ["compress", str(tiny_model_dir), "--out", str(tmp_path / "x"), "--prune", "sparsegpt"])
    assert missing.exit_code == 2 and "calibration" in missing.output.lower()


def test_a_block_the_forward_pass_never_reaches_is_one_sentence():
    from tightrope.compress import blockwise

    class Skips(nn.Module):  # its second block is never called
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 8)
            self.layers = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])

        def forward(self, input_ids, attention_mask):
            return self.layers[0](self.embed(input_ids))

    model = Skips()
    batch = {"input_ids": torch.tensor([[1, 2, 3]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    assert len(blockwise.first_inputs(model, model.layers[0], [batch])) == 1
    with pytest.raises(TightropeError, match="never reached its first block") as err:
        blockwise.first_inputs(model, model.layers[1], [batch])
    assert str(err.value).count(". ") == 0
