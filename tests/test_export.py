"""`tightrope export`: the ONNX Runtime bundle, its int8 word embeddings, and the torch-free runtime that reads it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import NEGATIVE, POSITIVE, make_tiny_classifier
from tightrope import inference
from tightrope.compress import Int8Dynamic, compress_
from tightrope.compress.export import bundle_sizes, export_bundle, quantize_rows
from tightrope.errors import TightropeError
from tightrope.models import save_model
from tightrope.serving import Bundle
from tightrope.serving.bundle import length_buckets, pad_batch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

LONG = "the plot drags on and on " * 60 + "but the ending is wonderful"
TEXTS = POSITIVE + NEGATIVE + [LONG, "ok", "word " * 300]


def _model_dir(tmp_path, tokenizer, *, seed=1, scale=5.0, max_length=64, truncation="head+tail"):
    """A tiny BERT whose weights are scaled x5 so that its logits depend on every token (cf. test_onnx_int8)."""
    model = make_tiny_classifier(tokenizer, seed=seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                module.weight.mul_(scale)
    card = {"tokenization": {"max_length": max_length, "truncation": truncation}, "task": "tiny"}
    return save_model((model, tokenizer), tmp_path / f"tiny-{seed}", extra={"card.json": card})


def _in_process_int8(path):
    clf = inference.load(str(path))
    compress_(clf.model, Int8Dynamic(backend="onnxruntime"))
    return clf


def test_quantize_rows_is_within_half_a_step_per_row():
    rng = np.random.default_rng(0)
    table = rng.normal(size=(50, 16)).astype(np.float32) * rng.uniform(0.01, 10, size=(50, 1)).astype(np.float32)
    table[3] = 0.0
    q, scale = quantize_rows(table)
    assert q.dtype == np.int8 and scale.shape == (50,) and np.abs(q).max() <= 127
    err = np.abs(q * scale[:, None] - table)
    assert (err <= scale[:, None] / 2 + 1e-6).all()
    assert (q[3] == 0).all() and scale[3] == 1.0


def test_bundle_predictions_equal_the_in_process_int8_model(tmp_path, tokenizer):
    """The bundle's graph is the in-process int8 graph: with fp32 embeddings its logits are the same
    numbers. With int8 word embeddings (the default) each looked-up vector moves by at most half a
    step of its row: on this model (logits up to ~0.36) the logits move by at most 0.003 (measured);
    the test allows 0.01, and every prediction is the same."""
    src = _model_dir(tmp_path, tokenizer)
    clf = _in_process_int8(src)
    ref = clf.logits(TEXTS).numpy()
    fp32 = Bundle(export_bundle(str(src), tmp_path / "b-fp32", embeddings="fp32") and tmp_path / "b-fp32")
    assert fp32.encode(TEXTS) == clf.encode(TEXTS)
    np.testing.assert_allclose(fp32.logits(TEXTS), ref, atol=1e-6, rtol=0)
    card = export_bundle(str(src), tmp_path / "b")
    bundle = Bundle(tmp_path / "b")
    out = bundle.logits(TEXTS)
    assert np.abs(out - ref).max() < 0.01
    assert (out.argmax(1) == ref.argmax(1)).all()
    assert [p["label"] for p in bundle.predict(TEXTS)] == [clf.label_names[i] for i in ref.argmax(1)]
    emb = card["word_embeddings"]
    assert emb["storage"] == "int8" and emb["fused_node_replaced"] and emb["max_error_in_steps"] <= 0.5 + 1e-4
    assert card["format"] == "onnx-bundle" and card["tokenization"] == {"max_length": 64, "truncation": "head+tail"}


def test_int8_embeddings_are_a_quarter_of_the_table(tmp_path, tokenizer):
    import onnx

    src = _model_dir(tmp_path, tokenizer)
    export_bundle(str(src), tmp_path / "fp32", embeddings="fp32")
    card = export_bundle(str(src), tmp_path / "int8")
    emb = card["word_embeddings"]
    saved = bundle_sizes(tmp_path / "fp32")["model.onnx"] - bundle_sizes(tmp_path / "int8")["model.onnx"]
    assert saved > 0.99 * (emb["fp32_bytes"] - emb["quantized_bytes"])
    assert emb["quantized_bytes"] == emb["rows"] * emb["width"] + 4 * emb["rows"]
    graph = onnx.load(str(tmp_path / "int8" / "model.onnx")).graph
    ops = [n.op_type for n in graph.node]
    assert "EmbedLayerNormalization" not in ops and "LayerNormalization" in ops
    gather = next(n for n in graph.node if n.name == "tightrope/word_embeddings/Gather_rows")
    table = next(i for i in graph.initializer if i.name == gather.input[0])
    assert table.data_type == onnx.TensorProto.INT8
    assert not any(i.name.endswith("word_embeddings.weight") for i in graph.initializer)


@pytest.mark.parametrize("truncation", ["head", "head+tail"])
def test_bundle_tokenizes_as_the_model_was_trained(tmp_path, tokenizer, truncation):
    src = _model_dir(tmp_path, tokenizer, max_length=24, truncation=truncation)
    export_bundle(str(src), tmp_path / "b", embeddings="fp32")
    bundle = Bundle(tmp_path / "b")
    clf = inference.load(str(src))
    texts = TEXTS + ["", "  ", "Ünïcödé — “quotes” and emoji 🙂 " * 5]
    assert bundle.encode(texts) == clf.encode(texts)
    assert max(len(s) for s in bundle.encode(texts)) == 24


def test_length_buckets_pad_each_batch_only_to_its_longest(tmp_path, tokenizer):
    lengths = [5, 40, 6, 39, 7, 41]
    batches = length_buckets(lengths, 2)
    assert [[lengths[i] for i in b] for b in batches] == [[5, 6], [7, 39], [40, 41]]
    ids, mask = pad_batch([[1] * 5, [1] * 6], pad_id=0)
    assert ids.shape == (2, 6) and mask.sum() == 11
    src = _model_dir(tmp_path, tokenizer)
    export_bundle(str(src), tmp_path / "b")
    bundle = Bundle(tmp_path / "b")
    # dynamic int8 picks one activation scale per batch, so a text's logits move slightly with its
    # batch-mates (here by up to 0.0025, measured); labels do not move
    one_by_one = np.concatenate([bundle.logits([t], batch_size=1) for t in TEXTS])
    batched = bundle.logits(TEXTS, batch_size=4)
    np.testing.assert_allclose(batched, one_by_one, atol=0.01)
    assert (batched.argmax(1) == one_by_one.argmax(1)).all()


def test_export_refuses_what_it_cannot_ship_and_leaves_nothing(tmp_path, tokenizer):
    src = _model_dir(tmp_path, tokenizer)
    export_bundle(str(src), tmp_path / "b")
    with pytest.raises(TightropeError, match="already a bundle"):
        export_bundle(str(tmp_path / "b"), tmp_path / "again")
    with pytest.raises(TightropeError, match="--embeddings"):
        export_bundle(str(src), tmp_path / "x", embeddings="int2")
    assert not (tmp_path / "again").exists() and not (tmp_path / "x").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: p / "missing", "does not exist"),
    (lambda p: (p / "f.txt").write_text("x") and p / "f.txt", "is a file"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "not a tightrope bundle"),
])
def test_a_folder_that_is_not_a_bundle_is_one_sentence(tmp_path, make, message):
    with pytest.raises(TightropeError, match=message):
        Bundle(make(tmp_path))


def test_a_model_folder_is_not_a_bundle(tmp_path, tiny_model_dir):
    with pytest.raises(TightropeError, match="not a tightrope bundle"):
        Bundle(tiny_model_dir)


OPTIMUM_SCRIPT = """
import json, sys
from optimum.onnxruntime import ORTModelForSequenceClassification
from transformers import AutoTokenizer
model = ORTModelForSequenceClassification.from_pretrained(sys.argv[1])
tok = AutoTokenizer.from_pretrained(sys.argv[1])
texts = json.loads(sys.argv[2])
batch = tok(texts, padding=True, truncation=True, max_length=int(sys.argv[3]), return_tensors="np")
print(json.dumps({"class": type(model).__name__, "logits": model(**batch).logits.tolist()}))
"""


def test_optimum_loads_the_bundle(tmp_path, tokenizer):
    """optimum-onnx 0.1.0 pins transformers < 4.58 while tightrope needs 5, so it rarely shares
    tightrope's environment: the check runs in this one where optimum imports, else in the Python
    named by $TIGHTROPE_OPTIMUM_PYTHON (a venv with optimum-onnx), else it is skipped."""
    python = os.environ.get("TIGHTROPE_OPTIMUM_PYTHON")
    if python is None:
        try:
            import optimum.onnxruntime  # noqa: F401
        except ImportError:
            pytest.skip("optimum-onnx is not installed here (set TIGHTROPE_OPTIMUM_PYTHON to a venv that has it)")
        python = sys.executable
    src = _model_dir(tmp_path, tokenizer, truncation="head")
    export_bundle(str(src), tmp_path / "b")
    texts = POSITIVE + NEGATIVE
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    done = subprocess.run([python, "-c", OPTIMUM_SCRIPT, str(tmp_path / "b"), json.dumps(texts), "64"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["class"] == "ORTModelForSequenceClassification"
    np.testing.assert_allclose(np.array(result["logits"]), Bundle(tmp_path / "b").logits(texts), atol=1e-5)


def test_fp32_bundle_computes_the_torch_model(tmp_path, tokenizer):
    src = _model_dir(tmp_path, tokenizer)
    card = export_bundle(str(src), tmp_path / "fp32", precision="fp32")
    assert card["precision"] == "fp32" and card["word_embeddings"]["storage"] == "fp32"
    clf = inference.load(str(src))
    np.testing.assert_allclose(Bundle(tmp_path / "fp32").logits(TEXTS), clf.logits(TEXTS).numpy(), atol=1e-4)


def test_export_command_writes_the_bundle(tmp_path, tokenizer):
    from typer.testing import CliRunner

    from tightrope.cli import app

    src = _model_dir(tmp_path, tokenizer)
    result = CliRunner().invoke(app, ["export", str(src), "--out", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    assert "model.onnx" in result.output and Bundle(tmp_path / "b").predict(["great"])[0]["label"]
    result = CliRunner().invoke(app, ["export", str(tmp_path / "missing"), "--out", str(tmp_path / "c")])
    assert result.exit_code == 2 and "Traceback" not in result.output and not (tmp_path / "c").exists()


def test_int4_rows_pack_two_codes_per_byte():
    from tightrope.compress.export import pack_int4, unpack_int4

    rng = np.random.default_rng(0)
    q = rng.integers(-7, 8, size=(20, 6)).astype(np.int8)
    packed = pack_int4(q)
    assert packed.dtype == np.uint8 and packed.shape == (20, 3)
    np.testing.assert_array_equal(unpack_int4(packed), q)
    with pytest.raises(TightropeError, match="even width"):
        pack_int4(q[:, :5])


def test_int4_bundle_unpacks_exactly_what_was_packed(tmp_path, tokenizer):
    """The graph's 4-bit gather gives exactly unpack(codes) * scale for each token; end to end, the
    int4 bundle computes the in-process int8 model whose word embeddings were set to their 4-bit
    values, up to float rounding of the decomposed embedding LayerNorm that dynamic int8 activation
    quantization can amplify (at most 4e-4 here, measured; the test allows 2e-3; labels equal)."""
    import onnx
    import onnxruntime as ort
    from onnx.utils import extract_model

    from tightrope.compress.export import pack_int4, unpack_int4

    src = _model_dir(tmp_path, tokenizer)
    card = export_bundle(str(src), tmp_path / "b4", embeddings="int4")
    assert card["word_embeddings"]["bits"] == 4
    clf = inference.load(str(src))
    emb = clf.model.bert.embeddings.word_embeddings
    q, scale = quantize_rows(emb.weight.detach().numpy(), bits=4)
    expected_rows = unpack_int4(pack_int4(q)).astype(np.float32) * scale[:, None]
    graph = onnx.load(str(tmp_path / "b4" / "model.onnx")).graph
    ids_name = next(n for n in graph.node if n.name == "tightrope/word_embeddings/Gather_rows").input[1]
    extract_model(str(tmp_path / "b4" / "model.onnx"), str(tmp_path / "gather.onnx"), [ids_name],
                  ["tightrope/word_embeddings/word"])
    ids = np.array([[101, 2023, 3185, 2001, 6919, 102], [0, 1, 2, 30000, 30521, 7]], dtype=np.int32)
    (word,) = ort.InferenceSession(str(tmp_path / "gather.onnx")).run(None, {ids_name: ids})
    np.testing.assert_array_equal(word, expected_rows[ids])
    with torch.no_grad():
        emb.weight.copy_(torch.from_numpy(expected_rows))
    compress_(clf.model, Int8Dynamic(backend="onnxruntime"))
    ref = clf.logits(TEXTS).numpy()
    out = Bundle(tmp_path / "b4").logits(TEXTS)
    np.testing.assert_allclose(out, ref, atol=2e-3)
    assert (out.argmax(1) == ref.argmax(1)).all()
    b8 = tmp_path / "b8"
    export_bundle(str(src), b8)
    assert bundle_sizes(tmp_path / "b4")["model.onnx"] < bundle_sizes(b8)["model.onnx"]


def test_quantized_gather_in_an_unfused_graph(tmp_path, tokenizer):
    """Where the graph cannot be fused (e.g. layers pruned to different head counts), the word
    embeddings are a plain Gather: it is replaced by the quantized gather, and the graph computes the
    torch model whose table holds the dequantized rows."""
    import onnx
    import onnxruntime as ort

    from tightrope.compress import onnxrt
    from tightrope.compress.export import quantize_word_embeddings_

    model = make_tiny_classifier(tokenizer, seed=2)
    onnxrt.export_onnx(model, tmp_path / "raw.onnx")
    proto = onnx.load(str(tmp_path / "raw.onnx"))
    record = quantize_word_embeddings_(proto)
    assert not record["fused_node_replaced"]
    onnx.checker.check_model(proto)
    emb = model.bert.embeddings.word_embeddings
    q, scale = quantize_rows(emb.weight.detach().numpy())
    with torch.no_grad():
        emb.weight.copy_(torch.from_numpy(q.astype(np.float32) * scale[:, None]))
    batch = tokenizer(TEXTS[:6], padding=True, return_tensors="np")
    feeds = {"input_ids": batch["input_ids"].astype(np.int64), "attention_mask": batch["attention_mask"].astype(np.int64)}
    (out,) = ort.InferenceSession(proto.SerializeToString()).run(None, feeds)
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(feeds["input_ids"]), attention_mask=torch.from_numpy(feeds["attention_mask"])).logits
    np.testing.assert_allclose(out, ref.numpy(), atol=1e-5)


def test_a_defense_on_the_input_ships_inside_the_bundle(tmp_path, tokenizer):
    """A model whose card names an input transform exports it into the bundle, and the torch-free
    runtime applies it: synonyms in one cluster give the same prediction."""
    from conftest import make_tiny_classifier

    from tightrope.models import save_model
    from tightrope.serving import Bundle
    from tightrope.transforms import SynonymEncoding

    transform = SynonymEncoding({"superb": "good", "great": "good"})
    card = {"kind": "tightrope.model", "tokenization": {"max_length": 32, "truncation": "head"},
            "input_transform": transform.card_entry()}
    model_dir = save_model((make_tiny_classifier(tokenizer), tokenizer), tmp_path / "defended",
                           extra={**transform.files(), "card.json": card})
    export_bundle(str(model_dir), tmp_path / "bundle")
    bundle = Bundle(tmp_path / "bundle", threads=1)
    assert bundle.input_transform is not None and bundle.input_transform(["a superb film"]) == ["a good film"]
    assert bundle.encode(["a superb film"]) == bundle.encode(["a good film"])
    assert np.array_equal(bundle.logits(["a great film"]), bundle.logits(["a good film"]))


def test_randomized_smoothing_ships_inside_the_bundle_and_answers_as_in_torch(tmp_path, tokenizer):
    """A smoothed model (SAFER) exported as a bundle: the torch-free runtime draws the same seeded copies
    and averages their probabilities as the torch classifier does (fp32 bundle: equal to 1e-4)."""
    from conftest import make_tiny_classifier

    from tightrope import inference
    from tightrope.models import save_model
    from tightrope.serving import Bundle
    from tightrope.transforms import Smoothing, SynonymEncoding

    smoothing = Smoothing({"superb": ["great", "fine"], "film": ["movie", "picture"], "dull": ["boring"]}, 0.5, 6, seed=4)
    transform = SynonymEncoding({"great": "good"}, smoothing=smoothing)
    card = {"kind": "tightrope.model", "tokenization": {"max_length": 32, "truncation": "head"},
            "input_transform": transform.card_entry()}
    model_dir = save_model((make_tiny_classifier(tokenizer), tokenizer), tmp_path / "smoothed",
                           extra={**transform.files(), "card.json": card})
    export_bundle(str(model_dir), tmp_path / "bundle", precision="fp32")
    bundle = Bundle(tmp_path / "bundle", threads=1)
    texts = ["a superb film", "a dull film, a dull evening", "superb"]
    assert bundle.input_transform.smoothing.copies == 6
    torch_logits = inference.load(str(model_dir)).logits(texts).numpy()
    np.testing.assert_allclose(bundle.logits(texts), torch_logits, atol=1e-4)
