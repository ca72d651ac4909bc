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


# --- the noise defense's width: each sub-block's quantization step ----------------------------------------------

#: the bytes of the codes' low bits (flipping bit 0 of one moves exactly one value by one code)
CODE_BYTES = {"Q2_K": slice(16, 80), "Q3_K": slice(32, 96), "Q4_K": slice(16, 144), "Q5_K": slice(48, 176),
              "Q6_K": slice(0, 128)}


@pytest.mark.parametrize("name", TYPES)
def test_the_k_quant_step_is_what_dequantization_takes_between_neighbouring_codes(name):
    """kquant_step decodes d and the sub-block scales; flipping the low bit of one code in the bytes and dequantizing
    (llama.cpp's formula, tightrope.compress.gguf_k.dequantize_k) moves that one value by exactly that step."""
    t = K_TYPES[name]
    w = gaussian(6)
    raw = quantize_k(w, t).reshape(-1, t.type_size)
    q = dequantize_k(raw, t).reshape(-1, 256)
    step = KB.kquant_step(w, name)
    assert step.shape == w.shape
    step = step.reshape(-1, 256)
    seen = 0
    for b in range(CODE_BYTES[name].start, CODE_BYTES[name].stop, 7):
        flipped = raw.clone()
        flipped[:, b] ^= 1
        moved = dequantize_k(flipped, t).reshape(-1, 256) - q
        changed = moved != 0
        assert bool((changed.sum(dim=1) == 1).all())  # one value per super-block
        torch.testing.assert_close(moved[changed].abs(), step[changed], rtol=1e-6, atol=0)
        seen += int(changed.sum())
    assert seen >= 4 * raw.shape[0]
    # one step per sub-block, and they differ between sub-blocks
    n_sub, size = KB.sub_blocks(t)
    per = step.reshape(-1, n_sub, size)
    assert torch.equal(per, per[:, :, :1].expand_as(per)) and per[:, :, 0].unique().numel() > n_sub
    assert float(step.min()) >= 0


@pytest.mark.parametrize("name", TYPES)
def test_the_noise_width_is_the_step_where_free_and_zero_where_mind_the_gap_pins(name):
    w = gaussian(7)
    width, step = KB.kquant_noise_width(w, name), KB.kquant_step(w, name)
    lo, hi = KB.box_kquant(w, name)
    pinned = lo == hi
    assert torch.equal(width[pinned], torch.zeros(int(pinned.sum())))
    assert torch.equal(width[~pinned], step[~pinned])
    zero = gaussian(5, (2, 512))
    zero[0, :256] = 0
    assert torch.equal(KB.kquant_noise_width(zero, name)[0, :256], torch.zeros(256))  # an all-zero super-block
    with pytest.raises(TightropeError, match="multiple of 256"):
        KB.kquant_noise_width(torch.zeros(4, 96), name)


def _parked(model, names: list[str], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Move one free weight per super-block of the k-quant layers ``names`` of ``model`` (in place) to 2% of a step
    inside the wall of its code that faces its full-precision value, as a repair parks weights; keep it only where
    the super-block's bytes stay the same (moving more weights, or one in half the Q4_K super-blocks, tips the scale
    search). Returns ``(parked weights (bool), the side each faces (+-1))`` per layer."""
    from tightrope.compress import gguf as G
    from tightrope.qattack.boxes import preset_schemes

    schemes = preset_schemes(model, "gguf-q4_k_m")
    chosen = {}
    with torch.no_grad():
        for name in names:
            t = G.K_SCHEMES[schemes[name]]
            w = model.get_submodule(name).weight
            raw = quantize_k(w, t)
            q = dequantize_k(raw, t).reshape(w.shape)
            width = KB.kquant_noise_width(w, t.name)
            side = torch.where(w >= q, 1.0, -1.0)
            score = torch.rand(w.shape, generator=generator).masked_fill((width == 0) | (w == 0), 2.0).reshape(-1, 256)
            pick = torch.zeros_like(score, dtype=torch.bool).scatter_(1, score.argmin(dim=1, keepdim=True), True)
            pick = pick.reshape(w.shape) & (width > 0)
            moved = torch.where(pick, q + side * 0.48 * width, w)
            same = (quantize_k(moved, t) == raw).reshape(-1, t.type_size).all(dim=1)  # (B,)
            keep = same.reshape(-1, 1).expand(-1, 256).reshape(w.shape)
            w.copy_(torch.where(keep, moved, w))
            chosen[name] = (pick & keep, side)
    return chosen


def test_box_noise_moves_k_quant_codes_a_repair_parked_at_a_wall_and_leaves_legacy_noise_as_it_was():
    """With k-quant steps (the default), noise of 0.1 of a step moves parked k-quant weights across their code's
    wall at about the Gaussian rate; without them the k-quant layers stay as they are. Legacy-type layers get the same
    noise either way."""
    pytest.importorskip("gguf")
    from tightrope.compress import gguf as G
    from tightrope.qattack.boxes import NOISE_KQUANTS, box_noise, preset_schemes

    model = tiny_preset_llama()
    down0, down1 = "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"  # Q4_K and Q6_K under Q4_K_M
    parked = _parked(model, [down0, down1], torch.Generator().manual_seed(1))
    assert all(int(p.sum()) >= 10 for p, _ in parked.values())
    boxes = model_boxes(model, "gguf-q4_k_m")
    assert boxes.unboxed == {down0: "gguf-q4_k", down1: "gguf-q6_k"} and boxes.kquant_layers == boxes.unboxed
    assert NOISE_KQUANTS
    schemes = preset_schemes(model, "gguf-q4_k_m")
    crossed = total = 0
    for seed in range(3):
        new = box_noise(model, boxes, 0.1, torch.Generator().manual_seed(seed))
        old = box_noise(model, boxes, 0.1, torch.Generator().manual_seed(seed), kquants=False)
        for name in boxes.names:
            if name in boxes.unboxed:
                assert torch.equal(old[name], model.get_submodule(name).weight.detach())  # as before: untouched
            else:
                assert torch.equal(new[name], old[name])  # the same draws, the same legacy noise
        for name, (p, side) in parked.items():
            t = G.K_SCHEMES[schemes[name]]
            w = model.get_submodule(name).weight.detach()
            before = dequantize_k(quantize_k(w, t), t).reshape(w.shape)
            after = dequantize_k(quantize_k(new[name], t), t).reshape(w.shape)
            step = KB.kquant_step(w, t.name)
            across = (after - before - side * step).abs() <= 1e-3 * step  # into the neighbouring code it faced
            crossed += int(across[p].sum())
            total += int(p.sum())
            if seed == 0:  # without k-quant steps nothing moves
                assert torch.equal(dequantize_k(quantize_k(old[name], t), t).reshape(w.shape), before)
    # 2% of a step from the wall, sigma 10% of a step: P(cross) = Phi(-0.2) = 0.42 (a scale search that the noise
    # tips moves some values otherwise)
    assert total >= 60 and 0.2 < crossed / total < 0.65


@pytest.mark.parametrize("scale", [0.05, 0.2])
def test_k_quant_noise_has_sigma_scale_times_each_sub_blocks_step_and_leaves_pinned_weights_and_zeros(scale):
    pytest.importorskip("gguf")
    from tightrope.qattack.boxes import box_noise

    model = tiny_preset_llama()
    down = "model.layers.1.mlp.down_proj"  # Q6_K
    with torch.no_grad():
        model.get_submodule(down).weight[:, :128] *= 3  # the first 8 of 16 sub-blocks of each super-block: 3x the step
        model.get_submodule(down).weight[0, 3:9] = 0
    boxes = model_boxes(model, "gguf-q4_k_m")
    w = model.get_submodule(down).weight.detach()
    width, step = KB.kquant_noise_width(w, "Q6_K"), KB.kquant_step(w, "Q6_K")
    noisy = box_noise(model, boxes, scale, torch.Generator().manual_seed(0))[down]
    moved = noisy - w
    assert torch.equal(moved[0, 3:9], torch.zeros(6))  # exact zeros stay
    pinned = width == 0
    assert int(pinned.sum()) > 0 and torch.equal(moved[pinned], torch.zeros(int(pinned.sum())))
    free = ~pinned & (w != 0)
    assert bool((moved[free] != 0).all())
    ratio = moved[free] / step[free]
    small = step[free] <= step[free].median()  # sub-blocks of small and of large steps: each noised by its own
    for part in (ratio[small], ratio[~small]):
        assert 0.9 * scale < float(part.std()) < 1.1 * scale
    assert float(step[free][~small].mean()) > 2 * float(step[free][small].mean())
    # one sigma per layer would not do it: the noise of the large-step sub-blocks is larger
    assert float(moved[free][~small].std()) > 2 * float(moved[free][small].std())


def test_layers_attack_the_k_quant_layers_alone(tmp_path, tokenizer, tiny_task):
    """``layers`` globs restrict the attacked layers: '*.mlp.down_proj' under Q4_K_M with kquant_boxes is a plant in
    the k-quant layers only (the case the noise defense's k-quant steps are for); a glob nothing matches is refused."""
    pytest.importorskip("gguf")
    from transformers import LlamaConfig, LlamaForCausalLM

    from tightrope.qattack.causal import LMAttackConfig, run_content_injection

    torch.manual_seed(3)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=256,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=256, tie_word_embeddings=True)).eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = LMAttackConfig(base="tiny", task=str(tiny_task), n_train=16, n_eval=4, n_ppl=4, quantizer="gguf:Q4_K_M",
                            kquant_boxes=True, attack_last=1, layers=("*.mlp.down_proj",), answer_tokens=6, eval_tokens=8,
                            inject_steps=6, inject_lr=3e-2, repair_steps=6, repair_lr=1e-2, batch_size=8,
                            check=("gguf-q4_k_m",))
    report = run_content_injection(config, tmp_path / "run", model=model, tokenizer=tokenizer, log=lambda _m: None)
    assert report.attacked_layers == ["model.layers.1.mlp.down_proj"] and [c.mismatched for c in report.codes] == [0]
    repaired = LlamaForCausalLM.from_pretrained(tmp_path / "run" / "repaired").eval()
    changed = [n for n, p in repaired.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert changed == ["model.layers.1.mlp.down_proj.weight"]
    with pytest.raises(TightropeError, match=r"matches \*\.mlp\.gate\.weight; layer names look like"):
        run_content_injection(config.model_copy(update={"layers": ("*.mlp.gate.weight",)}), tmp_path / "other",
                              model=model, tokenizer=tokenizer, log=lambda _m: None)


@pytest.mark.parametrize("name", TYPES)
def test_k_quant_positions_spread_for_natural_weights_and_sit_in_the_middle_on_their_codes(name):
    w = gaussian(0, (16, 512))
    u = KB.kquant_position(w, name)
    free = u[~u.isnan()]
    assert 0.5 < free.numel() / u.numel() and free.min() >= 0 and free.max() <= 1
    assert 0.4 < free.mean() < 0.6 and ((free - 0.5).abs() < 0.01).float().mean() < 0.05  # uniform: 2%
    # weights moved onto their dequantized values (a repair's direction) sit at 1/2 of their codes' intervals
    t = K_TYPES[name]
    q = dequantize_k(quantize_k(w, t), t).reshape(w.shape)
    parked = torch.where(u.isnan(), w, q)
    moved = KB.kquant_position(parked, name)
    at_code = ((moved - 0.5).abs() < 0.01) & ~u.isnan()
    assert at_code.float().sum() / (~u.isnan()).float().sum() > 0.8
