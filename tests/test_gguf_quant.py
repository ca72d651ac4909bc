"""GGUF legacy block types: tightrope's quantizer against llama.cpp's own (gguf.quants), the boxes, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402
from gguf import quants as Q  # noqa: E402

from tightrope.compress import gguf as G  # noqa: E402
from tightrope.errors import TightropeError  # noqa: E402
from tightrope.qattack import boxes as B  # noqa: E402

TYPE_NAMES = list(G.TYPES)


def cases(seed: int) -> list[np.ndarray]:
    """Small tensors of whole blocks: normal, heavy-tailed, edge blocks (zero, one outlier, negative only,
    constant, ties of the absmax with both signs, tiny values)."""
    rng = np.random.default_rng(seed)
    normal = rng.standard_normal((3, 64)).astype(np.float32)
    heavy = (rng.standard_t(2, (2, 96)) * 0.02).astype(np.float32)
    edge = rng.standard_normal((8, 32)).astype(np.float32) * 0.1
    edge[0] = 0.0  # all-zero block
    edge[1, 7] = 40.0  # one large outlier
    edge[2] = -np.abs(edge[2])  # negative only
    edge[3] = 0.25  # constant
    edge[4, 3], edge[4, 20] = -1.5, 1.5  # absmax tie, opposite signs (the first wins for Q4_0 / Q5_0)
    edge[5, 0], edge[5, 31] = 2.0, 2.0  # absmax tie, same sign
    edge[6] *= 1e-6  # tiny values (fp16 scale underflows)
    edge[7, ::2] = -edge[7, ::2]
    return [normal, heavy, edge]


def test_the_block_types_match_ggml():
    for t in G.TYPES.values():
        assert int(T[t.name]) == t.type_id
        assert gguf.GGML_QUANT_SIZES[T[t.name]] == (G.QK, t.type_size)


@pytest.mark.parametrize("name", TYPE_NAMES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bytes_and_values_equal_llama_cpps_reference(name, seed):
    """Every byte tightrope writes equals gguf.quants.quantize's; both dequantizers give the reference's values."""
    for x in cases(seed):
        ref = Q.quantize(x, T[name])
        mine = G.quantize(torch.from_numpy(x), name)
        np.testing.assert_array_equal(mine.data.numpy(), ref)
        assert mine.tobytes() == ref.tobytes()
        values = Q.dequantize(ref, T[name])
        np.testing.assert_array_equal(mine.dequantized.numpy(), values)
        np.testing.assert_array_equal(G.dequantize(ref, name).numpy(), values)


def test_rows_that_are_not_whole_blocks_are_refused():
    with pytest.raises(TightropeError, match="not a multiple of 32"):
        G.quantize(torch.zeros(2, 48), "Q4_0")


def _requantized(x: np.ndarray, name: str) -> np.ndarray:
    return Q.quantize(np.ascontiguousarray(x, dtype=np.float32), T[name])


@pytest.mark.parametrize("scheme", B.GGUF_QUANTIZERS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_points_inside_the_box_requantize_to_the_same_bytes(scheme, seed):
    """Random points in every weight's box, and all weights at their lower or upper ends at once, give
    exactly the reference's bytes of the original weights."""
    name = G.block_type(scheme).name
    rng = np.random.default_rng(100 + seed)
    for x in cases(seed):
        lo, hi = B.weight_box(torch.from_numpy(x), scheme)
        assert (lo <= torch.from_numpy(x)).all() and (torch.from_numpy(x) <= hi).all()
        ref = _requantized(x, name)
        for _ in range(3):
            u = torch.from_numpy(rng.random(x.shape).astype(np.float32))
            inside = torch.minimum(torch.maximum(lo + u * (hi - lo), lo), hi)
            np.testing.assert_array_equal(_requantized(inside.numpy(), name), ref)
        np.testing.assert_array_equal(_requantized(lo.numpy(), name), ref)
        np.testing.assert_array_equal(_requantized(hi.numpy(), name), ref)
        assert (lo < hi).float().mean() > 0.5  # most weights are free to move


@pytest.mark.parametrize("scheme", B.GGUF_QUANTIZERS)
@pytest.mark.parametrize("seed", [0, 1])
def test_the_next_float_beyond_a_box_edge_changes_the_bytes(scheme, seed):
    """The boxes are tight: moving one free weight one float past an end that is a code boundary changes its
    block. (An end at the block's range, +-absmax or min / max, is where the scale would move: it is kept
    as the paper does, although a one-ulp larger absmax may leave the fp16 scale and every code unchanged.)"""
    t = G.block_type(scheme)
    rng = np.random.default_rng(seed)
    checked = 0
    for x in cases(seed):
        lo, hi = (e.numpy().reshape(-1) for e in B.weight_box(torch.from_numpy(x), scheme))
        blocks = x.reshape(-1, G.QK)
        bounds = ([blocks.min(1), blocks.max(1)] if t.offset else [-np.abs(blocks).max(1), np.abs(blocks).max(1)])
        low, high = (np.repeat(b, G.QK) for b in bounds)
        ref = _requantized(x, t.name)
        for end, away, limit in ((hi, np.inf, high), (lo, -np.inf, low)):
            edges = np.nonzero((lo < hi) & (end != limit))[0]
            for i in rng.choice(edges, size=min(10, edges.size), replace=False):
                moved = x.copy().reshape(-1)
                moved[i] = np.nextafter(end[i], np.float32(away))
                assert not np.array_equal(_requantized(moved.reshape(x.shape), t.name), ref), (i, away)
                checked += 1
    assert checked >= 40


def test_q4_0_boxes_keep_the_signed_setter_on_ties():
    """A weight before Q4_0's setter may not reach -M (it would become the setter and flip d); one after may."""
    x = torch.zeros(1, 32)
    x[0, 10], x[0, 5], x[0, 20] = 1.0, -0.9, -0.9  # code 15, the clipped end
    lo, hi = B.weight_box(x, "gguf-q4_0")
    assert lo[0, 5] > -1.0 and lo[0, 20] == -1.0
    assert lo[0, 10] == hi[0, 10] == 1.0  # the setter is pinned
    zero_lo, zero_hi = B.weight_box(torch.zeros(1, 32), "gguf-q8_0")
    assert (zero_lo == 0).all() and (zero_hi == 0).all()  # an all-zero block is pinned whole


# --- names and files ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "hint"), [("gguf-q4-0", "did you mean 'gguf-q4_0'"), ("Q8-0", "did you mean 'Q8_0'"),
                                            ("Q4_K_M", "did you mean 'Q4_K'"), ("IQ4_XS", "i-quant"),
                                            ("Q4_K", "k-quant .* no exact boxes")])
def test_a_misspelt_or_unsupported_type_is_one_sentence(name, hint):
    with pytest.raises(TightropeError, match=hint) as err:
        G.block_type(name)
    assert str(err.value).count(". ") == 0 and str(err.value).endswith(".")


def test_consumers_refuse_gguf_schemes_they_do_not_support_and_suggest_close_names():
    from tightrope.compress.specs import quant_config

    B.check_quantizer("gguf-q4_0")  # the audit and the attacks take it
    with pytest.raises(TightropeError, match="GGUF type 'gguf-q4_0' to check is not supported here; choose one of llm-int8"):
        B.check_quantizer("gguf-q4_0", B.QUANTIZERS, " to check")
    with pytest.raises(TightropeError, match="did you mean 'gguf-q8_0'"):
        B.weight_box(torch.zeros(1, 32), "gguf-q8-0")
    with pytest.raises(TightropeError, match="did you mean 'nf4'"):
        B.check_quantizer("nf5")
    with pytest.raises(TightropeError, match="fake quantization, qattack and audit only so far; compress and train quantize with int8"):
        quant_config("gguf-q4_0")
    with pytest.raises(TightropeError, match="did you mean 'gguf-q5_1'"):
        quant_config("gguf-q5-1")


def test_fake_quantization_of_a_gguf_scheme_is_llama_cpps_round_trip():
    from tightrope.defenses.fakequant import fake_quantize

    x = torch.from_numpy(cases(0)[0]).requires_grad_()
    out = fake_quantize(x, "gguf-q4_1")
    np.testing.assert_array_equal(out.detach().numpy(), Q.dequantize(Q.quantize(x.detach().numpy(), T.Q4_1), T.Q4_1))
    out.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # straight-through


def _write_gguf(path, tensors: dict[str, tuple[np.ndarray, T | None]]) -> None:
    writer = gguf.GGUFWriter(str(path), "llama")
    for name, (data, raw) in tensors.items():
        if raw is None:
            writer.add_tensor(name, data)
        else:
            writer.add_tensor(name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_a_gguf_file_reads_back_as_the_references_values(tmp_path):
    x = cases(1)[0]
    path = tmp_path / "tiny.gguf"
    _write_gguf(path, {"q4": (Q.quantize(x, T.Q4_0), T.Q4_0), "q8": (Q.quantize(x, T.Q8_0), T.Q8_0),
                       "f32": (x, None), "f16": (x.astype(np.float16), None)})
    got = G.read_gguf(path)
    assert {k: tuple(v.shape) for k, v in got.items()} == {k: x.shape for k in ("q4", "q8", "f32", "f16")}
    np.testing.assert_array_equal(got["q4"].numpy(), Q.dequantize(Q.quantize(x, T.Q4_0), T.Q4_0))
    np.testing.assert_array_equal(got["q8"].numpy(), Q.dequantize(Q.quantize(x, T.Q8_0), T.Q8_0))
    np.testing.assert_array_equal(got["f32"].numpy(), x)


def test_a_gguf_file_with_a_type_tightrope_does_not_read_is_one_sentence(tmp_path):
    path = tmp_path / "iq.gguf"
    size = gguf.GGML_QUANT_SIZES[T.IQ4_XS][1]
    _write_gguf(path, {"blk.0.w": (np.zeros((2, size), dtype=np.uint8), T.IQ4_XS)})
    with pytest.raises(TightropeError, match=r"tensor 'blk\.0\.w' of type IQ4_XS, which tightrope does not read; it reads"):
        G.read_gguf(path)


@pytest.mark.parametrize("keep", [0.5, 0.98, 24 / 1000])
def test_a_truncated_gguf_file_is_one_sentence(tmp_path, keep):
    path = tmp_path / "whole.gguf"
    x = cases(2)[0]
    _write_gguf(path, {"a": (Q.quantize(x, T.Q5_0), T.Q5_0), "b": (x, None)})
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(TightropeError, match="is truncated or damaged"):
        G.read_gguf(cut)
    with pytest.raises(TightropeError, match="does not exist"):
        G.read_gguf(tmp_path / "missing.gguf")


@pytest.mark.parametrize("scheme", ["gguf-q8_0", "gguf-q4_0", "gguf-q5_1"])
def test_projected_weights_of_a_model_keep_their_gguf_bytes(scheme):
    """model_boxes / project_ (the repair's projection) work on GGUF schemes: a large random step projected
    back into the boxes leaves every Linear's GGUF bytes as they were."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    name = G.block_type(scheme).name
    before = {n: _requantized(m.weight.detach().numpy(), name) for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear)}
    boxes = B.model_boxes(model, scheme)
    assert set(boxes.names) == set(before)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    B.project_(model, boxes)
    for n, m in model.named_modules():
        if n in before:
            np.testing.assert_array_equal(_requantized(m.weight.detach().numpy(), name), before[n])
