"""Reference quantizers against the libraries that run the formats: same codes, bit for bit."""

from __future__ import annotations

import pytest
import torch

from tightrope.compress import primitives as P
from tightrope.errors import TightropeError

bnbF = pytest.importorskip("bitsandbytes.functional")


def _cases() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    randn = torch.randn(96, 200, generator=g) * 0.05
    outliers = randn.clone()
    outliers[3, 7] = 9.0
    outliers[50, :4] = -7.5
    zeros = torch.zeros(8, 128)
    zero_rows = randn[:8, :128].clone()
    zero_rows[2] = 0
    zero_rows[5, 64:] = 0  # one all-zero block
    constant = torch.full((4, 128), 0.3)
    constant[2, 64:] = -0.7
    odd = torch.randn(7, 9, generator=g)  # numel not a multiple of the block size
    # Ties: values exactly halfway between two NF4 / FP4 levels, scaled by an absmax of 1.
    nf4_mid = ((P.NF4_CODE[:-1] + P.NF4_CODE[1:]) / 2)
    fp4_sorted = P.FP4_CODE.sort().values
    fp4_mid = (fp4_sorted[:-1] + fp4_sorted[1:]) / 2
    ties = torch.cat([nf4_mid, fp4_mid, torch.tensor([1.0, -1.0, 0.0, -0.0, 1e-4, -1e-4, 0.002, -0.002])])
    ties = torch.nn.functional.pad(ties, (0, 64 - ties.numel() % 64), value=0.25).reshape(-1, 64)
    ties[:, 0] = 1.0  # absmax 1 per block, so the scaled values are the midpoints themselves
    return {"randn": randn, "outliers": outliers, "zeros": zeros, "zero_rows": zero_rows,
            "constant": constant, "odd": odd, "ties": ties}


CASES = _cases()


def test_code_tables_equal_bitsandbytes():
    assert torch.equal(P.NF4_CODE, bnbF.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(P.FP4_CODE, bnbF.get_4bit_type("fp4", device="cpu"))
    assert torch.equal(P.DYNAMIC_CODE, bnbF.create_dynamic_map())


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("case", list(CASES))
def test_4bit_codes_bit_exact(quant_type, blocksize, case):
    w = CASES[case]
    q, absmax = P.quantize_4bit(w, quant_type, blocksize)
    packed, state = bnbF.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type)
    assert torch.equal(P.pack_4bit(q, P.zero_code(P.CODES_4BIT[quant_type])), packed)
    assert torch.equal(absmax, state.absmax)
    assert torch.equal(P.unpack_4bit(packed, w.shape), q)
    ours = P.dequantize_4bit(q, absmax, quant_type, blocksize)
    theirs = bnbF.dequantize_4bit(packed, state)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_double_quant_bit_exact(quant_type):
    w = torch.randn(300, 256, generator=torch.Generator().manual_seed(1)) * 0.02
    q, dq = P.quantize_4bit(w, quant_type, 64, double_quant=True)
    packed, state = bnbF.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=True)
    assert torch.equal(P.pack_4bit(q), packed)
    assert torch.equal(dq.absmax2, state.state2.absmax)
    assert dq.offset == float(state.offset)
    # second-level codes: nearest level (see test_blockwise_dynamic_int8_is_nearest)
    _, absmax1 = P.quantize_blockwise(w, P.CODES_4BIT[quant_type], 64)
    _closer_or_equal(absmax1 - dq.offset, dq.absmax2, dq.q, state.absmax, 256)
    ours = P.dequantize_4bit(q, dq, quant_type, 64)
    exact = P.dequantize_4bit(q, absmax1, quant_type, 64)
    assert P.sqnr_db(exact, ours) > 35  # double quantization costs little (QLoRA: 0.37 bits saved per value)
    assert P.sqnr_db(exact, bnbF.dequantize_4bit(packed, state)) > 35


def _closer_or_equal(x: torch.Tensor, absmax: torch.Tensor, ours: torch.Tensor, theirs: torch.Tensor, blocksize: int):
    """Our code is the exact nearest level: never farther from the scaled value than bitsandbytes'."""
    per_value = absmax.repeat_interleave(blocksize)[: x.numel()]
    live = per_value > 0  # an all-zero block dequantizes to 0 whatever its codes
    scaled = x.reshape(-1)[live] / per_value[live]
    code = P.DYNAMIC_CODE
    d_ours = (scaled - code[ours.reshape(-1)[live].long()]).abs()
    d_theirs = (scaled - code[theirs.reshape(-1)[live].long()]).abs()
    assert bool((d_ours <= d_theirs + 1e-7).all())
    return float((ours.reshape(-1)[live] != theirs.reshape(-1)[live]).float().mean()) if live.any() else 0.0


@pytest.mark.parametrize("case", list(CASES))
def test_blockwise_dynamic_int8_is_nearest(case):
    """bitsandbytes' native CPU kernel for the 8-bit dynamic code searches approximately (a few
    percent of values, and exact zeros, land a level off); its pure-PyTorch backend and our reference round to the
    exact nearest level. The block constants agree bit for bit, the codes agree or ours is closer."""
    w = CASES[case]
    q, absmax = P.quantize_blockwise(w, P.DYNAMIC_CODE, 256)
    theirs, state = bnbF.quantize_blockwise(w, blocksize=256)
    assert torch.equal(absmax, state.absmax)
    _closer_or_equal(w, absmax, q, theirs, 256)


def test_4bit_ties_go_to_the_lower_level():
    mids = ((P.NF4_CODE[:-1] + P.NF4_CODE[1:]) / 2).reshape(1, -1)
    w = torch.cat([mids, torch.ones(1, 1)], dim=1)  # absmax 1
    q, _ = P.quantize_blockwise(w, P.NF4_CODE, 64)
    assert q[0, :15].tolist() == list(range(15))  # midpoint k..k+1 rounds to k
    q, _ = P.quantize_blockwise(torch.tensor([[0.0, -1e-4, 1e-4, 1.0]]), P.FP4_CODE, 64)
    assert q[0].tolist() == [0, 0, 8, 3]  # FP4's two zeros: 0 and tiny negatives -> +0, tiny positives -> -0


@pytest.mark.parametrize("case", list(CASES))
def test_llm_int8_rowwise_bit_exact(case):
    w = CASES[case]
    q, scale = P.quantize_rowwise_absmax_int8(w)
    cb, scb, _ = bnbF.int8_vectorwise_quant(w.to(torch.float16).contiguous())
    assert torch.equal(scale, scb)
    assert torch.equal(q, cb)
    assert torch.equal(P.dequantize_rowwise_absmax_int8(q, scale), bnbF.int8_vectorwise_dequant(cb, scb))


def test_llm_int8_linear_matches_bitsandbytes_module():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    x = torch.randn(5, 64)
    x[:, 3] *= 20  # an outlier feature, above the threshold
    mod = bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=False, threshold=6.0)
    mod.weight = bnb.nn.Int8Params(lin.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    mod.bias = torch.nn.Parameter(lin.bias.data.clone())
    mod = mod.to("cpu").eval()
    with torch.no_grad():
        theirs = mod(x)
    q, scale = P.quantize_rowwise_absmax_int8(lin.weight)
    ours = P.llm_int8_linear(x, q, scale, lin.bias, threshold=6.0)
    assert P.outlier_columns(x, 6.0).tolist() == [3]
    assert torch.allclose(ours, theirs.float(), atol=2e-2, rtol=1e-2)
    assert P.sqnr_db(lin(x), ours) > 30


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("case", ["randn", "outliers", "zero_rows", "constant", "odd"])
def test_symmetric_int8_matches_torch_ao(per_channel, case):
    from torch.ao.quantization.observer import MinMaxObserver, PerChannelMinMaxObserver

    w = CASES[case]
    q, scale = P.quantize_symmetric_int8(w, per_channel)
    if per_channel:
        obs = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
        obs(w)
        s, z = obs.calculate_qparams()
        ref = torch.quantize_per_channel(w, s, z, 0, torch.qint8)
        assert torch.equal(scale, s.float())
    else:
        obs = MinMaxObserver(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)
        obs(w)
        s, z = obs.calculate_qparams()
        ref = torch.quantize_per_tensor(w, float(s), int(z), torch.qint8)
        assert float(scale) == float(s)
    assert torch.equal(q, ref.int_repr())
    assert torch.equal(P.dequantize_symmetric_int8(q, scale), ref.dequantize())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
def test_affine_formula_and_error_bound(bits, granularity):
    w = CASES["randn"][:, :192]
    aq = P.quantize_affine(w, bits, granularity, group_size=64)
    assert aq.q.dtype == torch.uint8 and int(aq.q.max()) <= 2**bits - 1
    w_hat = P.dequantize_affine(aq)
    # Round-to-nearest error is at most half a step in every group.
    step = aq.scale.unsqueeze(-1).expand(-1, -1, aq.group).reshape(w.shape)
    assert bool(((w - w_hat).abs() <= step / 2 + 1e-6).all())
    # The seed's formula, spelled out for one row.
    row = w[0] if granularity != "tensor" else w.reshape(-1)
    if granularity == "group":
        row = w[0, :64]
    lo, hi = row.min(), row.max()
    scale = (hi - lo) / (2**bits - 1)
    assert torch.equal(aq.q.reshape(-1)[: row.numel()].float(), torch.round((row - lo) / scale))


def test_affine_finer_granularity_is_more_accurate():
    w = CASES["outliers"][:, :192]
    sq = {g: P.sqnr_db(w, P.dequantize_affine(P.quantize_affine(w, 4, g, 64))) for g in ("tensor", "channel", "group")}
    assert sq["tensor"] < sq["channel"] < sq["group"]


def test_affine_constant_groups_are_exact():
    aq = P.quantize_affine(CASES["constant"], 3, "group", 64)
    assert torch.equal(P.dequantize_affine(aq), CASES["constant"])


@pytest.mark.parametrize("bits", [1, 9, 4.5, True])
def test_affine_refuses_bits_out_of_range(bits):
    with pytest.raises(TightropeError, match="bits must be"):
        P.quantize_affine(CASES["randn"], bits)


def test_affine_refuses_group_that_does_not_divide():
    with pytest.raises(TightropeError, match="group size"):
        P.quantize_affine(CASES["randn"], 4, "group", 64)


def test_pack_roundtrip_odd_length():
    q = torch.randint(0, 16, (3, 5), dtype=torch.uint8)
    assert torch.equal(P.unpack_4bit(P.pack_4bit(q), q.shape), q)
