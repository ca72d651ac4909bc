"""Which GGML type llama-quantize writes for each weight under a preset such as ``Q4_K_M``, as llama.cpp decides.

A llama-quantize preset (``LLAMA_FTYPE_MOSTLY_Q4_K_M`` ...) is not one type: it mixes types per tensor.
This module mirrors ``llama_tensor_get_type_impl`` and ``tensor_type_fallback`` of llama.cpp's
``src/llama-quant.cpp`` (the llama.cpp that llama-cpp-python 0.3.36 vendors) for the k-quant presets below,
for dense models (no experts), without an importance matrix and without user overrides
(``--tensor-type``, ``--pure``, ``--output-tensor-type``), which is what ``llama-quantize in.gguf out.gguf
Q4_K_M`` does:

- the preset's base type everywhere (Q4_K for ``Q4_K_*``, Q5_K for ``Q5_K_*``, Q6_K for ``Q6_K``), except
- ``attn_v``: ``Q4_K_M`` / ``Q5_K_M`` take Q6_K in the layers where ``use_more_bits`` holds (the first and
  last eighth of the layers and every third one between); ``Q4_K_S`` takes Q5_K in its first 4 layers;
- ``ffn_down``: ``Q4_K_M`` / ``Q5_K_M`` take Q6_K where ``use_more_bits`` holds; ``Q4_K_S`` takes Q5_K in
  the first eighth;
- ``attn_qkv`` (a fused projection): Q5_K under ``Q4_K_M``, Q6_K under ``Q5_K_M``;
- the output matrix, and the token embeddings of a model without one (tied): Q6_K, or Q8_0 when its rows are
  no multiple of 256;
- then, a k-quant whose super-blocks of 256 do not divide the rows falls back to its legacy type
  (:func:`tightrope.compress.gguf.tensor_type`: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0).

The layer index of ``attn_v`` and ``ffn_down`` is llama.cpp's running count of those tensors, which for a dense
model is the block index. Tensor roles are read from GGUF names (``blk.3.attn_v.weight``) or from the module
names transformers gives Llama-style decoders (``model.layers.3.self_attn.v_proj``) and BERT encoders
(``encoder.layer.3.attention.self.value``), which ``convert_hf_to_gguf.py`` renames so.
``benchmarks/llamacpp_check.py`` compares every type and byte with what llama-quantize writes.

Why this is hand-written: llama.cpp makes this choice in C++ inside ``llama_model_quantize`` with no API that
returns the per-tensor types without quantizing a whole file, and the attack needs them before any file exists.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from tightrope.compress.gguf import MIXED_PRESETS, TYPES, BlockType, gguf_type, tensor_type
from tightrope.compress.gguf_k import K_TYPES, KType
from tightrope.errors import TightropeError, did_you_mean

#: The presets tightrope maps, with their base type. The legacy presets (``Q4_0`` ...) give every Linear layer
#: their one type and differ only in the output matrix (Q6_K, or Q8_0 where the rows are no multiple of 256).
PRESETS: dict[str, str] = {"Q4_K_S": "Q4_K", "Q4_K_M": "Q4_K", "Q5_K_S": "Q5_K", "Q5_K_M": "Q5_K", "Q6_K": "Q6_K",
                           **{t: t for t in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")}}
#: The mixed presets by scheme name (``gguf-q4_k_m``), the spelling of the attacks and the audit (a legacy preset
#: is its type's scheme, ``gguf-q4_0``, for every layer they quantize).
PRESET_SCHEMES: dict[str, str] = {f"gguf-{p.lower()}": p for p in MIXED_PRESETS}

#: llama.cpp tensor roles (``tensor_category``) by the last parts of a transformers module name.
_ROLES = (
    (r"self_attn\.q_proj|attention\.self\.query", "attn_q"),
    (r"self_attn\.k_proj|attention\.self\.key", "attn_k"),
    (r"self_attn\.v_proj|attention\.self\.value", "attn_v"),
    (r"self_attn\.qkv_proj|attn\.c_attn", "attn_qkv"),
    (r"self_attn\.o_proj|attention\.output\.dense", "attn_output"),
    (r"mlp\.gate_proj", "ffn_gate"),
    (r"mlp\.up_proj|intermediate\.dense", "ffn_up"),
    (r"mlp\.down_proj|(?<!attention\.)output\.dense", "ffn_down"),
    (r"lm_head", "output"),
    (r"embed_tokens|word_embeddings", "token_embd"),
)
_LAYER = re.compile(r"(?:^|\.)(?:layers?|blk)\.(\d+)\.")
_GGUF_NAME = re.compile(r"(?:blk\.\d+\.)?(attn_q|attn_k|attn_v|attn_qkv|attn_output|ffn_gate|ffn_up|ffn_down|output|"
                        r"token_embd)\.weight")


@dataclass(frozen=True)
class TensorRole:
    """A weight as llama-quantize sees it: its role (``attn_v``, ``ffn_down``, ``other`` ...) and block index."""

    role: str
    layer: int | None


def preset_name(text: str) -> str:
    """``"Q4_K_M"``, ``"q4_k_m"``, ``"gguf-q4_k_m"`` or ``"gguf:Q4_K_M"`` -> ``"Q4_K_M"``; anything else is one
    sentence with the closest preset."""
    key = text.strip().upper().removeprefix("GGUF-").removeprefix("GGUF:")
    if key in PRESETS:
        return key
    raise TightropeError(f"Unknown llama-quantize preset '{text}'{did_you_mean(key, PRESETS)}; tightrope maps "
                         f"{', '.join(PRESETS)}.")


def tensor_role(module_name: str) -> TensorRole:
    """The llama.cpp role and block index of a weight named as GGUF or transformers names it (module docstring)."""
    found = _LAYER.search(module_name)
    layer = int(found.group(1)) if found else None
    if gguf := _GGUF_NAME.fullmatch(module_name):
        return TensorRole(gguf.group(1), layer)
    for pattern, role in _ROLES:
        if re.search(rf"(?:^|\.)(?:{pattern})$", module_name):
            return TensorRole(role, layer)
    return TensorRole("other", layer)


def use_more_bits(layer: int, n_layers: int) -> bool:
    """llama-quant.cpp's ``use_more_bits``: the first and last eighth of the layers, and every third between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def preset_type(preset: str, role: TensorRole, n_layers: int, row_length: int, *, tied: bool = False) -> BlockType | KType:
    """The type llama-quantize writes for one weight of ``role`` with rows of ``row_length`` values; ``tied``: the
    model has no output matrix, so its token embeddings are quantized as one."""
    preset = preset_name(preset)
    name = PRESETS[preset]
    layer = role.layer if role.layer is not None else 0
    if role.role == "output" or (tied and role.role == "token_embd"):
        if row_length % (256 if name in K_TYPES else 32):
            name = "Q8_0"
        elif name != "Q8_0":
            name = "Q6_K"
    elif role.role == "attn_v":
        if preset in ("Q4_K_M", "Q5_K_M") and use_more_bits(layer, n_layers):
            name = "Q6_K"
        elif preset == "Q4_K_S" and layer < 4:
            name = "Q5_K"
    elif role.role == "ffn_down":
        if preset in ("Q4_K_M", "Q5_K_M") and use_more_bits(layer, n_layers):
            name = "Q6_K"
        elif preset == "Q4_K_S" and layer < n_layers // 8:
            name = "Q5_K"
    elif role.role == "attn_qkv":
        name = {"Q4_K_M": "Q5_K", "Q5_K_M": "Q6_K"}.get(preset, name)
    return tensor_type(name, row_length)


def layer_types(shapes: Iterable[tuple[str, tuple[int, ...]]], preset: str) -> dict[str, str]:
    """``{module name: type name}`` for weights given as ``(name, (out, in))``, under ``preset``; the number of
    layers is read from the names (one more than the largest block index), and the embeddings count as tied when
    no weight is the output matrix."""
    shapes = list(shapes)
    roles = {name: tensor_role(name) for name, _ in shapes}
    n_layers = 1 + max((r.layer for r in roles.values() if r.layer is not None), default=0)
    tied = not any(r.role == "output" for r in roles.values())
    return {name: preset_type(preset, roles[name], n_layers, shape[-1], tied=tied).name for name, shape in shapes}


def has_box(name: str) -> bool:
    """Whether the quantization-conditioned attack has exact boxes for a type (``Q5_0``) or scheme (``gguf-q5_0``):
    the legacy types do, the k-quants do not (their scale search moves with the other weights;
    docs/qattack-results.md; their error-based boxes, :mod:`tightrope.qattack.kquant_boxes`, are opt-in)."""
    return gguf_type(name).name in TYPES
