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
    with pytest.raises(TightropeError, match="is a k-quant .* no exact boxes"):
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
    with pytest.raises(TightropeError, match="has no exact boxes"):
        weight_box(w, "gguf-q4_k")
    with pytest.raises(TightropeError, match="has no exact boxes"):
        A.audit_model(_model(), config=A.AuditConfig(transforms=("gguf-q5_k",)))


# One super-block of SmolLM2-135M's blk.7.ffn_down (values on the Q4_1 grid it was published in), as fp32 bit
# patterns: torch's fp32 sqrt on an AVX-512 Xeon rounded its sub-block 5's av_x one ulp low, which moved one
# 6-bit min of its Q5_K bytes away from llama-quantize's. SHA-256 of llama.cpp's bytes (ggml_quantize_chunk).
SMOLLM2_BLOCK = [
    0xbea90400, 0xbe8ab000, 0x3ccf4000, 0xbdbed000, 0x3e4fe000, 0x3ec2ec00, 0xbe1c1000, 0x3ccf4000,
    0xbe8ab000, 0x3e133800, 0x3ccf4000, 0xbd0b0000, 0xbe1c1000, 0x3dad2000, 0x3e4fe000, 0xbe8ab000,
    0x3e133800, 0x3e4fe000, 0x3e4fe000, 0x3e864400, 0xbf020000, 0xbd0b0000, 0xbdbed000, 0xbdbed000,
    0xbdbed000, 0xbd0b0000, 0xbe1c1000, 0xbe58b800, 0xbea90400, 0x3ccf4000, 0xbe58b800, 0xbe1c1000,
    0xbdfc0000, 0xbe300000, 0x3df80000, 0x3cc00000, 0x3cc00000, 0xbe620000, 0x3e890000, 0xbe8a0000,
    0x3cc00000, 0xbcd00000, 0xbcd00000, 0xbe300000, 0xbcd00000, 0x3cc00000, 0xbcd00000, 0xbe620000,
    0x3e600000, 0x3df80000, 0x3ebb0000, 0x3eed0000, 0xbcd00000, 0x3e600000, 0xbcd00000, 0xbdfc0000,
    0x3e2e0000, 0x3e2e0000, 0xbcd00000, 0xbe300000, 0x3df80000, 0x3cc00000, 0x3cc00000, 0x3e600000,
    0x3e785000, 0x3dc4e000, 0x3e785000, 0xbd4dc000, 0x3cbc0000, 0x3e2d6000, 0xbe495000, 0xbdfcc000,
    0xbeaf9800, 0xbe495000, 0x3e785000, 0xbd4dc000, 0xbdfcc000, 0xbd4dc000, 0x3e785000, 0x3e785000,
    0x3e2d6000, 0x3e2d6000, 0x3dc4e000, 0x3dc4e000, 0x3ea1a000, 0xbeaf9800, 0xbd4dc000, 0xbf100000,
    0x3e2d6000, 0xbd4dc000, 0x3ea1a000, 0x3cbc0000, 0xbeaf9800, 0x3f090400, 0xbe8a2000, 0xbe495000,
    0xbd69c000, 0xbd69c000, 0xbd69c000, 0xbe35a000, 0x3ef7f400, 0xbd69c000, 0x3dfcb000, 0xbdf01000,
    0x3b4a0000, 0x3b4a0000, 0xbed60000, 0x3dfcb000, 0x3ed92800, 0xbe733800, 0xbe733800, 0x3e9b9000,
    0xbdf01000, 0xbe733800, 0xbdf01000, 0x3d818000, 0x3b4a0000, 0x3e798800, 0xbd69c000, 0xbe986800,
    0xbd69c000, 0x3d818000, 0x3dfcb000, 0x3d818000, 0x3d818000, 0x3d818000, 0x3d818000, 0x3dfcb000,
    0x3e3be000, 0x3e731000, 0xbe467000, 0x3ee7e800, 0x3e3be000, 0x3cb28000, 0xbe0f4000, 0x3e952000,
    0x3e731000, 0x3e04b000, 0xbd038000, 0xbe467000, 0x3eb0b800, 0xbe467000, 0xbe0f4000, 0x3d9b0000,
    0xbdb02000, 0xbdb02000, 0x3e04b000, 0xbeb60000, 0x3e3be000, 0x3e04b000, 0xbe7da000, 0xbe0f4000,
    0xbe0f4000, 0x3d9b0000, 0x3e952000, 0x3e04b000, 0xbe467000, 0x3cb28000, 0xbd038000, 0x3e3be000,
    0xbed00000, 0x3e8c0c00, 0x3ad40000, 0x3d404000, 0x3e0ce000, 0xbe099000, 0xbe37f800, 0x3ad40000,
    0x3dbcf000, 0x3dbcf000, 0xbd330000, 0x3d404000, 0xbdb65000, 0x3dbcf000, 0x3d404000, 0xbdb65000,
    0x3ad40000, 0xbe099000, 0x3e0ce000, 0xbd330000, 0xbdb65000, 0x3e0ce000, 0xbe099000, 0xbd330000,
    0x3e0ce000, 0xbed00000, 0x3ad40000, 0xbd330000, 0xbdb65000, 0xbd330000, 0xbdb65000, 0xbd330000,
    0xbe986800, 0x3e2b2000, 0x3e5ab800, 0xbd85b000, 0xbe220800, 0xbde4e000, 0x3d97e000, 0x3d97e000,
    0xbe51a000, 0xbc9a0000, 0xbc9a0000, 0xbe986800, 0xbe809c00, 0x3e5ab800, 0x3df71000, 0x3e2b2000,
    0x3e852800, 0xbc9a0000, 0x3ce2c000, 0xbd85b000, 0x3d97e000, 0x3d97e000, 0x3e9cf400, 0xbd85b000,
    0x3ce2c000, 0xbc9a0000, 0x3ce2c000, 0x3df71000, 0xbec80000, 0x3d97e000, 0x3df71000, 0x3d97e000,
    0xbdac0000, 0xbe850000, 0x3e890000, 0xbe1e0000, 0x3dbc0000, 0x3dbc0000, 0x3e6e0000, 0xbc600000,
    0x3e4a0000, 0x3d680000, 0xbd480000, 0x3d680000, 0x3cb00000, 0xbdac0000, 0xbdac0000, 0xbe1e0000,
    0x3e4a0000, 0xbe420000, 0xbd480000, 0x3e020000, 0x3cb00000, 0xbe420000, 0xbdf40000, 0x3e020000,
    0xbe850000, 0xbc600000, 0x3e6e0000, 0x3e260000, 0xbe420000, 0x3dbc0000, 0xbd480000, 0xbdf40000,
]
SMOLLM2_BLOCK_SHA256 = {"Q4_K": "269f2c88c178b69c83d525d4ccf847bd24713af8a367ef5f1ceee8094f86fea8",
                        "Q5_K": "2db3f49dce5bfb45353fd73d9ab37395d9a765e85e785835dd9fad44d834d1b7"}


@pytest.mark.parametrize("name", sorted(SMOLLM2_BLOCK_SHA256))
def test_a_real_super_block_on_a_quantization_grid_matches_llama_cpp(name):
    import hashlib

    x = torch.from_numpy(np.array(SMOLLM2_BLOCK, dtype=np.uint32).view(np.float32).copy()).reshape(1, 256)
    assert hashlib.sha256(G.quantize(x, name).tobytes()).hexdigest() == SMOLLM2_BLOCK_SHA256[name]


def test_sqrtf_is_correctly_rounded():
    from tightrope.compress.gguf_k import sqrtf

    v = torch.rand(100_000, generator=torch.Generator().manual_seed(0)) * torch.logspace(-8, 4, 100_000)
    assert torch.equal(sqrtf(v), torch.from_numpy(np.sqrt(v.numpy())))  # numpy's fp32 sqrt is IEEE's
    assert sqrtf(torch.tensor([0.0203203876])).item() == np.sqrt(np.float32(0.0203203876))
