"""``tightrope export``: the thing that ships. An ONNX Runtime bundle that runs without torch.

The bundle (layout in :mod:`tightrope.serving`) holds the fused int8 graph of the ONNX Runtime
path (:func:`tightrope.compress.onnxrt.to_onnxruntime_int8_`, reused as is) with one change: the
word-embedding table, a quarter to a half of a small encoder's weights (MiniLM: 11.7M of 22.7M
parameters), is stored as int8 rows with one fp32 scale per row and read by a *quantized gather*::

    rows  = Gather(table_int8, input_ids)             # (B, T, H) int8: only the rows of this batch
    scale = Unsqueeze(Gather(row_scale, input_ids))    # (B, T, 1)
    word  = Mul(Cast(rows, float), scale)              # (B, T, H) fp32

Symmetric per-row quantization (scale = max|row| / 127) keeps each token's vector to within half a
step of its own range; the whole table is never dequantized, so the session holds it in int8 too.
``embeddings="int4"`` stores two 4-bit codes per byte (scale = max|row| / 7) and unpacks the
gathered rows in the graph (Floor / Sub on the byte values), halving the table again.
ONNX Runtime's fused ``EmbedLayerNormalization`` reads only fp32 tables, so where the optimizer
made one it is replaced by its parts: the quantized gather, the position rows (a slice of the
table, or a gather when the node takes position ids), the token-type rows, their sum and a
``LayerNormalization`` with the node's epsilon.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np

from tightrope import inference, transforms
from tightrope.atomic import replaced_dir
from tightrope.compress import Int8Dynamic, compress_, onnxrt, quant
from tightrope.errors import TightropeError
from tightrope.serving.bundle import BUNDLE_FORMAT, MODEL_FILE, TOKENIZER_FILE

EMBEDDING_CHOICES = ("int8", "int4", "fp32")
PRECISIONS = ("int8", "fp32")
CARD_KEYS = ("tokenization", "task", "data", "label_names", "metrics", "base_model", "recovery", "source", "structure")


def quantize_rows(table: np.ndarray, bits: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row quantization: ``(q, scale)`` with ``table ~= q * scale[:, None]`` and ``q`` an
    int8 array in [-qmax, qmax], qmax = 2**(bits-1) - 1 (127 for 8 bits, 7 for 4). An all-zero row
    gets scale 1 (its codes are 0)."""
    qmax = 2 ** (bits - 1) - 1
    table = np.asarray(table, dtype=np.float32)
    absmax = np.abs(table).max(axis=1)
    scale = np.where(absmax > 0, absmax / qmax, 1.0).astype(np.float32)
    q = np.clip(np.rint(table / scale[:, None]), -qmax, qmax).astype(np.int8)
    return q, scale


def pack_int4(q: np.ndarray) -> np.ndarray:
    """Two 4-bit codes per byte, offset by 8: byte j of a row holds ``q[2j] + 8`` in its low nibble and
    ``q[2j+1] + 8`` in its high one. (V, H) int8 in [-7, 7] -> (V, H/2) uint8."""
    if q.shape[1] % 2:
        raise TightropeError(f"4-bit rows need an even width; the table is {q.shape[1]} wide: use --embeddings int8.")
    u = (q.astype(np.int16) + 8).astype(np.uint8)
    return (u[:, 0::2] | (u[:, 1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pack_int4` (what the graph computes, in numpy)."""
    lo = (packed & 15).astype(np.int8) - 8
    hi = (packed >> 4).astype(np.int8) - 8
    return np.stack([lo, hi], axis=-1).reshape(packed.shape[0], -1)


def _consumers(graph, name: str) -> list:
    return [n for n in graph.node if name in n.input]


def _graph_outputs(graph) -> set[str]:
    return {o.name for o in graph.output}


def _quantized_gather(helper, prefix: str, table: str, scale: str, ids: str, out: str, consts: dict[str, str],
                      bits: int) -> list:
    """Nodes computing ``out = rows of table at ids, times their scale`` (B, T, H) without dequantizing the table.
    4-bit rows are unpacked after the gather: for a byte x, low = x - 16 * floor(x / 16), high = floor(x / 16)."""
    nodes = [helper.make_node("Gather", [table, ids], [f"{prefix}rows"], name=f"{prefix}Gather_rows", axis=0),
             helper.make_node("Cast", [f"{prefix}rows"], [f"{prefix}rows_fp32"], name=f"{prefix}Cast_rows", to=1)]
    codes = f"{prefix}rows_fp32"
    if bits == 4:
        nodes += [
            helper.make_node("Div", [codes, consts["sixteen"]], [f"{prefix}hi_frac"], name=f"{prefix}Div_16"),
            helper.make_node("Floor", [f"{prefix}hi_frac"], [f"{prefix}hi"], name=f"{prefix}Floor_hi"),
            helper.make_node("Mul", [f"{prefix}hi", consts["sixteen"]], [f"{prefix}hi16"], name=f"{prefix}Mul_16"),
            helper.make_node("Sub", [codes, f"{prefix}hi16"], [f"{prefix}lo"], name=f"{prefix}Sub_lo"),
            helper.make_node("Unsqueeze", [f"{prefix}lo", consts["axes_last"]], [f"{prefix}lo_4d"], name=f"{prefix}Unsqueeze_lo"),
            helper.make_node("Unsqueeze", [f"{prefix}hi", consts["axes_last"]], [f"{prefix}hi_4d"], name=f"{prefix}Unsqueeze_hi"),
            helper.make_node("Concat", [f"{prefix}lo_4d", f"{prefix}hi_4d"], [f"{prefix}pairs"], name=f"{prefix}Concat_pairs", axis=-1),
            helper.make_node("Reshape", [f"{prefix}pairs", consts["shape_bt_"]], [f"{prefix}offset_codes"], name=f"{prefix}Reshape_codes"),
            helper.make_node("Sub", [f"{prefix}offset_codes", consts["eight"]], [f"{prefix}codes"], name=f"{prefix}Sub_offset"),
        ]
        codes = f"{prefix}codes"
    return nodes + [
        helper.make_node("Gather", [scale, ids], [f"{prefix}scale"], name=f"{prefix}Gather_scale", axis=0),
        helper.make_node("Unsqueeze", [f"{prefix}scale", consts["axes_last"]], [f"{prefix}scale_3d"], name=f"{prefix}Unsqueeze_scale"),
        helper.make_node("Mul", [codes, f"{prefix}scale_3d"], [out], name=f"{prefix}Mul_scale"),
    ]


def quantize_word_embeddings_(model_proto, bits: int = 8) -> dict:
    """Replace the fp32 word-embedding table of an exported classifier graph by an int8 table (or a
    4-bit one, two codes per byte) with per-row scales read through a quantized gather (in place).
    Returns a record of what changed.

    Handles the fused graph (``EmbedLayerNormalization``, decomposed as the module docstring says)
    and the unfused one (a ``Gather`` on ``*word_embeddings*``)."""
    from onnx import helper, numpy_helper  # noqa: PLC0415

    graph = model_proto.graph
    inits = {i.name: i for i in graph.initializer}
    fused = [n for n in graph.node if n.op_type == "EmbedLayerNormalization"]
    if len(fused) > 1:
        raise TightropeError("The graph has several embedding layers; export handles one.")
    if fused:
        node = fused[0]
        table_name = node.input[2]
    else:
        gathers = [n for n in graph.node if n.op_type == "Gather" and n.input[0] in inits and "word_embeddings" in n.input[0]]
        if len(gathers) != 1:
            raise TightropeError("No word-embedding lookup was found in the exported graph, so its table cannot be quantized.")
        node = gathers[0]
        table_name = node.input[0]
    if table_name not in inits:
        raise TightropeError(f"The word-embedding table {table_name} is not a stored weight of the graph.")
    if len(_consumers(graph, table_name)) != 1:
        raise TightropeError(f"The word-embedding table {table_name} is read by more than one node (tied weights); "
                             "export keeps such tables fp32: use --embeddings fp32.")
    table = numpy_helper.to_array(inits[table_name])
    q, scale = quantize_rows(table, bits)
    stored = pack_int4(q) if bits == 4 else q
    prefix = "tightrope/word_embeddings/"
    q_name, s_name = f"{prefix}table_{'int4x2' if bits == 4 else 'int8'}", f"{prefix}row_scale"
    consts = {"axes_last": np.array([-1], dtype=np.int64), "sixteen": np.array(16.0, dtype=np.float32),
              "eight": np.array(8.0, dtype=np.float32), "shape_bt_": np.array([0, 0, -1], dtype=np.int64)}
    names = {k: f"{prefix}{k}" for k in consts}
    new_inits = [numpy_helper.from_array(stored, q_name), numpy_helper.from_array(scale, s_name)]
    new_inits += [numpy_helper.from_array(v, names[k]) for k, v in consts.items() if bits == 4 or k == "axes_last"]
    if fused:
        used_later = {o for n in graph.node if n is not node for o in n.input} | _graph_outputs(graph)
        extra = [o for o in list(node.output)[1:] if o and o in used_later]
        if extra:
            raise TightropeError(f"The fused embedding node also feeds {extra[0]}, which export cannot rebuild; "
                                 "use --embeddings fp32.")
        ids = node.input[0]
        inputs = list(node.input) + [""] * (9 - len(node.input))
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-12)
        nodes = _quantized_gather(helper, prefix, q_name, s_name, ids, f"{prefix}word", names, bits)
        if inputs[8]:  # explicit position ids
            nodes.append(helper.make_node("Gather", [inputs[3], inputs[8]], [f"{prefix}position"], name=f"{prefix}Gather_position", axis=0))
        else:  # positions 0 .. T-1, as EmbedLayerNormalization reads them
            zero, axis0 = f"{prefix}zero", f"{prefix}axis0"
            new_inits += [numpy_helper.from_array(np.array([0], dtype=np.int64), zero),
                          numpy_helper.from_array(np.array([0], dtype=np.int64), axis0)]
            nodes += [helper.make_node("Shape", [ids], [f"{prefix}seq_len"], name=f"{prefix}Shape_seq", start=1, end=2),
                      helper.make_node("Slice", [inputs[3], zero, f"{prefix}seq_len", axis0], [f"{prefix}position"],
                                       name=f"{prefix}Slice_position")]
        nodes.append(helper.make_node("Add", [f"{prefix}word", f"{prefix}position"], [f"{prefix}sum"], name=f"{prefix}Add_position"))
        summed = f"{prefix}sum"
        if inputs[4] and inputs[1]:  # token-type rows
            nodes += [helper.make_node("Gather", [inputs[4], inputs[1]], [f"{prefix}type"], name=f"{prefix}Gather_type", axis=0),
                      helper.make_node("Add", [summed, f"{prefix}type"], [f"{prefix}sum_type"], name=f"{prefix}Add_type")]
            summed = f"{prefix}sum_type"
        nodes.append(helper.make_node("LayerNormalization", [summed, inputs[5], inputs[6]], [node.output[0]],
                                      name=f"{prefix}LayerNormalization", axis=-1, epsilon=eps))
    else:
        nodes = _quantized_gather(helper, prefix, q_name, s_name, node.input[1], node.output[0], names, bits)
    position = list(graph.node).index(node)
    graph.node.remove(node)
    for offset, new in enumerate(nodes):
        graph.node.insert(position + offset, new)
    graph.initializer.remove(inits[table_name])
    graph.initializer.extend(new_inits)
    err = np.abs(q.astype(np.float32) * scale[:, None] - table)
    return {"table": table_name, "bits": bits, "rows": int(table.shape[0]), "width": int(table.shape[1]),
            "fused_node_replaced": bool(fused), "fp32_bytes": int(table.nbytes), "quantized_bytes": int(stored.nbytes + scale.nbytes),
            "max_abs_error": float(err.max()), "max_error_in_steps": float((err / scale[:, None]).max())}


def _source_graph(model: str, precision: str = "int8"):
    """``(graph bytes, tokenizer, config, card, compression history)`` of the int8 ONNX Runtime
    variant of ``model``: read from an ``onnx-int8`` directory, or built from a PyTorch model (fp32
    or structurally pruned) by the existing fused int8 path. ``precision="fp32"`` builds the fused
    fp32 graph instead (for comparison)."""

    path = Path(model).expanduser()
    if path.is_dir() and inference.read_card(path).get("format") == BUNDLE_FORMAT:
        raise TightropeError(f"{model} is already a bundle; export takes the model it was made from.")
    clf = inference.load(model)
    card = dict(clf.card)
    fmt = card.get("format", "torch")
    if fmt == onnxrt.ONNX_FORMAT and precision == "fp32":
        raise TightropeError(f"{model} is already int8; an fp32 bundle is made from the fp32 model.")
    if fmt == onnxrt.ONNX_FORMAT:
        from transformers import AutoConfig  # noqa: PLC0415

        return (path / "model.onnx").read_bytes(), clf.tokenizer, AutoConfig.from_pretrained(str(path)), card, card.get("compression", [])
    if not hasattr(clf.model, "named_modules") or quant.quantized_modules(clf.model):
        raise TightropeError(f"{model} is stored as '{fmt}'; export takes an fp32 or pruned PyTorch model, "
                             "or an int8 ONNX Runtime one (tightrope compress --quantize int8).")
    history = list(card.get("compression") or [])
    if history:
        clf.model._tightrope_compression = history
    if precision == "fp32":
        blob, fusions = onnxrt.fp32_graph(clf.model)
        return blob, clf.tokenizer, clf.model.config, card, history + [{"method": "fp32 ONNX export", "fused": fusions}]
    compress_(clf.model, Int8Dynamic(backend="onnxruntime"))
    return quant.onnx_bytes(clf.model), clf.tokenizer, clf.model.config, card, getattr(clf.model, "_tightrope_compression", history)


def bundle_sizes(path: str | Path) -> dict[str, int]:
    """Bytes of each file in a bundle folder and their ``total``."""
    files = {p.name: p.stat().st_size for p in sorted(Path(path).iterdir()) if p.is_file()}
    return {**files, "total": sum(files.values())}


def export_bundle(model: str, out: str | Path, *, embeddings: Literal["int8", "int4", "fp32"] = "int8",
                  precision: Literal["int8", "fp32"] = "int8") -> dict:
    """Write the ONNX Runtime bundle of ``model`` to ``out`` (atomically: a temp folder renamed at the
    end) and return its card. ``embeddings="int4"`` stores the word-embedding rows in 4 bits (two
    per byte, per-row scale), ``"fp32"`` keeps the table as exported;
    ``precision="fp32"`` ships the fused fp32 graph (embeddings fp32 too), the baseline to compare with."""
    import onnx  # noqa: PLC0415
    import onnxruntime  # noqa: PLC0415

    if embeddings not in EMBEDDING_CHOICES:
        raise TightropeError(f"--embeddings takes {' or '.join(EMBEDDING_CHOICES)}, not '{embeddings}'.")
    if precision not in PRECISIONS:
        raise TightropeError(f"--precision takes {' or '.join(PRECISIONS)}, not '{precision}'.")
    if precision == "fp32":
        embeddings = "fp32"
    out = Path(out).expanduser()
    blob, tokenizer, config, source_card, history = _source_graph(model, precision)
    if not getattr(tokenizer, "is_fast", False):
        raise TightropeError(f"{model} has a slow (Python) tokenizer; a bundle needs a fast one with a tokenizer.json.")
    proto = onnx.load_from_string(blob)
    record = quantize_word_embeddings_(proto, bits=int(embeddings[3:])) if embeddings != "fp32" else {"kept": "fp32"}
    onnx.checker.check_model(proto)
    tok = dict(source_card.get("tokenization") or {})
    limit = getattr(config, "max_position_embeddings", None)
    max_length = int(tok.get("max_length", 256))
    if limit and max_length > limit:
        max_length = int(limit)
    tok.update({"max_length": max_length, "truncation": tok.get("truncation", "head")})
    card = {k: source_card[k] for k in CARD_KEYS if k in source_card}
    card.update({"kind": "tightrope.bundle", "format": BUNDLE_FORMAT, "created_by": "tightrope export",
                 "source": str(model), "tokenization": tok,
                 "pad_id": int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0),
                 "label_names": [config.id2label[i] for i in range(config.num_labels)],
                 "precision": precision, "compression": history, "word_embeddings": {"storage": embeddings, **record},
                 "runtime": {"onnxruntime": onnxruntime.__version__, "inputs": ["input_ids", "attention_mask"],
                             "outputs": ["logits"]}})
    entry = source_card.get("input_transform")
    transform = transforms.load(Path(model).expanduser(), entry) if entry else None  # checked against its hash
    if transform is not None:  # a defense that rewrites the input ships inside the bundle
        card["input_transform"] = transform.card_entry()
    with replaced_dir(out) as tmp:
        for name, payload in (transform.files() if transform is not None else {}).items():
            (tmp / name).write_text(json.dumps(payload))
        onnx.save_model(proto, str(tmp / MODEL_FILE))
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:  # the same tokenizer without the indentation (~35% of the file)
            backend.save(str(tmp / TOKENIZER_FILE), pretty=False)
        if not (tmp / TOKENIZER_FILE).is_file():
            raise TightropeError(f"{model}'s tokenizer wrote no {TOKENIZER_FILE}, which the bundle's runtime needs.")
        card["sizes"] = bundle_sizes(tmp)  # before the card itself is written: the card's own size is not in it
        (tmp / "card.json").write_text(json.dumps(card, indent=2, default=str))
    return card
