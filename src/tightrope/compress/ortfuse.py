"""Transformer graph fusion for the ONNX Runtime int8 path, before dynamic quantization.

ONNX Runtime's transformer optimizer (``onnxruntime.transformers.optimizer.optimize_model``) rewrites
an exported BERT-like graph into fused CPU kernels: ``EmbedLayerNormalization`` (embedding sum +
LayerNorm), ``Attention`` (the Q, K and V projections in one GEMM with the scaled dot-product,
mask and softmax), ``BiasGelu`` and ``SkipLayerNormalization`` (residual add + LayerNorm).
Quantizing that graph then turns each fused ``Attention`` into ``QAttention`` (one int8 GEMM for
Q, K and V) and every remaining projection ``MatMul`` into ``MatMulInteger`` (run as
``DynamicQuantizeMatMul`` once the session fuses it with its input quantization): dynamic
int8 in the sense of Jacob et al. (2018), with per-batch activation scales.

The optimizer recognises the attention pattern of transformers' *eager* attention, not of its SDPA
export, so the graph is exported with ``attn_implementation="eager"`` (the arithmetic is the same).
The raw 2-D attention mask is kept (``AttentionMaskFormat.AttentionMask``), so padding may sit on
either side; the optimizer's BERT default (a 1-D "mask index") would assume right padding.
"""

from __future__ import annotations

from pathlib import Path

from tightrope.errors import TightropeError

# transformers model_type -> the optimizer's model_type. Only BERT is enabled: it is the one checked
# here against torch (tests/test_onnx_int8.py); RoBERTa / DistilBERT-style encoders would need the
# same checks first (their position ids and attention blocks differ), and quantize unfused meanwhile.
OPTIMIZER_TYPES = {"bert": "bert"}

QKV_LEAVES = ("query", "key", "value", "q_lin", "k_lin", "v_lin")


def optimizer_type(config) -> str | None:
    """The optimizer model type for a transformers config, or None when no fusion is known for it."""
    return OPTIMIZER_TYPES.get(getattr(config, "model_type", None))


def heads_and_hidden(config) -> tuple[int, int]:
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_heads", None)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "dim", None)
    if not heads or not hidden:
        raise TightropeError("The model config names no attention head count and hidden size, so its graph cannot be fused.")
    return int(heads), int(hidden)


def attention_geometry(model) -> tuple[int, int] | str:
    """(heads, attention width) that every layer's self-attention shares, or why fusion cannot be used.

    Structured pruning removes heads, so Q, K and V may have fewer outputs than the hidden size. The
    optimizer reads the head count from its arguments (it cannot find it in the exported graph,
    whose reshapes use -1), so a model is fusable when every layer kept the same number of heads:
    the optimizer is then given that count and width (it warns that the width differs from the
    input's; ONNX Runtime's Attention takes the width from the fused QKV weight, and
    tests/test_onnx_int8.py checks the outputs against torch)."""
    if optimizer_type(model.config) is None:
        return f"no ONNX Runtime fusion known for model type {getattr(model.config, 'model_type', None)!r}"
    heads, hidden = heads_and_hidden(model.config)
    head_dim = hidden // heads
    widths: set[int] = set()
    for name, module in model.named_modules():
        if name.rpartition(".")[2] in QKV_LEAVES:
            widths.add(getattr(module, "out_features", hidden))
    if not widths:
        return "no query / key / value projections found"
    if len(widths) > 1:
        return f"layers keep different numbers of attention heads (Q, K, V widths {sorted(widths)})"
    width = widths.pop()
    if width % head_dim:
        return f"attention width {width} is not a whole number of {head_dim}-wide heads"
    return width // head_dim, width


def unfusable_reason(model) -> str | None:
    """Why ``model``'s graph must not be fused, or None (see :func:`attention_geometry`)."""
    geometry = attention_geometry(model)
    return geometry if isinstance(geometry, str) else None


def fuse(src: Path, dst: Path, model) -> dict[str, int]:
    """Write the fused graph of ``src`` (exported from ``model``) to ``dst``; return the count of each
    fused operator (non-zero ones)."""
    from onnxruntime.transformers.fusion_options import (  # noqa: PLC0415
        AttentionMaskFormat,
        FusionOptions,
    )
    from onnxruntime.transformers.optimizer import optimize_model  # noqa: PLC0415

    geometry = attention_geometry(model)
    if isinstance(geometry, str):
        raise TightropeError(f"This model's graph cannot be fused: {geometry}.")
    heads, width = geometry
    kind = optimizer_type(model.config)
    options = FusionOptions(kind)
    options.attention_mask_format = AttentionMaskFormat.AttentionMask
    optimized = optimize_model(str(src), model_type=kind, num_heads=heads, hidden_size=width, optimization_options=options)
    optimized.save_model_to_file(str(dst))
    return {k: int(v) for k, v in optimized.get_fused_operator_statistics().items() if v}


def node_module(name: str) -> str:
    """``/model/bert/encoder/layer.0/attention/self/query/MatMul`` -> ``bert.encoder.layer.0.attention.self.query``
    (the TorchScript exporter names nodes and tensors after the module path; ``model`` is the export wrapper)."""
    parts = [p for p in name.split("/") if p]
    if parts and parts[0] == "model":
        parts = parts[1:]
    return ".".join(parts[:-1])


def attention_modules(output_name: str, linear_names: set[str]) -> tuple[str, ...]:
    """The Q, K, V projection modules a fused ``Attention`` node replaced, found from the tensor it
    writes: the fusion keeps the output name of the attention block's last reshape, which carries
    the block's module path (``/model/bert/encoder/layer.0/attention/self/Reshape_3_output_0``)."""
    block = node_module(output_name)
    if not block:
        return ()
    return tuple(sorted(n for n in linear_names if n.rpartition(".")[0] == block and n.rpartition(".")[2] in QKV_LEAVES))


def nodes_to_quantize(graph, chosen: set[str], linear_names: set[str]) -> tuple[list[str], list[str], list[str]]:
    """Which graph nodes to quantize for the chosen Linear modules.

    Returns (names of the MatMul / Attention nodes that implement only chosen modules; chosen modules
    that share a fused Attention node with unchosen ones; chosen modules left in fp32 for any reason,
    e.g. a head exported as ``Gemm``, which ONNX Runtime's dynamic quantization does not cover).
    """
    picked: list[str] = []
    covered: set[str] = set()
    mixed: set[str] = set()
    for node in graph.node:
        if node.op_type == "MatMul" and node_module(node.name) in chosen:
            picked.append(node.name)
            covered.add(node_module(node.name))
        elif node.op_type == "Attention":
            mods = attention_modules(node.output[0], linear_names)
            if len(mods) == 3 and all(m in chosen for m in mods):
                picked.append(node.name)
                covered.update(mods)
            else:
                mixed.update(m for m in mods if m in chosen)
    return picked, sorted(mixed), sorted(chosen - covered)
