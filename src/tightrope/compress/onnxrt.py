"""Dynamic int8 (:class:`~tightrope.compress.quant.Int8Dynamic`): torch.ao's ``quantize_dynamic`` or
ONNX Runtime's, whose graph tightrope exports, fuses and saves as the ``onnx-int8`` format.

ONNX Runtime's ``DynamicQuantizeMatMul`` with per-channel symmetric weights was the fastest CPU int8
path measured (docs/benchmarks.md); the model then runs as an ``InferenceSession``
(:class:`OnnxClassifier`), loaded back with :func:`tightrope.inference.load`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn

from tightrope.compress import ortfuse
from tightrope.compress.api import CompressionSummary, register_handler, select_modules
from tightrope.compress.ortfuse import node_module
from tightrope.compress.quant import (
    Int8Dynamic,
    _onnxruntime_available,
    _refuse_requantize,
    _summary,
    resolve_backend,
)
from tightrope.errors import TightropeError
from tightrope.first_token import first_token_logits, supports as first_token_supports
from tightrope.inference import TextClassifier, register_format
from tightrope.serving.bundle import ort_session as _session

ONNX_FORMAT = "onnx-int8"


@register_handler(Int8Dynamic)
def _int8_dynamic(model: nn.Module, config: Int8Dynamic) -> CompressionSummary:
    _refuse_requantize(model, config)
    chosen = select_modules(model, config)
    backend = resolve_backend(config.backend)
    if backend == "onnxruntime":
        return to_onnxruntime_int8_(model, chosen, config)
    from torch.ao.quantization import (  # noqa: PLC0415
        default_dynamic_qconfig,
        per_channel_dynamic_qconfig,
        quantize_dynamic,
    )

    qconfig = per_channel_dynamic_qconfig if config.per_channel else default_dynamic_qconfig
    quantize_dynamic(model, {name: qconfig for name in chosen}, dtype=torch.qint8, inplace=True)
    return _summary(model, config, chosen, False,
                    [f"backend torch ({torch.backends.quantized.engine}); activations quantized per batch at run time"])


# --- ONNX Runtime dynamic int8 -----------------------------------------------------------------


class _LogitsOnly(nn.Module):
    """The export wrapper: ids and mask in, logits out; ``first_token`` computes the last layer for the [CLS]
    row only where :mod:`tightrope.first_token` covers the model."""

    def __init__(self, model: nn.Module, first_token: bool = False):
        super().__init__()
        self.model = model
        self.first_token = first_token and first_token_supports(model)

    def forward(self, input_ids, attention_mask):
        if self.first_token:
            return first_token_logits(self.model, input_ids, attention_mask)
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def onnx_node_module(node_name: str) -> str:
    """``/model/bert/encoder/layer.0/attention/self/query/MatMul`` -> ``bert.encoder.layer.0.attention.self.query``."""

    return node_module(node_name)


def export_onnx(model: nn.Module, path: Path, opset: int = 17, attn_implementation: str | None = None,
                first_token: bool = False) -> None:
    """TorchScript-based ONNX export with dynamic batch and sequence axes (node names keep module paths).

    ``attn_implementation="eager"`` exports the explicit softmax attention that ONNX Runtime's
    transformer optimizer can fuse; the model's own setting is restored afterwards. ``first_token``
    exports the last layer for the [CLS] row only (:mod:`tightrope.first_token`; the optimizer then fuses
    the attention of every layer but the last).
    """
    ids = torch.ones(1, 16, dtype=torch.long)
    mask = torch.ones(1, 16, dtype=torch.long)
    previous = getattr(getattr(model, "config", None), "_attn_implementation", None)
    switch = attn_implementation is not None and previous != attn_implementation and hasattr(model, "set_attn_implementation")
    if switch:
        model.set_attn_implementation(attn_implementation)
    try:
        with torch.no_grad():
            torch.onnx.export(_LogitsOnly(model, first_token).eval(), (ids, mask), str(path), input_names=["input_ids", "attention_mask"],
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

    return _session(blob, threads or torch.get_num_threads())


def run_session(session, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    feeds = {"input_ids": input_ids.long().numpy(), "attention_mask": attention_mask.long().numpy()}
    return torch.from_numpy(session.run(["logits"], feeds)[0]).float()


def to_onnxruntime_int8_(model: nn.Module, chosen: dict[str, nn.Module], config) -> "CompressionSummary":
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
    return CompressionSummary(
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
    if not _onnxruntime_available():
        raise TightropeError(f"{path} needs onnxruntime, which is not installed: pip install onnx onnxruntime.")
    config = AutoConfig.from_pretrained(str(path))
    labels = [config.id2label[i] for i in range(config.num_labels)]
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    tok = card.get("tokenization", {})
    return OnnxClassifier(ort_session(file.read_bytes()), tokenizer, labels, max_length=tok.get("max_length", 256),
                          truncation=tok.get("truncation", "head"), source=str(path), card=card)


def fp32_graph(model, first_token: bool = False) -> tuple[bytes, dict]:
    """The fp32 graph of a PyTorch model, fused by ONNX Runtime's transformer optimizer where it can be
    (the same graph the int8 path quantizes, unless ``first_token`` computes the last layer for the [CLS]
    row only), and the fusion counts."""

    with tempfile.TemporaryDirectory() as tmp:
        raw, fused = Path(tmp) / "model.onnx", Path(tmp) / "model.fused.onnx"
        if ortfuse.unfusable_reason(model) is None:
            export_onnx(model, raw, attn_implementation="eager", first_token=first_token)
            fusions = ortfuse.fuse(raw, fused, model)
            return fused.read_bytes(), fusions
        export_onnx(model, raw, first_token=first_token)
        return raw.read_bytes(), {}


def onnx_twin(clf: TextClassifier, probe: list[str], *, tolerance: float = 1e-4, threads: int | None = None) -> tuple[TextClassifier, float]:
    """The same fp32 PyTorch classifier run by ONNX Runtime on its fused fp32 graph: the exact fast path
    for attacks (its forward pass is the attack's cost, docs/benchmarks.md). Its logits on ``probe`` must
    match PyTorch's within ``tolerance``; returns ``(classifier, largest logit difference)``. The input
    transform, tokenization and source stay the model's."""
    if not isinstance(getattr(clf, "model", None), nn.Module) or type(clf) is not TextClassifier:
        raise TightropeError(f"{clf.source or 'this model'} is not a full-precision PyTorch classifier; "
                             "the ONNX Runtime path runs those only.")
    if not _onnxruntime_available():
        raise TightropeError("The onnxruntime path needs onnxruntime, which is not installed: pip install onnx onnxruntime.")
    blob, _ = fp32_graph(clf.model, first_token=clf.first_token_only)
    fast = OnnxClassifier(ort_session(blob, threads), clf.tokenizer, list(clf.label_names), max_length=clf.max_length,
                          truncation=clf.truncation, source=clf.source, card=clf.card, input_transform=clf.input_transform)
    with torch.inference_mode():
        gap = float((fast.logits(probe) - clf.logits(probe)).abs().max()) if probe else 0.0
    if not gap <= tolerance:
        raise TightropeError(f"ONNX Runtime's logits differ from PyTorch's by {gap:.3g} on this model (tolerance "
                             f"{tolerance:g}); attack it with --runtime torch.")
    return fast, gap
