"""Boxes checked against the real libraries (bitsandbytes, torch.ao) as oracles."""

from __future__ import annotations

import warnings

import pytest
import torch

from tightrope.compress.primitives import unpack_4bit
from tightrope.qattack import boxes as B

bnbf = pytest.importorskip("bitsandbytes.functional")


def oracle(w: torch.Tensor, quantizer: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scales) as the real library computes them."""
    if quantizer == "llm-int8":
        q, scale, _ = bnbf.int8_vectorwise_quant(w.detach().to(torch.float16).clone())
        return q, scale
    if quantizer in ("nf4", "fp4"):
        packed, state = bnbf.quantize_4bit(w.detach().float().contiguous(), blocksize=64, quant_type=quantizer)
        return unpack_4bit(packed, w.shape), state.absmax
    if quantizer == "int8-tensor":
        from torch.ao.quantization import quantize_dynamic

        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        lin.weight.data.copy_(w)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qw = quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8)[0].weight()
        return qw.int_repr(), torch.tensor(qw.q_scale())
    raise ValueError(quantizer)


def same(w_a: torch.Tensor, w_b: torch.Tensor, quantizer: str) -> bool:
    qa, sa = oracle(w_a, quantizer)
    qb, sb = oracle(w_b, quantizer)
    return bool(torch.equal(qa, qb) and torch.equal(sa, sb))


def weights(seed: int, shape=(48, 192), kind: str = "normal") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        return torch.randn(shape, generator=g) * 0.05
    if kind == "heavy":  # Student-t-like tails, as trained transformer weights have
        z = torch.randn(shape, generator=g)
        chi = torch.randn((3, *shape), generator=g).pow(2).sum(0) / 3
        return 0.02 * z / chi.sqrt()
    if kind == "uniform":
        return (torch.rand(shape, generator=g) - 0.5) * 0.3
    raise ValueError(kind)


CASES = [(q, seed, kind) for q in B.QUANTIZERS for seed, kind in ((0, "normal"), (1, "heavy"), (2, "uniform"))]


@pytest.mark.parametrize("quantizer,seed,kind", CASES)
def test_points_inside_the_box_keep_codes_and_scales(quantizer, seed, kind):
    w = weights(seed, kind=kind)
    lo, hi = B.weight_box(w, quantizer)
    assert torch.all(lo <= w) and torch.all(w <= hi)
    g = torch.Generator().manual_seed(seed + 100)
    for _ in range(3):
        u = torch.rand(w.shape, generator=g)
        inside = lo + u * (hi - lo)
        assert same(w, torch.minimum(torch.maximum(inside, lo), hi), quantizer)
    assert same(w, lo, quantizer), "the lower ends themselves must keep the codes"
    assert same(w, hi, quantizer), "the upper ends themselves must keep the codes"
    slo, shi = B.shrink(lo, hi, 1e-3)
    assert same(w, slo, quantizer) and same(w, shi, quantizer)


def _just_outside(end: torch.Tensor, quantizer: str, direction: float) -> torch.Tensor:
    return torch.nextafter(end, torch.full_like(end, direction))


@pytest.mark.parametrize("quantizer,seed,kind", CASES)
def test_weights_just_outside_change_code(quantizer, seed, kind):
    w = weights(seed, kind=kind)
    lo, hi = B.weight_box(w, quantizer)
    codes, _ = oracle(w, quantizer)
    if quantizer == "llm-int8":
        limit = w.to(torch.float16).float().abs().amax(dim=1, keepdim=True).expand_as(w)
    elif quantizer == "int8-tensor":
        limit = w.abs().amax().expand_as(w)
    else:
        limit = w.reshape(-1, 64).abs().amax(dim=1, keepdim=True).expand(-1, 64).reshape(w.shape)
    free = lo < hi
    for end, direction in ((hi, float("inf")), (lo, float("-inf"))):
        out = _just_outside(end, quantizer, direction)
        movable = free & (out.abs() <= limit)  # beyond the absmax the scale itself would change
        assert movable.float().mean() > 0.5
        pushed = torch.where(movable, out, w)
        new_codes, _ = oracle(pushed, quantizer)
        changed = new_codes != codes
        assert torch.all(changed[movable]), f"{int((~changed[movable]).sum())} weights kept their code outside the box"


@pytest.mark.parametrize("quantizer", ["nf4", "fp4"])
def test_short_last_block(quantizer):
    w = weights(3, shape=(3, 70))  # 210 values: three full blocks of 64 and one of 18
    lo, hi = B.weight_box(w, quantizer)
    g = torch.Generator().manual_seed(4)
    inside = lo + torch.rand(w.shape, generator=g) * (hi - lo)
    assert same(w, inside, quantizer) and same(w, lo, quantizer) and same(w, hi, quantizer)


@pytest.mark.parametrize("quantizer", B.QUANTIZERS)
def test_scale_setters_are_pinned(quantizer):
    w = weights(5)
    lo, hi = B.weight_box(w, quantizer)
    pinned = lo == hi
    if quantizer == "llm-int8":
        assert pinned[torch.arange(w.shape[0]), w.to(torch.float16).abs().argmax(1)].all()
    elif quantizer == "int8-tensor":
        assert pinned.reshape(-1)[w.abs().argmax()]
    else:
        blocks = w.reshape(-1, 64)
        assert pinned.reshape(-1, 64)[torch.arange(blocks.shape[0]), blocks.abs().argmax(1)].all()
    assert pinned.float().mean() < 0.05  # only the scale setters (and rare edge cases)


def test_all_is_the_intersection_and_keeps_every_code():
    w = weights(6, kind="heavy")
    lo, hi = B.weight_box(w, "all")
    for q in B.ALL_MEMBERS:
        qlo, qhi = B.weight_box(w, q)
        assert torch.all(lo >= qlo) and torch.all(hi <= qhi)
        inside = lo + torch.rand(w.shape, generator=torch.Generator().manual_seed(7)) * (hi - lo)
        assert same(w, inside, q)
    width_all = (hi - lo).mean()
    assert width_all <= (B.weight_box(w, "llm-int8")[1] - B.weight_box(w, "llm-int8")[0]).mean()


def test_zero_rows_and_blocks_are_pinned():
    w = weights(8, shape=(4, 128))
    w[1] = 0
    for q in ("llm-int8", "nf4", "fp4"):  # per-row / per-block scales; int8-tensor's is per tensor
        lo, hi = B.weight_box(w, q)
        assert torch.equal(lo[1], w[1]) and torch.equal(hi[1], w[1])


def test_shrink_and_position():
    w = weights(9)
    lo, hi = B.weight_box(w, "nf4")
    slo, shi = B.shrink(lo, hi, 0.1)
    assert torch.all(slo >= lo) and torch.all(shi <= hi) and torch.all(slo <= shi)
    pos = B.box_position(w, lo, hi)
    assert torch.isnan(pos[lo == hi]).all()
    assert ((pos >= 0) & (pos <= 1))[lo < hi].all()
    with pytest.raises(B.TightropeError):
        B.shrink(lo, hi, 0.5)


def test_unknown_quantizer_is_one_sentence():
    with pytest.raises(B.TightropeError, match="Unknown quantizer"):
        B.weight_box(weights(0), "int3")


def tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100,
                     num_labels=2)
    return BertForSequenceClassification(cfg).eval()


@pytest.mark.parametrize("quantizer", [*B.QUANTIZERS, "all"])
def test_tiny_model_projected_weights_keep_codes(quantizer):
    model = tiny_bert()
    boxes = B.model_boxes(model, quantizer)
    assert "classifier" not in boxes.names and any("pooler" in n for n in boxes.names)
    modules = dict(model.named_modules())
    before = {n: modules[n].weight.detach().clone() for n in boxes.names}
    with torch.no_grad():  # a large random step, then the projection
        for n in boxes.names:
            modules[n].weight.add_(torch.randn_like(modules[n].weight) * 0.05)
    B.project_(model, boxes)
    members = B.ALL_MEMBERS if quantizer == "all" else (quantizer,)
    for n in boxes.names:
        after = modules[n].weight.detach()
        assert not torch.equal(after, before[n])
        for q in members:
            assert same(before[n], after, q), f"{n} changed its {q} codes"


@pytest.mark.parametrize("quantizer", ["nf4", "fp4"])
def test_chunked_boxes_equal_unchunked_and_keep_codes(quantizer, monkeypatch):
    w = weights(10, shape=(9, 75), kind="heavy")  # 10 full blocks and a short one of 35
    whole = B.weight_box(w, quantizer)
    monkeypatch.setattr(B, "_CHUNK_BLOCKS", 3)  # chunk edges fall inside the tensor
    lo, hi = B.weight_box(w, quantizer)
    assert torch.equal(lo, whole[0]) and torch.equal(hi, whole[1])
    assert same(w, lo, quantizer) and same(w, hi, quantizer)
    assert (lo < hi).float().mean() > 0.9
