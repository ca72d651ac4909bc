"""Saving and reloading quantized models, and the ONNX Runtime int8 variant.

A quantized PyTorch model is written as ``model.safetensors`` (codes, scales and the untouched
full-precision tensors; never a pickle) + ``config.json`` + the tokenizer + ``card.json`` with
``"format": "tightrope-quant"``, the ``"compression"`` history and a ``"quantized"`` map from module
name to its kind. :func:`load_quantized` rebuilds the architecture from ``config.json`` (and the
pruning plan, when a structurally pruned model was quantized), puts an empty quantized module of
the recorded kind at each recorded name, and loads every tensor strictly.

The ONNX Runtime variant is ``model.onnx`` (ORT dynamic int8 MatMuls) + tokenizer + card with
``"format": "onnx-int8"``; :class:`OnnxClassifier` runs it behind the same ``TextClassifier`` face.
Both loaders are registered with :func:`tightrope.inference.register_format`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from tightrope.compress import quant
from tightrope.errors import TightropeError
from tightrope.inference import TextClassifier, register_format

QUANT_FORMAT = "tightrope-quant"
ONNX_FORMAT = "onnx-int8"


def _dyn_linear():
    from torch.ao.nn.quantized.dynamic import Linear  # noqa: PLC0415

    return Linear


# --- tensors of a quantized model -------------------------------------------------------------


def module_kind(module: nn.Module) -> dict | None:
    """The record that lets :func:`_empty_module` rebuild a quantized module, or None for others."""
    if isinstance(module, quant.AffineQuantLinear):
        return {"kind": "affine", "in": module.in_features, "out": module.out_features, "bits": module.bits,
                "group": module.group, "groups": module.scale.shape[1], "rows": module.scale.shape[0],
                "bias": module.bias is not None}
    if isinstance(module, _dyn_linear()):
        qw = module.weight()
        per_channel = qw.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric)
        return {"kind": "torch-dynamic-int8", "in": module.in_features, "out": module.out_features,
                "per_channel": per_channel, "bias": module.bias() is not None}
    kinds = quant.quantized_kinds()
    if isinstance(module, kinds):
        bnb = quant._bnb()
        if isinstance(module, bnb.nn.Linear8bitLt):
            return {"kind": "bnb-int8", "in": module.in_features, "out": module.out_features,
                    "threshold": float(module.state.threshold), "bias": module.bias is not None}
        if isinstance(module, bnb.nn.Linear4bit):
            qs = module.weight.quant_state
            return {"kind": "bnb-4bit", "in": module.in_features, "out": module.out_features, "quant_type": qs.quant_type,
                    "blocksize": qs.blocksize, "double_quant": bool(qs.nested), "bias": module.bias is not None}
    return None


def quantized_modules(model: nn.Module) -> dict[str, dict]:
    return {name: rec for name, m in model.named_modules() if (rec := module_kind(m)) is not None}


def tensors_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor needed to rebuild ``model``, with torch dynamic int8 weights unpacked to
    ``weight_int8`` / ``weight_scale`` (their packed form is not a tensor)."""
    records = quantized_modules(model)
    dyn = {n for n, r in records.items() if r["kind"] == "torch-dynamic-int8"}
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if not isinstance(value, torch.Tensor) or any(key.startswith(n + ".") for n in dyn):
            continue
        out[key] = value
    for name in dyn:
        module = model.get_submodule(name)
        qw = module.weight()
        out[f"{name}.weight_int8"] = qw.int_repr()
        if records[name]["per_channel"]:
            out[f"{name}.weight_scale"] = qw.q_per_channel_scales().float()
        else:
            out[f"{name}.weight_scale"] = torch.tensor([qw.q_scale()], dtype=torch.float32)
        if module.bias() is not None:
            out[f"{name}.bias"] = module.bias().detach()
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def stored_bytes(model: nn.Module) -> int:
    """Bytes of the tensors a saved model holds (the ONNX file's size for an ORT variant)."""
    blob = quant.onnx_bytes(model)
    if blob is not None:
        return len(blob)
    return sum(t.numel() * t.element_size() for t in tensors_of(model).values())


def _empty_module(record: dict, tensors: dict[str, torch.Tensor], name: str) -> nn.Module:
    kind = record["kind"]
    bias = tensors.get(f"{name}.bias")
    if kind == "affine":
        mod = quant.AffineQuantLinear(record["in"], record["out"], record["bits"], record["group"], record["groups"],
                                      record["rows"], record["bias"])
        return mod
    if kind == "torch-dynamic-int8":
        Dyn = _dyn_linear()
        mod = Dyn(record["in"], record["out"], bias_=record["bias"], dtype=torch.qint8)
        ints = tensors[f"{name}.weight_int8"]
        scale = tensors[f"{name}.weight_scale"].double()
        if record["per_channel"]:
            qw = torch._make_per_channel_quantized_tensor(ints, scale, torch.zeros_like(scale, dtype=torch.long), 0)
        else:
            qw = torch._make_per_tensor_quantized_tensor(ints, float(scale[0]), 0)
        mod.set_weight_bias(qw, bias)
        return mod
    bnb = quant._bnb()
    if kind == "bnb-int8":
        mod = bnb.nn.Linear8bitLt(record["in"], record["out"], bias=record["bias"], has_fp16_weights=False,
                                  threshold=record["threshold"])
        cb = tensors[f"{name}.weight"]
        mod.weight = bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=tensors[f"{name}.SCB"])
        if bias is not None:
            mod.bias = nn.Parameter(bias, requires_grad=False)
        return mod.eval()
    if kind == "bnb-4bit":
        from tightrope.compress import bnb4  # noqa: PLC0415 - bitsandbytes is imported only where used

        return bnb4.from_prequantized(record["in"], record["out"], bias, record["quant_type"], record["double_quant"],
                                      tensors, name)
    raise TightropeError(f"The saved module {name} has the unknown quantized kind '{kind}'.")


# --- save / load --------------------------------------------------------------------------------


def _atomic_dir(out: Path):
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))


def _finish(tmp: Path, out: Path) -> Path:
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def save_compressed(model: nn.Module, tokenizer, out_dir: str | Path, card: dict | None = None,
                    files: dict | None = None) -> Path:
    """Write a compressed model so that :func:`tightrope.inference.load` reloads it.

    Quantized models get the ``tightrope-quant`` (or ``onnx-int8``) format; a model that is only
    pruned is written by the pruning module's saver (its own format). ``files`` (name -> JSON payload)
    go beside card.json: the resources of an input transform (:func:`tightrope.inference.transform_files`).
    """
    out = Path(out_dir)
    card = {"kind": "tightrope.model", "created_by": "tightrope compress", **(card or {})}
    history = getattr(model, "_tightrope_compression", None)
    if history:
        card["compression"] = history
    structure = None
    try:
        from tightrope.compress import prune  # noqa: PLC0415

        structure = prune.structure_of(model)
    except ImportError:  # pragma: no cover
        prune = None
    blob = quant.onnx_bytes(model)
    records = quantized_modules(model)
    if blob is None and not records:
        if prune is None:  # pragma: no cover
            raise TightropeError("Nothing to save: the model holds no quantized module.")
        return prune.save_pruned(model, tokenizer, out, card, files=files)
    tmp = _atomic_dir(out)
    try:
        tokenizer.save_pretrained(tmp)
        model.config.save_pretrained(tmp)
        if blob is not None:
            (tmp / "model.onnx").write_bytes(blob)
            card["format"] = ONNX_FORMAT
        else:
            from safetensors.torch import save_file  # noqa: PLC0415

            save_file(tensors_of(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
            card["format"] = QUANT_FORMAT
            card["quantized"] = records
            if structure is not None:
                card["structure"] = structure
        for name, payload in (files or {}).items():
            (tmp / name).write_text(json.dumps(payload))
        (tmp / "card.json").write_text(json.dumps(card, indent=2, default=str))
        return _finish(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def load_quantized(path: str | Path, card: dict | None = None):
    """Rebuild a ``tightrope-quant`` model directory: ``(model, tokenizer)``."""
    from safetensors.torch import load_file  # noqa: PLC0415
    from transformers import AutoConfig, AutoModelForSequenceClassification  # noqa: PLC0415

    from tightrope import models  # noqa: PLC0415
    from tightrope.inference import read_card  # noqa: PLC0415

    path = Path(path).expanduser()
    card = card if card is not None else read_card(path)
    records = card.get("quantized") or {}
    weights = path / "model.safetensors"
    if not weights.exists():
        raise TightropeError(f"{path} holds no model.safetensors, so it is not a saved quantized model.")
    config = AutoConfig.from_pretrained(str(path))
    model = AutoModelForSequenceClassification.from_config(config)
    if card.get("structure"):
        from tightrope.compress import prune  # noqa: PLC0415

        prune.apply_structure_(model, card["structure"])
    tensors = load_file(str(weights))
    dyn = [n for n, r in records.items() if r["kind"] == "torch-dynamic-int8"]
    for name, record in records.items():
        if name not in dyn:  # torch's packed modules go in after loading: they cannot load a plain state
            quant._set_submodule(model, name, _empty_module(record, tensors, name))
    bnb_names = [n for n, r in records.items() if r["kind"].startswith("bnb")]
    rest = {k: v for k, v in tensors.items() if not any(k.startswith(n + ".") for n in dyn + bnb_names)}
    result = model.load_state_dict(rest, strict=False)
    missing = [k for k in result.missing_keys if not any(k.startswith(n + ".") for n in dyn + bnb_names)]
    if missing or result.unexpected_keys:
        raise TightropeError(
            f"The weights in {path} do not match its card: missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}."
        )
    for name in dyn:
        quant._set_submodule(model, name, _empty_module(records[name], tensors, name))
    model.eval()
    model._tightrope_compression = card.get("compression", [])
    tokenizer = models.load_tokenizer(str(path))
    return model, tokenizer


def _clf(model, tokenizer, path: Path, card: dict, label_names=None) -> TextClassifier:
    tok = card.get("tokenization", {})
    return TextClassifier(model, tokenizer, max_length=tok.get("max_length", 256), truncation=tok.get("truncation", "head"),
                          label_names=label_names, source=str(path), card=card)


@register_format(QUANT_FORMAT)
def _load_quant_classifier(path: Path, card: dict) -> TextClassifier:
    model, tokenizer = load_quantized(path, card)
    return _clf(model, tokenizer, path, card)


# --- ONNX Runtime dynamic int8 -----------------------------------------------------------------


class _LogitsOnly(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def onnx_node_module(node_name: str) -> str:
    """``/model/bert/encoder/layer.0/attention/self/query/MatMul`` -> ``bert.encoder.layer.0.attention.self.query``."""
    from tightrope.compress.ortfuse import node_module  # noqa: PLC0415

    return node_module(node_name)


def export_onnx(model: nn.Module, path: Path, opset: int = 17, attn_implementation: str | None = None) -> None:
    """TorchScript-based ONNX export with dynamic batch and sequence axes (node names keep module paths).

    ``attn_implementation="eager"`` exports the explicit softmax attention that ONNX Runtime's
    transformer optimizer can fuse; the model's own setting is restored afterwards.
    """
    ids = torch.ones(1, 16, dtype=torch.long)
    mask = torch.ones(1, 16, dtype=torch.long)
    previous = getattr(getattr(model, "config", None), "_attn_implementation", None)
    switch = attn_implementation is not None and previous != attn_implementation and hasattr(model, "set_attn_implementation")
    if switch:
        model.set_attn_implementation(attn_implementation)
    try:
        with torch.no_grad():
            torch.onnx.export(_LogitsOnly(model).eval(), (ids, mask), str(path), input_names=["input_ids", "attention_mask"],
                              output_names=["logits"], opset_version=opset, dynamo=False,
                              dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
                                            "logits": {0: "batch"}})
    finally:
        if switch:
            model.set_attn_implementation(previous)


def ort_session(blob: bytes, threads: int | None = None):
    """A CPU InferenceSession with the options every tightrope ONNX Runtime path shares
    (:func:`tightrope.serving.bundle.session_options`), ``threads`` intra-op threads (torch's thread
    count by default)."""
    from tightrope.serving.bundle import ort_session as _session  # noqa: PLC0415

    return _session(blob, threads or torch.get_num_threads())


def run_session(session, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    feeds = {"input_ids": input_ids.long().numpy(), "attention_mask": attention_mask.long().numpy()}
    return torch.from_numpy(session.run(["logits"], feeds)[0]).float()


def to_onnxruntime_int8_(model: nn.Module, chosen: dict[str, nn.Module], config) -> "quant.CompressionSummary":
    """Export ``model`` to ONNX, optionally fuse its transformer blocks (``config.fuse``, see
    :mod:`tightrope.compress.ortfuse`), quantize the chosen Linear layers' MatMul / fused Attention
    nodes with ONNX Runtime's dynamic int8 (``onnxruntime.quantization.quantize_dynamic``), and make
    ``model`` run that session.

    The PyTorch weights are released (``model.forward`` now calls the session), so the model is
    an ORT variant from here on; :func:`save_compressed` writes it as ``model.onnx``, and the
    compression record in its card says how the graph was built (fusions, per channel, range).
    """
    import onnx  # noqa: PLC0415
    import onnxruntime  # noqa: PLC0415
    from onnxruntime.quantization import QuantType, quantize_dynamic  # noqa: PLC0415
    from transformers.modeling_outputs import SequenceClassifierOutput  # noqa: PLC0415

    from tightrope.compress import ortfuse  # noqa: PLC0415

    notes: list[str] = []
    fuse = bool(getattr(config, "fuse", False))
    reason = ortfuse.unfusable_reason(model) if fuse else None
    if reason:
        fuse = False
        notes.append(f"fusion skipped: {reason}; quantized the unfused graph")
    linear_names = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    with tempfile.TemporaryDirectory() as tmp:
        fp32, fused, int8 = Path(tmp) / "model.onnx", Path(tmp) / "model.fused.onnx", Path(tmp) / "model.int8.onnx"
        fusions: dict[str, int] = {}
        if fuse:
            export_onnx(model, fp32, attn_implementation="eager")
            fusions = ortfuse.fuse(fp32, fused, model)
            nodes, mixed, left = ortfuse.nodes_to_quantize(onnx.load(str(fused)).graph, set(chosen), linear_names)
            if mixed:  # a fused Attention mixes chosen and unchosen projections: honour the selection instead
                notes.append(f"fusion skipped: {mixed[0]} shares a fused Attention node with modules not selected")
                fusions = {}
            else:
                fp32 = fused
        if not fusions:
            export_onnx(model, fp32)
            nodes, _, left = ortfuse.nodes_to_quantize(onnx.load(str(fp32)).graph, set(chosen), linear_names)
        if not nodes:
            raise TightropeError("ONNX export kept no MatMul of the chosen modules; use backend='torch' for this model.")
        quantize_dynamic(str(fp32), str(int8), op_types_to_quantize=["MatMul", "Attention"], nodes_to_quantize=nodes,
                         per_channel=config.per_channel, reduce_range=getattr(config, "reduce_range", False),
                         weight_type=QuantType.QInt8, extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        blob = int8.read_bytes()
        qgraph = onnx.load(str(int8))
    quantized = sum(len(i.raw_data) or 0 for i in qgraph.graph.initializer if i.name.endswith("_quantized"))
    consts = sum(len(i.raw_data) or 4 * len(i.float_data) for i in qgraph.graph.initializer if i.name.endswith("_scale"))
    int8_modules = {n: m for n, m in chosen.items() if n not in left}
    logical = sum(m.weight.numel() for m in int8_modules.values())
    session = ort_session(blob)

    def forward(input_ids=None, attention_mask=None, **_):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return SequenceClassifierOutput(logits=run_session(session, input_ids.cpu(), attention_mask.cpu()))

    total = sum(m.in_features * m.out_features for m in chosen.values())
    for lin in chosen.values():  # the session owns the weights now
        lin.weight = nn.Parameter(torch.empty(0), requires_grad=False)
    model._tightrope_onnx = blob
    model.forward = forward
    ops = {}
    for node in qgraph.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    record = {"onnxruntime": onnxruntime.__version__, "fused": fusions, "per_channel": config.per_channel,
              "reduce_range": getattr(config, "reduce_range", False), "weight_type": "int8",
              "int8_nodes": {k: ops[k] for k in ("QAttention", "DynamicQuantizeMatMul", "MatMulInteger") if k in ops},
              "fp32_chosen_modules": left}
    if left:
        notes.append(f"{len(left)} chosen modules stay fp32 ({', '.join(left[:3])}): ONNX Runtime's dynamic int8 "
                     "covers MatMul and Attention nodes, not Gemm")
    config_record = {**config.to_dict(), "onnx": record}
    return quant.CompressionSummary(
        method=config.method, config=config_record, modules=sorted(int8_modules), bits=8 * (quantized + consts) / max(logical, 1),
        simulated=False, parameters=sum(p.numel() for p in model.parameters()) + total,
        nonzero_parameters=sum(int(torch.count_nonzero(p)) for p in model.parameters()) + total,
        stored_bytes=len(blob),
        notes=[f"backend onnxruntime {onnxruntime.__version__}: "
               + (f"graph fused ({', '.join(f'{k} {v}' for k, v in fusions.items())}), " if fusions else "unfused graph, ")
               + f"{len(nodes)} nodes int8 ({'per channel' if config.per_channel else 'per tensor'}"
               + (", reduced 7-bit range" if record["reduce_range"] else "") + f"), {quantized} bytes of int8 weights; "
               "the model now runs an InferenceSession", *notes],
    )


class OnnxClassifier(TextClassifier):
    """A ``TextClassifier`` whose forward pass is an ONNX Runtime session (no gradients)."""

    def __init__(self, session, tokenizer, label_names: list[str], **kwargs):
        super().__init__(None, tokenizer, label_names=label_names, **kwargs)
        self.session = session

    def forward_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return run_session(self.session, input_ids, attention_mask)


@register_format(ONNX_FORMAT)
def _load_onnx_classifier(path: Path, card: dict) -> TextClassifier:
    from transformers import AutoConfig, AutoTokenizer  # noqa: PLC0415

    file = path / "model.onnx"
    if not file.exists():
        raise TightropeError(f"{path} says its format is {ONNX_FORMAT} but holds no model.onnx.")
    if not quant._onnxruntime_available():
        raise TightropeError(f"{path} needs onnxruntime, which is not installed: pip install onnx onnxruntime.")
    config = AutoConfig.from_pretrained(str(path))
    labels = [config.id2label[i] for i in range(config.num_labels)]
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    tok = card.get("tokenization", {})
    return OnnxClassifier(ort_session(file.read_bytes()), tokenizer, labels, max_length=tok.get("max_length", 256),
                          truncation=tok.get("truncation", "head"), source=str(path), card=card)
