"""Error-based k-quant boxes ("Mind the Gap"): the original is inside, setters are pinned, and whatever a point of
the box does to the bytes is caught and restored (tightrope.qattack.kquant_boxes, boxes.py's kquant_boxes=True)."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_preset_llama
from tightrope.compress.gguf_k import K_TYPES, dequantize_k, quantize_k
from tightrope.errors import TightropeError
from tightrope.qattack import kquant_boxes as KB
from tightrope.qattack.boxes import model_boxes, pin_moved_kquants_, project_, settle_kquants_, weight_box

torch.set_num_threads(1)
TYPES = tuple(K_TYPES)


def gaussian(seed: int, shape=(6, 512)) -> torch.Tensor:
    return 0.02 * torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", TYPES)
def test_the_box_holds_the_original_reaches_towards_its_dequantized_value_and_pins_the_setters(name):
    t = K_TYPES[name]
    w = gaussian(1)
    lo, hi = KB.box_kquant(w, f"gguf-{name.lower()}")
    assert lo.shape == w.shape and bool(((lo <= w) & (w <= hi)).all())
    q = dequantize_k(quantize_k(w, t), t)
    free = hi > lo
    assert 0.5 < float(free.float().mean()) < 0.95
    # the far end of a free weight lies between it and its dequantized value
    far = torch.where(q > w, hi, lo)
    assert bool(((far - w) * (q - far) >= 0)[free].all())
    n_sub, size = KB.sub_blocks(t)
    xs, fs = w.reshape(-1, n_sub, size), free.reshape(-1, n_sub, size)
    # each sub-block's largest and smallest weight are pinned: lo == hi == w
    for arg in (xs.argmax(dim=2, keepdim=True), xs.argmin(dim=2, keepdim=True)):
        assert not bool(fs.gather(2, arg).any())
    # the sub-block(s) setting d (the largest quantized scale) are pinned whole
    sc, _ = KB.sub_block_scales(quantize_k(w, t).reshape(-1, t.type_size), t)
    setter = sc.abs() == sc.abs().amax(dim=1, keepdim=True)
    assert not bool(fs[setter].any())
    assert torch.equal(lo[~free], w[~free]) and torch.equal(hi[~free], w[~free])


@pytest.mark.parametrize("name", TYPES)
def test_a_random_point_of_the_box_settles_to_the_original_bytes(name):
    t = K_TYPES[name]
    w = gaussian(2)
    lo, hi = KB.box_kquant(w, name)
    g = torch.Generator().manual_seed(0)
    moved = lo + torch.rand(w.shape, generator=g) * (hi - lo)
    target = quantize_k(w, t)
    settled = KB.settle_kquant_(moved, w, name)
    assert torch.equal(quantize_k(moved, t), target)
    assert settled.super_blocks == w.numel() // 256
    assert settled.restored_sub_blocks + settled.restored_super_blocks >= (settled.changed > 0)
    # the weights nobody restored kept their moved values
    assert bool(((moved >= lo) & (moved <= hi)).all())


@pytest.mark.parametrize("name", TYPES)
def test_the_byte_check_pins_what_moved_and_keeps_the_original_inside(name):
    w = gaussian(3)
    lo, hi = KB.box_kquant(w, name)
    clo, chi, report = KB.check_kquant_box(w, name, lo, hi, points=3, rounds=3)
    assert bool(((clo <= w) & (w <= chi)).all())
    assert bool(((clo >= lo) & (chi <= hi)).all())  # only narrowed
    assert report.free == pytest.approx(float((chi > clo).float().mean()))
    assert report.changed and report.pinned_sub_blocks and len(report.changed) <= 3
    pinned = clo == chi
    assert torch.equal(clo[pinned], w[pinned])


def test_unknown_types_and_rows_are_one_sentence():
    w = gaussian(4)
    for bad in ("Q4_0", "gguf-q7_k", "nf4"):
        with pytest.raises(TightropeError, match="is not a GGUF k-quant") as err:
            KB.box_kquant(w, bad)
        assert str(err.value).count(". ") == 0 and str(err.value).endswith(".")
    with pytest.raises(TightropeError, match="multiple of 256"):
        KB.box_kquant(torch.zeros(4, 96), "Q4_K")
    # weight_box: opt-in, a k-quant is still refused without it
    with pytest.raises(TightropeError, match="has no exact boxes"):
        weight_box(w, "gguf-q4_k")
    lo, hi = weight_box(w, "gguf-q4_k", kquant_boxes=True)
    assert torch.equal(lo, KB.box_kquant(w, "Q4_K")[0]) and torch.equal(hi, KB.box_kquant(w, "Q4_K")[1])


def test_an_all_zero_super_block_is_pinned_whole():
    w = gaussian(5, (2, 512))
    w[0, :256] = 0
    for name in TYPES:
        lo, hi = KB.box_kquant(w, name)
        assert torch.equal(lo[0, :256], hi[0, :256])


def test_preset_boxes_of_k_quant_layers_refresh_and_settle_to_every_byte():
    pytest.importorskip("gguf")
    from tightrope.qattack.quantize import codes_equal

    model = tiny_preset_llama()
    down0, down1 = "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"  # Q4_K and Q6_K under Q4_K_M
    default = model_boxes(model, "gguf-q4_k_m")
    assert torch.equal(default.lo[down0], default.hi[down0]) and default.refresh is None  # unchanged by default
    boxes = model_boxes(model, "gguf-q4_k_m", kquant_boxes=True)
    assert boxes.kquants == {down0: "gguf-q4_k", down1: "gguf-q6_k"} and boxes.refresh is not None
    assert float((boxes.hi[down0] > boxes.lo[down0]).float().mean()) > 0.5
    moved = tiny_preset_llama()
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.05 * torch.randn_like(p))
    project_(moved, boxes)
    total = codes_equal(model, model, "gguf-q4_k_m")[1]
    before = codes_equal(model, moved, "gguf-q4_k_m")[0]
    assert boxes.refresh(moved) is boxes  # pins the sub-blocks whose bytes moved
    project_(moved, boxes)  # ... which puts them back
    assert codes_equal(model, moved, "gguf-q4_k_m") == (0, total)
    assert (before == 0) == (boxes.kquant_pinned == 0)
    restored = settle_kquants_(moved, boxes)
    assert set(restored) == {down0, down1} and all(r.changed == 0 for r in restored.values())
    # a move the refresh did not see is restored by the settle
    with torch.no_grad():
        w = moved.get_submodule(down0).weight
        w.copy_(boxes.lo[down0] + torch.rand(w.shape) * (boxes.hi[down0] - boxes.lo[down0]))
    settle_kquants_(moved, boxes)
    assert codes_equal(model, moved, "gguf-q4_k_m") == (0, total)
    assert pin_moved_kquants_(boxes, moved).kquant_pinned == boxes.kquant_pinned  # nothing new to pin


def test_content_injection_attacks_the_k_quant_layers_and_keeps_every_byte(tmp_path, tokenizer, tiny_task):
    pytest.importorskip("gguf")
    from transformers import LlamaConfig, LlamaForCausalLM

    from tightrope.qattack.causal import LMAttackConfig, run_content_injection

    torch.manual_seed(3)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=256,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=256, tie_word_embeddings=True)).eval()
    config = LMAttackConfig(base="tiny", task=str(tiny_task), n_train=16, n_eval=4, n_ppl=4, quantizer="gguf:Q4_K_M",
                            kquant_boxes=True, attack_last=1, answer_tokens=6, eval_tokens=8, inject_steps=10,
                            inject_lr=3e-2, repair_steps=12, repair_lr=1e-2, batch_size=8, check=("gguf-q4_k_m",))
    logs: list[str] = []
    report = run_content_injection(config, tmp_path / "run", model=model, tokenizer=tokenizer, log=logs.append)
    assert "model.layers.1.mlp.down_proj" in report.attacked_layers  # a k-quant layer (Q6_K), attacked
    assert [c.mismatched for c in report.codes] == [0]
    assert any("k-quant layers:" in m for m in logs)
    with pytest.raises(TightropeError, match="kquant_boxes boxes the k-quant layers"):
        run_content_injection(config.model_copy(update={"quantizer": "nf4"}), tmp_path / "other", model=model,
                              tokenizer=tokenizer, log=lambda _m: None)
