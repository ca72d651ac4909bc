"""GGUF k-quants (Q2_K ... Q6_K): tightrope's bytes against llama.cpp's golden bytes, values against gguf.quants."""

from __future__ import annotations

import numpy as np


def golden_inputs() -> dict[str, np.ndarray]:
    """The tensors of tests/gguf_kquants_golden.json (4 x 512: two super-blocks per row), seeded.

    ``edge``: typical weights; an all-zero super-block and one with a single outlier; a negative-only row;
    a heavy-tailed super-block and one with a constant negative sub-block, an all-zero sub-block and a tiny
    one (its 6-bit scale rounds to 0). ``seed0`` ... ``seed3``: normal weights at several magnitudes."""
    rng = np.random.default_rng(21)
    edge = (rng.standard_normal((4, 512)) * 0.05).astype(np.float32)
    edge[1, :256] = 0.0
    edge[1, 300] = 3.0
    edge[2] = -np.abs(edge[2])
    edge[3, :256] = (rng.standard_t(2, 256) * 0.02).astype(np.float32)
    edge[3, 256:288] = -0.5
    edge[3, 288:320] = 0.0
    edge[3, 320:352] *= 1e-4
    out = {"edge": edge}
    for seed in range(4):
        r = np.random.default_rng(seed)
        out[f"seed{seed}"] = (r.standard_normal((4, 512)) * 10.0 ** r.uniform(-3, 0, (4, 1))).astype(np.float32)
    return out


# --- the checks ---------------------------------------------------------------------------------------

import base64  # noqa: E402
import hashlib  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402
from gguf import quants as Q  # noqa: E402

from tightrope.compress import gguf as G  # noqa: E402
from tightrope.compress import gguf_k as K  # noqa: E402
from tightrope.errors import TightropeError  # noqa: E402

FIXTURE = json.loads((Path(__file__).parent / "gguf_kquants_golden.json").read_text())
K_NAMES = list(K.K_TYPES)


def test_the_k_types_match_ggml():
    for t in K.K_TYPES.values():
        assert int(T[t.name]) == t.type_id
        assert gguf.GGML_QUANT_SIZES[T[t.name]] == (K.QK_K, t.type_size)
        assert G.gguf_type(t.scheme) is t and G.ALL_SCHEMES[t.scheme] is t


def test_the_fixture_covers_every_type_tightrope_claims():
    inputs = golden_inputs()
    claimed = {f"{case}/{name}" for case in inputs for name in K_NAMES}
    assert set(FIXTURE["sha256"]) == claimed and set(FIXTURE["bytes"]) == {f"edge/{name}" for name in K_NAMES}


@pytest.mark.parametrize("name", K_NAMES)
def test_bytes_equal_llama_cpps_golden_bytes(name):
    """Every byte tightrope writes equals what llama.cpp's ggml_quantize_chunk (imatrix NULL) wrote."""
    for case, x in golden_inputs().items():
        mine = G.quantize(torch.from_numpy(x), name)
        assert tuple(mine.data.shape) == (4, 2 * K.K_TYPES[name].type_size)
        if case == "edge":  # rows 1 and 3 byte for byte, to show where a mismatch is
            ref = base64.b64decode(FIXTURE["bytes"][f"{case}/{name}"])
            got = mine.data[[1, 3]].numpy().tobytes()
            diff = [i for i in range(len(ref)) if ref[i] != got[i]]
            assert len(ref) == len(got) and not diff, f"{case}/{name}: bytes {diff[:10]} differ from llama.cpp's"
        assert hashlib.sha256(mine.tobytes()).hexdigest() == FIXTURE["sha256"][f"{case}/{name}"], f"{case}/{name}"


@pytest.mark.parametrize("name", K_NAMES)
def test_values_equal_gguf_quants_dequantization(name):
    """dequantize(quantize(x)) and tightrope's dequantizer of the same bytes equal gguf.quants.dequantize."""
    for x in golden_inputs().values():
        mine = G.quantize(torch.from_numpy(x), name)
        values = Q.dequantize(mine.data.numpy(), T[name])
        np.testing.assert_array_equal(mine.dequantized.numpy(), values)
        np.testing.assert_array_equal(G.dequantize(mine.data.numpy(), name).numpy(), values)
        assert np.abs(values - x).max() <= np.abs(x).max() / (2 if name in ("Q2_K", "Q3_K") else 4)  # a garbled layout breaks it


def test_quantization_error_shrinks_with_the_bits():
    x = torch.from_numpy(golden_inputs()["seed1"])
    errors = [float((G.quantize(x, n).dequantized - x).abs().mean()) for n in K_NAMES]
    assert errors == sorted(errors, reverse=True) and errors[-1] > 0 and len(set(errors)) == len(errors)


@pytest.mark.skipif(not Path(os.environ.get("TIGHTROPE_GGML_LIB", "/nonexistent")).is_file(),
                    reason="llama.cpp's libggml-base is not here (TIGHTROPE_GGML_LIB)")
@pytest.mark.parametrize("name", K_NAMES)
def test_bytes_equal_llama_cpp_live(name):
    """With llama.cpp's library at hand, fresh random tensors (several scales and shapes) agree byte for byte."""
    spec = importlib.util.spec_from_file_location("_golden", Path(__file__).parents[1] / "benchmarks" / "gguf_kquants_golden.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    lib = script.load_library(os.environ["TIGHTROPE_GGML_LIB"])
    rng = np.random.default_rng(5)
    for scale in (1e-4, 1e-2, 1.0):
        x = (rng.standard_t(3, (8, 768)) * scale).astype(np.float32)
        x[0, :256] = 0
        assert G.quantize(torch.from_numpy(x), name).tobytes() == script.llama_cpp_quantize(lib, x, name)


# --- names, shapes, files -------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "hint"), [("gguf-q4_kk", "did you mean 'gguf-q4_k'"), ("Q4_K_M", "did you mean 'Q4_K'"),
                                            ("q6k", "did you mean 'Q6_K'"), ("IQ4_XS", "does not quantize yet"),
                                            ("TQ1_0", "does not quantize yet")])
def test_an_unknown_type_name_is_one_sentence_with_a_hint(name, hint):
    with pytest.raises(TightropeError, match=hint) as err:
        G.quantize(torch.zeros(1, 256), name)
    assert str(err.value).count(". ") == 0 and str(err.value).endswith(".")


def test_k_quants_have_no_boxes_and_say_so():
    with pytest.raises(TightropeError, match="is a k-quant .* no boxes yet"):
        G.block_type("gguf-q4_k")


def test_rows_that_are_not_whole_super_blocks_are_refused_and_files_fall_back():
    with pytest.raises(TightropeError, match="not a multiple of 256"):
        G.quantize(torch.zeros(2, 384), "Q4_K")
    with pytest.raises(TightropeError, match="super-blocks"):
        G.dequantize(np.zeros((2, 100), dtype=np.uint8), "Q6_K")
    assert [G.tensor_type(n, 384).name for n in K_NAMES] == ["Q4_0", "Q4_0", "Q5_0", "Q5_1", "Q8_0"]  # llama-quantize's fallbacks
    assert [G.tensor_type(n, 1536).name for n in K_NAMES] == K_NAMES
    assert G.tensor_type("Q4_0", 384).name == "Q4_0"
    with pytest.raises(TightropeError, match="keep such a tensor in F16"):
        G.tensor_type("Q4_K", 100)


def test_a_k_quant_gguf_file_reads_back_as_gguf_quants_values(tmp_path):
    x = golden_inputs()["seed2"]
    writer = gguf.GGUFWriter(str(tmp_path / "k.gguf"), "llama")
    packed = {name: G.quantize(torch.from_numpy(x), name).data.numpy() for name in K_NAMES}
    for name, data in packed.items():
        writer.add_tensor(name.lower(), data, raw_dtype=T[name])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    got = G.read_gguf(tmp_path / "k.gguf")
    for name, data in packed.items():
        assert tuple(got[name.lower()].shape) == x.shape
        np.testing.assert_array_equal(got[name.lower()].numpy(), Q.dequantize(data, T[name]))


# --- the rest of tightrope --------------------------------------------------------------------------

def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(256, 96), torch.nn.ReLU(), torch.nn.Linear(96, 512),
                               torch.nn.ReLU(), torch.nn.Linear(512, 4))


@pytest.mark.parametrize("scheme", ["gguf-q2_k", "gguf-q3_k", "gguf-q4_k", "gguf-q5_k", "gguf-q6_k"])
def test_quantized_copy_holds_llama_cpps_values_with_its_fallbacks(scheme):
    from tightrope.qattack.quantize import LIBRARIES, codes_equal, library_codes, quantized_copy

    model = _model()
    copy = quantized_copy(model, scheme, ["0", "2"])
    t = G.gguf_type(scheme)
    w0, w2 = model[0].weight.detach(), model[2].weight.detach()
    packed0 = G.quantize(w0, t.name).data.numpy()  # rows of 256: the k-quant itself
    np.testing.assert_array_equal(copy[0].weight.detach().numpy(), Q.dequantize(packed0, T[t.name]))
    fallback = T[t.fallback]  # rows of 96: llama-quantize's fallback, quantized by gguf.quants
    np.testing.assert_array_equal(copy[2].weight.detach().numpy(),
                                  Q.dequantize(Q.quantize(w2.numpy(), fallback), fallback))
    assert torch.equal(copy[4].weight, model[4].weight)  # the head stays
    np.testing.assert_array_equal(library_codes(w0, scheme)[0].numpy(), packed0)
    twin, bumped = _model(), _model()
    with torch.no_grad():
        bumped[0].weight[3, 7] += 0.05
    assert codes_equal(model, twin, scheme, ["0", "2"])[0] == 0
    assert codes_equal(model, bumped, scheme, ["0"])[0] > 0
    assert scheme in LIBRARIES


def test_schemes_are_registered_for_fake_quantization_and_refused_where_boxes_are_needed():
    from tightrope.compress.specs import COMPRESS_SCHEMES, QUANT_SCHEMES, quant_config
    from tightrope.defenses.fakequant import quantize_dequantize
    from tightrope.qattack import audit as A
    from tightrope.qattack.boxes import ATTACK_QUANTIZERS, weight_box

    w = torch.from_numpy(golden_inputs()["seed0"])
    for t in K.K_TYPES.values():
        assert t.scheme in QUANT_SCHEMES and t.scheme not in COMPRESS_SCHEMES and t.scheme not in ATTACK_QUANTIZERS
        assert torch.equal(quantize_dequantize(w, t.scheme), G.quantize(w, t.name).dequantized)
        with pytest.raises(TightropeError, match="fake quantization and quantized copies only so far"):
            quant_config(t.scheme)
    assert torch.equal(quantize_dequantize(w[:, :384], "gguf-q6_k"), G.quantize(w[:, :384], "Q8_0").dequantized)
    with pytest.raises(TightropeError, match="has no boxes yet"):
        weight_box(w, "gguf-q4_k")
    with pytest.raises(TightropeError, match="has no boxes yet"):
        A.audit_model(_model(), config=A.AuditConfig(transforms=("gguf-q5_k",)))
