"""Every quantization config through one checker: runs, keeps shapes, per-layer SQNR, save / reload."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import NEGATIVE, POSITIVE, make_tiny_classifier
from tightrope import inference
from tightrope.compress import FP4, GPTQ, NF4, Affine, Int8Dynamic, LLMInt8, compress_
from tightrope.compress import formats, gptq, onnxrt, quant
from tightrope.compress import primitives as P
from tightrope.compress.wanda import set_tokenizer
from tightrope.errors import TightropeError

TEXTS = POSITIVE + NEGATIVE

# (config, per-layer SQNR floor in dB, whole-model logits SQNR floor in dB). Floors follow the
# formats' resolution on Gaussian-initialised weights: 8-bit ~ 38-45 dB, 4-bit ~ 18-21 dB.
CASES = [
    (Int8Dynamic(backend="torch"), 35, 25),
    (Int8Dynamic(backend="torch", per_channel=False), 30, 20),
    (Int8Dynamic(backend="onnxruntime"), None, 25),
    (Int8Dynamic(backend="onnxruntime", fuse=False), None, 25),
    (Int8Dynamic(backend="onnxruntime", per_channel=False, reduce_range=True), None, 20),
    (LLMInt8(), 35, 25),
    (LLMInt8(threshold=0.0), 35, 25),
    (NF4(), 17, 8),
    (NF4(double_quant=True), 17, 8),
    (FP4(), 14, 6),
    (FP4(blocksize=128, double_quant=True), 14, 6),
    (Affine(bits=8), 35, 25),
    (Affine(bits=4, granularity="group", group_size=32), 17, 8),
    (Affine(bits=3, granularity="tensor"), 8, 0),
    (GPTQ(bits=4, group_size=32, calibration_texts=tuple(TEXTS)), 15, 8),
    (GPTQ(bits=8, group_size=None, calibration_texts=tuple(TEXTS)), 35, 20),
]


def _ids(case):
    config = case[0]
    extra = ",".join(f"{k}={v}" for k, v in config.to_dict().items()
                     if k not in ("method", "include", "exclude", "calibration_texts") and v not in ((), None))
    return f"{config.method}({extra})"


def _inputs(tokenizer):
    return tokenizer(TEXTS, padding=True, return_tensors="pt")


def dequantized_weight(module: nn.Module) -> torch.Tensor | None:
    """The weight a quantized module multiplies with, in fp32 (None for the ONNX variant)."""
    if isinstance(module, quant.AffineQuantLinear):
        return module.dequantized()
    if isinstance(module, quant._dyn_linear()):
        return module.weight().dequantize()
    bnb = quant._bnb()
    if isinstance(module, bnb.nn.Linear4bit):
        return quant.dequantize_bnb_4bit(module)
    if isinstance(module, bnb.nn.Linear8bitLt):
        cb, scb = quant.int8_state(module)
        return P.dequantize_rowwise_absmax_int8(cb, scb)
    return None


def check_quantized(model: nn.Module, tokenizer, config, layer_floor, logits_floor, tmp_path):
    """The shared checker: applies ``config`` and checks every property a quantized model must have."""
    set_tokenizer(model, tokenizer)
    inputs = _inputs(tokenizer)
    original = copy.deepcopy(model)
    with torch.no_grad():
        ref = original(**inputs).logits
    weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}

    summary = compress_(model, config)

    # which modules: every encoder Linear, never the head or the pooler
    assert summary.modules and all("classifier" not in n and "pooler" not in n for n in summary.modules)
    assert set(summary.modules) == {n for n in weights if "classifier" not in n and "pooler" not in n}
    assert isinstance(model.classifier, nn.Linear)
    # runs and keeps the output shape, close to full precision
    with torch.no_grad():
        out = model(**inputs).logits
    assert out.shape == ref.shape
    assert P.sqnr_db(ref, out) > logits_floor
    # per-layer SQNR of the weights actually used
    if layer_floor is not None:
        for name in summary.modules:
            w_hat = dequantized_weight(model.get_submodule(name))
            assert w_hat is not None and w_hat.shape == weights[name].shape
            assert P.sqnr_db(weights[name], w_hat) > layer_floor, name
    # the summary tells the truth about bits and bytes
    assert summary.bits is not None and summary.bits < 32
    assert summary.stored_bytes == quant.stored_bytes(model)
    assert summary.simulated == isinstance(config, (Affine, GPTQ))
    total, _ = quant.parameter_counts(original)
    if not isinstance(config, Int8Dynamic) or config.backend == "torch":
        assert summary.parameters == total
    # save, reload through tightrope.inference.load, evaluate the reloaded model
    card = {"tokenization": {"max_length": 32, "truncation": "head"}}
    path = formats.save_compressed(model, tokenizer, tmp_path / "q", card=card)
    clf = inference.load(str(path))
    assert clf.card["compression"][-1]["method"] == config.method
    assert clf.card["format"] in (formats.QUANT_FORMAT, onnxrt.ONNX_FORMAT)
    with torch.no_grad():
        again = clf.forward_ids(inputs["input_ids"], inputs["attention_mask"])
    assert torch.allclose(again, out, atol=1e-4, rtol=1e-4)
    if clf.card["format"] == formats.QUANT_FORMAT:
        assert quant.stored_bytes(clf.model) == summary.stored_bytes
    return summary


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_config_table(case, tokenizer, tmp_path):
    config, layer_floor, logits_floor = case
    if isinstance(config, Int8Dynamic) and config.backend == "onnxruntime":
        pytest.importorskip("onnxruntime")
    check_quantized(make_tiny_classifier(tokenizer), tokenizer, config, layer_floor, logits_floor, tmp_path)


def test_4bit_stores_at_least_3x_less_than_fp32(tokenizer):
    model = make_tiny_classifier(tokenizer)
    fp32 = {n: m.weight.numel() * 4 for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    summary = compress_(model, NF4())
    quantized = sum(quant.module_weight_stats(model.get_submodule(n))[2] for n in summary.modules)
    assert sum(fp32[n] for n in summary.modules) / quantized > 3
    assert summary.bits == pytest.approx(4 + 32 / 64)  # 4-bit codes + one fp32 absmax per 64 values


def test_bnb_codes_are_the_reference_codes(tokenizer):
    """The module path stores exactly the codes of the pure reference (what the audit relies on)."""
    model = make_tiny_classifier(tokenizer)
    w = model.bert.encoder.layer[0].intermediate.dense.weight.detach().clone()
    compress_(model, NF4())
    mod = model.bert.encoder.layer[0].intermediate.dense
    q, absmax = P.quantize_4bit(w, "nf4", 64)
    assert torch.equal(P.pack_4bit(q, P.zero_code(P.NF4_CODE)), mod.weight.data)
    assert torch.equal(absmax, mod.weight.quant_state.absmax)
    model = make_tiny_classifier(tokenizer)
    w = model.bert.encoder.layer[1].output.dense.weight.detach().clone()
    compress_(model, LLMInt8())
    cb, scb = quant.int8_state(model.bert.encoder.layer[1].output.dense)
    q, scale = P.quantize_rowwise_absmax_int8(w)
    assert torch.equal(q, cb) and torch.equal(scale, scb)


def test_gptq_beats_round_to_nearest_on_a_layer():
    torch.manual_seed(0)
    X = torch.randn(1024, 64) @ torch.randn(64, 64)  # correlated inputs, as in a transformer
    W = torch.randn(48, 64) * 0.05
    acc = gptq.HessianAccumulator(64)
    acc.add(X[:500])
    acc.add(X[500:])
    assert torch.allclose(acc.H, 2 * X.double().t() @ X.double() / 1024)
    for bits, group in [(3, None), (4, 32), (8, None)]:
        g = P.dequantize_affine(gptq.gptq_quantize(W, acc.H, bits, group))
        r = P.dequantize_affine(gptq.rtn_quantize(W, bits, group))
        err_g = (X @ W.t() - X @ g.t()).pow(2).sum()
        err_r = (X @ W.t() - X @ r.t()).pow(2).sum()
        assert err_g < 0.8 * err_r, (bits, group)
        assert gptq.reconstruction_error(W, g, acc.H) == pytest.approx(float(err_g) / 1024, rel=1e-4)


def test_sequential_gptq_calibrates_each_block_on_the_quantized_blocks_before_it(tokenizer):
    """The reference's sequential mode: block 0 sees the same (dense) inputs either way, block 1 the outputs of a
    quantized block 0, so its codes differ from the one-pass GPTQ's."""
    models = {}
    for sequential in (False, True):
        model = set_tokenizer(make_tiny_classifier(tokenizer), tokenizer)
        summary = compress_(model, GPTQ(bits=3, group_size=None, calibration_texts=tuple(TEXTS), sequential=sequential))
        models[sequential] = (model, summary)
    (one, _), (seq, summary) = models[False], models[True]
    assert any("each block calibrated on the quantized blocks' outputs" in note for note in summary.notes)
    codes = {s: {n: m.qweight for n, m in mod.named_modules() if isinstance(m, quant.AffineQuantLinear)}
             for s, (mod, _) in models.items()}
    first = [n for n in codes[True] if ".layer.0." in n]
    later = [n for n in codes[True] if ".layer.1." in n]
    assert first and later
    assert all(torch.equal(codes[True][n], codes[False][n]) for n in first)
    assert not all(torch.equal(codes[True][n], codes[False][n]) for n in later)


def test_gptq_codes_stay_on_the_grid():
    torch.manual_seed(1)
    X = torch.randn(256, 64)
    W = torch.randn(16, 64)
    acc = gptq.HessianAccumulator(64)
    acc.add(X)
    aq = gptq.gptq_quantize(W, acc.H, 3, 16)
    assert int(aq.q.max()) <= 7 and aq.scale.shape == (16, 4)


# --- refusals: one clear sentence each -------------------------------------------------------------


def test_refuses_quantizing_twice(tokenizer):
    model = make_tiny_classifier(tokenizer)
    compress_(model, Int8Dynamic(backend="torch"))
    with pytest.raises(TightropeError, match="already quantized"):
        compress_(model, NF4())


@pytest.mark.parametrize("make", [
    lambda: Affine(bits=9), lambda: Affine(bits=1), lambda: GPTQ(bits=5), lambda: NF4(blocksize=48),
    lambda: Int8Dynamic(backend="tensorrt"), lambda: Affine(granularity="row"), lambda: LLMInt8(threshold=-1),
    lambda: GPTQ(percdamp=0), lambda: Int8Dynamic(backend="torch", reduce_range=True),
])
def test_refuses_bad_configs(make):
    with pytest.raises(TightropeError) as err:
        make()
    assert str(err.value).count(".") >= 1 and "\n" not in str(err.value)


def test_refuses_a_pattern_that_matches_nothing(tokenizer):
    with pytest.raises(TightropeError, match="match no"):
        compress_(make_tiny_classifier(tokenizer), NF4(include=("decoder.*",)))


def test_refuses_group_that_does_not_divide(tokenizer):
    with pytest.raises(TightropeError, match="group"):
        compress_(make_tiny_classifier(tokenizer), Affine(bits=4, granularity="group", group_size=48))


def test_missing_backend_is_one_sentence(monkeypatch):
    monkeypatch.setattr(quant, "_onnxruntime_available", lambda: False)
    assert quant.resolve_backend("auto") == "torch"
    with pytest.raises(TightropeError, match="not installed"):
        quant.resolve_backend("onnxruntime")


def test_include_exclude_narrow_the_selection(tokenizer):
    model = make_tiny_classifier(tokenizer)
    summary = compress_(model, NF4(include=("*.intermediate.dense", "*.output.dense"), exclude=("*.attention.*",)))
    assert summary.modules == sorted([f"bert.encoder.layer.{i}.{m}.dense" for i in range(2) for m in ("intermediate", "output")])
    assert isinstance(model.bert.encoder.layer[0].attention.self.query, nn.Linear)
