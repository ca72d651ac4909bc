"""The ONNX Runtime int8 path: transformer fusion before dynamic quantization, on a tiny BERT."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import NEGATIVE, POSITIVE, make_tiny_classifier
from tightrope import inference
from tightrope.compress import Int8Dynamic, compress_, formats, onnxrt, ortfuse
from tightrope.compress import primitives as P
from tightrope.errors import TightropeError

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

TEXTS = POSITIVE + NEGATIVE
LAYERS = 2


def _quantized(tokenizer, config):
    model = make_tiny_classifier(tokenizer, layers=LAYERS)
    original = copy.deepcopy(model)
    summary = compress_(model, config)
    return original, model, summary


def _padded(tokenizer, side: str):
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.padding_side = side
    return tokenizer(TEXTS, padding=True, return_tensors="pt")


def test_fused_graph_quantizes_attention_as_one_int8_node(tokenizer, tmp_path):
    original, model, summary = _quantized(tokenizer, Int8Dynamic(backend="onnxruntime"))
    record = summary.config["onnx"]
    assert record["fused"].get("Attention") == LAYERS
    assert record["fused"].get("SkipLayerNormalization") == 2 * LAYERS
    # Q, K, V of each layer in one QAttention; attention output, intermediate and output as MatMulInteger (fused with their input quantization at session load)
    assert record["int8_nodes"] == {"QAttention": LAYERS, "MatMulInteger": 3 * LAYERS}
    assert record["fp32_chosen_modules"] == [] and not record["reduce_range"] and record["per_channel"]
    assert len(summary.modules) == 6 * LAYERS and all("classifier" not in n and "pooler" not in n for n in summary.modules)
    # the saved card records how the graph was made, and the reloaded model computes the same logits
    inputs = _padded(tokenizer, "right")
    with torch.no_grad():
        out = model(**inputs).logits
        ref = original(**inputs).logits
    assert P.sqnr_db(ref, out) > 25
    path = formats.save_compressed(model, tokenizer, tmp_path / "q", card={"tokenization": {"max_length": 32}})
    clf = inference.load(str(path))
    saved = clf.card["compression"][-1]["config"]
    assert saved["fuse"] is True and saved["onnx"]["fused"]["Attention"] == LAYERS
    assert torch.allclose(clf.forward_ids(inputs["input_ids"], inputs["attention_mask"]), out, atol=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
def test_fused_attention_reads_the_raw_mask_on_either_padding_side(tokenizer, side):
    """A 1-D mask index (the optimizer's BERT default) treats the first n positions as the real
    tokens, so left padding would be read as text. Weights scaled x5 make the tiny model's logits
    depend on which tokens it attends to: int8 tracks fp32 at ~32 dB on both sides with the raw
    mask, and at ~19 dB on left padding with a mask index."""
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.padding_side = side
    texts = ["bad", "a wonderful, moving film with great acting, a superb script and music i will remember for years",
             *POSITIVE[:2]]
    inputs = tokenizer(texts, padding=True, return_tensors="pt")
    model = make_tiny_classifier(tokenizer, layers=LAYERS)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                module.weight.mul_(5.0)
    original = copy.deepcopy(model)
    compress_(model, Int8Dynamic(backend="onnxruntime"))
    with torch.no_grad():
        ref = original(**inputs).logits
        out = model(**inputs).logits
    assert P.sqnr_db(ref, out) > 25, side


def test_unfused_and_reduced_range_variants_stay_selectable(tokenizer):
    _, _, unfused = _quantized(tokenizer, Int8Dynamic(backend="onnxruntime", fuse=False))
    assert unfused.config["onnx"]["fused"] == {}
    assert unfused.config["onnx"]["int8_nodes"] == {"MatMulInteger": 6 * LAYERS}
    _, model, reduced = _quantized(tokenizer, Int8Dynamic(backend="onnxruntime", per_channel=False, reduce_range=True))
    assert reduced.config["onnx"]["reduce_range"] and not reduced.config["onnx"]["per_channel"]
    assert "7-bit" in reduced.notes[0]


def test_a_selection_that_splits_an_attention_block_is_honoured_unfused(tokenizer):
    _, _, summary = _quantized(tokenizer, Int8Dynamic(backend="onnxruntime", include=("*.query", "*.intermediate.dense")))
    assert summary.modules == sorted(f"bert.encoder.layer.{i}.{m}" for i in range(LAYERS)
                                     for m in ("attention.self.query", "intermediate.dense"))
    assert summary.config["onnx"]["fused"] == {}
    assert summary.config["onnx"]["int8_nodes"] == {"MatMulInteger": 2 * LAYERS}
    assert any("fusion skipped" in n for n in summary.notes)


def test_attention_node_maps_back_to_its_projections():
    names = {f"bert.encoder.layer.0.attention.self.{p}" for p in ("query", "key", "value")} | {"bert.pooler.dense"}
    got = ortfuse.attention_modules("/model/bert/encoder/layer.0/attention/self/Reshape_3_output_0", names)
    assert got == tuple(sorted(names - {"bert.pooler.dense"}))
    assert ortfuse.attention_modules("Attention_0_output", names) == ()
    assert ortfuse.optimizer_type(type("C", (), {"model_type": "gpt2"})()) is None


@pytest.mark.parametrize("make", [
    lambda: Int8Dynamic(backend="torch", reduce_range=True), lambda: Int8Dynamic(fuse="yes"),
    lambda: Int8Dynamic(per_channel=1),
])
def test_refuses_bad_int8_options(make):
    with pytest.raises(TightropeError) as err:
        make()
    assert "\n" not in str(err.value) and str(err.value).endswith(".")


def test_a_head_exported_as_gemm_stays_fp32_and_is_reported(tokenizer):
    _, _, summary = _quantized(tokenizer, Int8Dynamic(backend="onnxruntime", include=("*",)))
    record = summary.config["onnx"]
    assert record["fused"].get("Attention") == LAYERS  # the head does not cost the encoder its fusion
    assert record["fp32_chosen_modules"] == ["bert.pooler.dense", "classifier"]
    assert "classifier" not in summary.modules and any("stay fp32" in n for n in summary.notes)


def test_cli_spec_reaches_the_ort_options():
    from tightrope.compress.specs import quant_config

    assert quant_config("int8-ort:fuse=false,per_channel=false,reduce_range=true") == Int8Dynamic(
        backend="onnxruntime", fuse=False, per_channel=False, reduce_range=True)
    assert quant_config("int8") == Int8Dynamic()


def test_structured_pruning_keeps_the_fused_graph_with_the_kept_heads(tokenizer, tmp_path):
    """Structured pruning keeps the same number of heads in every layer; the optimizer is given that
    count (with the config's, the fused fp32 graph tracked torch at 29 dB on this model instead of
    132 dB), so the pruned model still gets QAttention, and the fused graph computes what torch does."""
    from tightrope.compress.prune import StructuredPruning

    model = make_tiny_classifier(tokenizer, layers=LAYERS)
    compress_(model, StructuredPruning(heads=0.5, ffn=0.25))
    assert model.bert.encoder.layer[0].attention.self.query.out_features < model.config.hidden_size
    heads, width = ortfuse.attention_geometry(model)
    assert width == model.bert.encoder.layer[0].attention.self.query.out_features
    assert heads == width // (model.config.hidden_size // model.config.num_attention_heads)
    inputs = _padded(tokenizer, "right")
    onnxrt.export_onnx(model, tmp_path / "p.onnx", attn_implementation="eager")
    fused = ortfuse.fuse(tmp_path / "p.onnx", tmp_path / "p.fused.onnx", model)
    assert fused.get("Attention") == LAYERS
    session = onnxrt.ort_session((tmp_path / "p.fused.onnx").read_bytes())
    with torch.no_grad():
        assert P.sqnr_db(model(**inputs).logits, onnxrt.run_session(session, inputs["input_ids"], inputs["attention_mask"])) > 80
    pruned = copy.deepcopy(model)
    summary = compress_(model, Int8Dynamic(backend="onnxruntime"))
    assert summary.config["onnx"]["int8_nodes"].get("QAttention") == LAYERS
    with torch.no_grad():
        assert P.sqnr_db(pruned(**inputs).logits, model(**inputs).logits) > 25
    clf = inference.load(str(formats.save_compressed(model, tokenizer, tmp_path / "pq")))
    assert torch.allclose(clf.forward_ids(inputs["input_ids"], inputs["attention_mask"]), model(**inputs).logits, atol=1e-5)


def test_layers_with_different_head_counts_keep_the_unfused_graph(tokenizer):
    """One head count per fused graph: a model whose layers kept different numbers of heads is
    quantized unfused, and the summary says why."""
    model = make_tiny_classifier(tokenizer, layers=LAYERS)
    from tightrope.compress import structured

    layer = structured.encoder_layers(model)[0]
    heads = layer.attention.self.num_attention_heads
    ffn = layer.intermediate.dense.out_features
    structured.prune_layer_(layer, structured.layout_of(model), torch.arange(1, heads), torch.arange(ffn))  # layer 0 loses a head
    pruned = copy.deepcopy(model)
    summary = compress_(model, Int8Dynamic(backend="onnxruntime"))
    assert summary.config["onnx"]["fused"] == {} and any("different numbers of attention heads" in n for n in summary.notes)
    inputs = _padded(tokenizer, "right")
    with torch.no_grad():
        assert P.sqnr_db(pruned(**inputs).logits, model(**inputs).logits) > 25


def test_the_onnx_runtime_twin_gives_pytorchs_logits_and_keeps_the_models_encoding(tokenizer):
    """The exact fast path for attacks: the fp32 graph on ONNX Runtime, checked against PyTorch."""
    from tightrope.compress.onnxrt import OnnxClassifier, onnx_twin

    clf = inference.TextClassifier(make_tiny_classifier(tokenizer), tokenizer, max_length=32, truncation="head+tail",
                                   source="tiny", input_transform=lambda texts: [t.upper() for t in texts])
    fast, gap = onnx_twin(clf, POSITIVE + NEGATIVE)
    assert isinstance(fast, OnnxClassifier) and gap <= 1e-4
    assert fast.truncation == "head+tail" and fast.input_transform is clf.input_transform and fast.source == "tiny"
    assert fast.predict(POSITIVE + NEGATIVE) == clf.predict(POSITIVE + NEGATIVE)
    with pytest.raises(TightropeError, match="differ from PyTorch's"):
        onnx_twin(clf, POSITIVE, tolerance=-1.0)
    with pytest.raises(TightropeError, match="not a full-precision PyTorch classifier"):
        onnx_twin(fast, POSITIVE)


def test_the_first_token_graph_drops_the_last_layers_other_rows_and_keeps_the_logits(tokenizer):
    """fp32_graph(first_token=True): the last layer unfused (it attends from one row), every logit PyTorch's."""
    from tightrope.compress.onnxrt import fp32_graph, ort_session, run_session

    model = make_tiny_classifier(tokenizer, layers=3)
    inputs = _padded(tokenizer, "right")
    with torch.no_grad():
        expected = model(**inputs).logits
    for first_token, fused_attention in ((False, 3), (True, 2)):
        blob, fusions = fp32_graph(model, first_token=first_token)
        assert fusions.get("Attention", 0) == fused_attention
        got = run_session(ort_session(blob, 1), inputs["input_ids"], inputs["attention_mask"])
        assert torch.allclose(got, expected, atol=1e-5)
