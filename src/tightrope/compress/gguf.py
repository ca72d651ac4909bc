"""GGUF block quantization (llama.cpp's "legacy" block types Q8_0, Q4_0, Q4_1, Q5_0, Q5_1), bit for bit.

The block formats are llama.cpp's (``ggml/src/ggml-common.h``, ``block_q8_0`` ... ``block_q5_1``; the
reference quantizers are ``quantize_row_q*_ref`` in ``ggml/src/ggml-quants.c``). A weight tensor is cut,
row by row, into blocks of ``QK = 32`` consecutive values ``x_1 ... x_32`` (the row length must be a
multiple of 32), and each block is stored as an fp16 scale ``d`` (and an fp16 minimum ``m`` for the
``_1`` types) followed by 32 integer codes ``q_i``. In the notation of Egashira et al. 2024 (Sec. 3),
with all arithmetic in fp32 exactly as the C reference does it:

- ``Q8_0`` (34 bytes): ``d = absmax / 127``, ``q_i = roundf(x_i / d)`` in [-127, 127] (``roundf``
  rounds half away from zero; the division is ``x_i * (1 / d)``); stored as ``d`` then 32 int8.
- ``Q4_0`` (18 bytes) / ``Q5_0`` (22 bytes), ``b = 4 / 5`` bits, ``h = 2^(b-1)``: ``M`` is the block's
  value of largest magnitude *with its sign* (the first one on ties), ``d = M / -h``,
  ``q_i = min(2^b - 1, trunc(x_i / d + h + 1/2))``, so ``M`` itself gets code 0 and ``x = d (q - h)``.
- ``Q4_1`` (20 bytes) / ``Q5_1`` (24 bytes): ``m = min_i x_i``, ``d = (max_i x_i - m) / (2^b - 1)``,
  ``q_i = min(2^b - 1, trunc((x_i - m) / d + 1/2))`` and ``x = d q + m``.

``d = 0`` (an all-zero or constant block) uses ``1 / d = 0``. Codes are packed two per byte, element
``j`` in the low nibble and element ``j + 16`` in the high one; the 5-bit types keep the fifth bits in a
little-endian ``uint32`` ``qh`` (bit ``j`` for element ``j``) between the scales and the nibbles.

Why tightrope has its own implementation rather than calling ``gguf.quants`` (llama.cpp's Python
package, a numpy port of the same reference): the quantization-conditioned attack and its audit need,
for every weight, the interval of values that keeps every byte of its block unchanged (the "box",
:func:`tightrope.qattack.boxes.box_gguf`). That interval depends on the block's scale, its reciprocal,
which element sets the scale and how the codes are rounded; ``gguf.quants`` returns only the packed
bytes. The code here exposes those pieces (:func:`block_parameters`, :func:`block_codes`) and is
checked byte for byte against ``gguf.quants.quantize`` / ``dequantize`` in ``tests/test_gguf_quant.py``;
``gguf`` itself is used for reading GGUF files (:func:`read_gguf`).

The k-quants Q2_K ... Q6_K (super-blocks of 256) live in :mod:`tightrope.compress.gguf_k`, checked
against llama.cpp's own quantizer; :func:`quantize`, :func:`dequantize` and :func:`read_gguf` take them
too (``gguf_type``), while :func:`block_type` (the per-block parameters the boxes read) is legacy only.
The i-quants and ternary types are not implemented.
"""

from __future__ import annotations

import re

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tightrope.compress.gguf_k import K_TYPES, KType, dequantize_k, quantize_k
from tightrope.errors import TightropeError, did_you_mean

QK = 32  # values per block of every legacy type (QK8_0 = QK4_0 = ... = 32 in ggml-common.h)


@dataclass(frozen=True)
class BlockType:
    """One GGML block type: its name, GGMLQuantizationType value, bits per code and whether it has a min."""

    name: str
    type_id: int
    bits: int
    offset: bool  # the _1 types: an fp16 minimum m per block, codes unsigned from m

    @property
    def scheme(self) -> str:
        """The scheme name of :data:`tightrope.compress.specs.QUANT_SCHEMES` (``gguf-q4_0``)."""
        return f"gguf-{self.name.lower()}"

    @property
    def type_size(self) -> int:
        """Bytes per block: fp16 d, fp16 m (``_1``), the codes (5-bit: a uint32 of fifth bits, then nibbles)."""
        return 2 + 2 * self.offset + QK * self.bits // 8

    @property
    def top(self) -> int:
        """The largest unsigned code (2^b - 1); Q8_0's codes are signed, in [-127, 127]."""
        return 2 ** self.bits - 1


TYPES: dict[str, BlockType] = {t.name: t for t in (
    BlockType("Q8_0", 8, 8, False), BlockType("Q4_0", 2, 4, False), BlockType("Q4_1", 3, 4, True),
    BlockType("Q5_0", 6, 5, False), BlockType("Q5_1", 7, 5, True))}
#: The legacy block types' schemes (the ones with boxes, :func:`tightrope.qattack.boxes.box_gguf`).
SCHEMES: dict[str, BlockType] = {t.scheme: t for t in TYPES.values()}
#: The k-quant schemes (``gguf-q4_k`` ...): quantized, dequantized and read, but without boxes yet.
K_SCHEMES: dict[str, KType] = {t.scheme: t for t in K_TYPES.values()}
#: Every GGUF type tightrope quantizes, legacy and k-quant, by scheme name.
ALL_SCHEMES: dict[str, BlockType | KType] = {**SCHEMES, **K_SCHEMES}
#: llama-quantize presets that mix types per tensor and that :mod:`tightrope.compress.gguf_preset` maps.
MIXED_PRESETS = ("Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M")
#: GGML types a file may hold that tightrope reads as plain floats.
FLOAT_TYPES = {0: "F32", 1: "F16", 30: "BF16"}
_ALL_TYPES: dict[str, BlockType | KType] = {**TYPES, **K_TYPES}


def gguf_type(name: str) -> BlockType | KType:
    """``"Q4_K"``, ``"q4_0"``, ``"gguf-q4_k"`` or ``"gguf:Q6_K"`` -> its :class:`BlockType` (legacy, blocks of 32)
    or :class:`~tightrope.compress.gguf_k.KType` (k-quant, super-blocks of 256); anything else is refused in
    one sentence that suggests the closest known name."""
    key = name.strip().upper().removeprefix("GGUF-").removeprefix("GGUF:")
    if key in _ALL_TYPES:
        return _ALL_TYPES[key]
    known = ", ".join(_ALL_TYPES)
    if re.fullmatch(r"Q[2-6]_K_(XS|S|M|L|XL)", key):
        one = f"gguf-{key[:4].lower()}" if name.strip().lower().startswith("gguf") else key[:4]
        where = (", or give the preset to the attacks and the audit, which map it per layer" if key in MIXED_PRESETS
                 else f"; the attacks and the audit map the presets {', '.join(MIXED_PRESETS)}")
        raise TightropeError(f"'{name}' is a llama-quantize preset, which mixes types per tensor ({key[:4]} for most "
                             f"weights, more bits for some); name one type (did you mean '{one}'?){where}.")
    if key.startswith(("IQ", "TQ")):
        raise TightropeError(f"The GGUF type '{name}' is an i-quant or a ternary type, which tightrope "
                             f"does not quantize yet; it quantizes {known}.")
    hint = (did_you_mean(name.strip().lower(), ALL_SCHEMES) if name.strip().lower().startswith("gguf")
            else did_you_mean(key, _ALL_TYPES))
    raise TightropeError(f"Unknown GGUF type '{name}'{hint}; tightrope quantizes {known} "
                         f"(schemes {', '.join(ALL_SCHEMES)}).")


def block_type(name: str) -> BlockType:
    """The legacy :class:`BlockType` of a name (as :func:`gguf_type`); a k-quant is refused in one sentence, as
    it has no per-block-of-32 scale for the boxes to pin."""
    t = gguf_type(name)
    if isinstance(t, KType):
        raise TightropeError(f"The GGUF type '{name}' is a k-quant (super-blocks of 256 with a searched scale), "
                             f"which has no exact boxes; the legacy types {', '.join(TYPES)} have.")
    return t


def tensor_type(name: str, row_length: int) -> BlockType | KType:
    """The type llama-quantize writes for a tensor of rows of ``row_length`` values asked for type ``name``
    (llama.cpp ``src/llama-quant.cpp``, ``tensor_type_fallback``): a k-quant whose super-blocks of 256 do not
    divide the rows falls back to its legacy type (Q2_K, Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1,
    Q6_K -> Q8_0).
    Rows that are no multiple of 32 (llama.cpp would write F16) are refused in one sentence."""
    t = gguf_type(name)
    if isinstance(t, KType) and row_length % 256:
        t = TYPES[t.fallback]
    if row_length % QK:
        raise TightropeError(f"GGUF quantizes rows in blocks of {QK} values; rows of {row_length} values are not a "
                             f"multiple of {QK} (llama-quantize would keep such a tensor in F16).")
    return t


def as_blocks(w: torch.Tensor) -> torch.Tensor:
    """``w`` as fp32 blocks ``(B, 32)``, row-major (rows must be whole blocks; refused in one sentence otherwise)."""
    if w.dim() == 0 or w.shape[-1] % QK:
        raise TightropeError(f"GGUF quantizes rows in blocks of {QK} values; a tensor of shape {tuple(w.shape)} "
                             f"has rows that are not a multiple of {QK}.")
    return w.detach().to(torch.float32).reshape(-1, QK)


def _reciprocal(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / d)


def block_parameters(blocks: torch.Tensor, t: BlockType) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(d, inv, m, setter)`` of blocks ``(B, 32)`` (fp32, each ``(B, 1)``): the fp32 scale before its fp16
    cast, the reciprocal the codes are computed with, the minimum (0 for the symmetric types) and the
    index of the element that sets the scale (the arg-absmax; the arg-max for the ``_1`` types)."""
    if t.offset:
        mx, setter = blocks.max(dim=1, keepdim=True)
        m = blocks.amin(dim=1, keepdim=True)
        d = (mx - m) / t.top
    else:
        setter = blocks.abs().argmax(dim=1, keepdim=True)  # the first on ties, as numpy and the C loop
        m = torch.zeros_like(blocks[:, :1])
        d = blocks.abs().gather(1, setter) / 127 if t.bits == 8 else blocks.gather(1, setter) / -(2 ** (t.bits - 1))
    return d, _reciprocal(d), m, setter


def roundf(x: torch.Tensor) -> torch.Tensor:
    """C's ``roundf``: to nearest, halves away from zero (exact, as ``gguf.quants.np_roundf``)."""
    a = x.abs()
    fl = torch.floor(a)
    return torch.sign(x) * (fl + torch.floor(2 * (a - fl)))


def block_codes(x: torch.Tensor, t: BlockType, inv: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """The codes (fp32 integers) of values ``x`` under a block's reciprocal scale ``inv`` and minimum ``m``
    (broadcast against ``x``). For a fixed block, non-decreasing in ``x`` when ``inv >= 0`` and
    non-increasing when ``inv < 0`` (Q4_0 / Q5_0 blocks whose largest-magnitude value is positive)."""
    if t.bits == 8:
        return roundf(x * inv)
    if t.offset:
        return torch.trunc((x - m) * inv + 0.5).clamp(0, t.top)
    return torch.trunc(x * inv + (2 ** (t.bits - 1) + 0.5)).clamp(0, t.top)


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    q = q.to(torch.uint8)
    return (q[:, :QK // 2] & 0x0F) | ((q[:, QK // 2:] & 0x0F) << 4)


def _pack_high_bits(q: torch.Tensor) -> torch.Tensor:
    bits = ((q.to(torch.int64) >> 4) & 1).reshape(-1, 4, 8)
    return (bits << torch.arange(8)).sum(-1).to(torch.uint8)  # byte k holds elements 8k .. 8k+7


def _fp16_bytes(v: torch.Tensor) -> torch.Tensor:
    return v.to(torch.float16).contiguous().view(torch.uint8).reshape(-1, 2)


@dataclass
class Quantized:
    """A tensor quantized to one GGUF type: the packed bytes, codes, fp16 scales and dequantized values."""

    type: BlockType
    data: torch.Tensor  # uint8, shape (*rows, row_length / 32 * type_size): what a GGUF file stores
    codes: torch.Tensor  # (B, 32) integer codes (signed for Q8_0)
    d: torch.Tensor  # (B, 1) fp16 scales
    m: torch.Tensor  # (B, 1) fp16 minima (0 for the symmetric types)
    dequantized: torch.Tensor  # fp32, the input's shape

    def tobytes(self) -> bytes:
        return self.data.numpy().tobytes()


@dataclass
class KQuantized:
    """A tensor quantized to one GGUF k-quant: the packed bytes and the dequantized values."""

    type: KType
    data: torch.Tensor  # uint8, shape (*rows, row_length / 256 * type_size): what a GGUF file stores
    dequantized: torch.Tensor  # fp32, the input's shape

    def tobytes(self) -> bytes:
        return self.data.numpy().tobytes()


def pack(codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor, t: BlockType) -> torch.Tensor:
    """The bytes of blocks ``(B, type_size)`` from their codes and fp32 (or fp16) scale and minimum."""
    parts = [_fp16_bytes(d)]
    if t.offset:
        parts.append(_fp16_bytes(m))
    if t.bits == 8:
        parts.append(codes.to(torch.int8).view(torch.uint8))
    else:
        if t.bits == 5:
            parts.append(_pack_high_bits(codes))
        parts.append(_pack_nibbles(codes))
    return torch.cat(parts, dim=1)


def _values(codes: torch.Tensor, d16: torch.Tensor, m16: torch.Tensor, t: BlockType) -> torch.Tensor:
    d, m = d16.float(), m16.float()
    if t.bits == 8:
        return codes * d
    if t.offset:
        return d * codes + m
    return d * (codes - 2 ** (t.bits - 1))


def quantize(w: torch.Tensor, type_name: str) -> Quantized | KQuantized:
    """``w`` quantized as llama.cpp does it (``quantize_row_*_ref``): bytes identical to ``gguf.quants.quantize``
    (legacy types) or to llama.cpp's ``ggml_quantize_chunk`` without an importance matrix (k-quants)."""
    t = gguf_type(type_name)
    if isinstance(t, KType):
        data = quantize_k(w, t)
        return KQuantized(t, data, dequantize_k(data, t).reshape(w.shape))
    blocks = as_blocks(w)
    d, inv, m, _ = block_parameters(blocks, t)
    codes = block_codes(blocks, t, inv, m)
    data = pack(codes, d, m, t).reshape(*w.shape[:-1], w.shape[-1] // QK * t.type_size)
    d16, m16 = d.to(torch.float16), m.to(torch.float16)
    return Quantized(t, data, codes, d16, m16, _values(codes, d16, m16, t).reshape(w.shape))


def dequantize(data: torch.Tensor | np.ndarray, type_name: str) -> torch.Tensor:
    """fp32 values of packed bytes (last axis: whole blocks), as ``dequantize_row_*`` / ``gguf.quants.dequantize``."""
    t = gguf_type(type_name)
    raw = data.contiguous() if isinstance(data, torch.Tensor) else torch.from_numpy(np.array(data))  # a writable copy
    raw = raw.view(torch.uint8)
    if isinstance(t, KType):
        return dequantize_k(raw, t)
    if raw.dim() == 0 or raw.shape[-1] % t.type_size:
        raise TightropeError(f"{t.name} data has rows of whole {t.type_size}-byte blocks; this has shape {tuple(raw.shape)}.")
    shape = (*raw.shape[:-1], raw.shape[-1] // t.type_size * QK)
    b = raw.reshape(-1, t.type_size)
    d16 = b[:, 0:2].contiguous().view(torch.float16)
    m16 = b[:, 2:4].contiguous().view(torch.float16) if t.offset else torch.zeros_like(d16)
    body = b[:, 2 + 2 * t.offset:]
    if t.bits == 8:
        codes = body.contiguous().view(torch.int8).float()
    else:
        qs = body[:, -QK // 2:].to(torch.int64)
        codes = torch.cat([qs & 0x0F, qs >> 4], dim=1)
        if t.bits == 5:
            qh = body[:, :4].to(torch.int64)
            high = (qh.unsqueeze(-1) >> torch.arange(8)) & 1  # (B, 4, 8): element 8k + i
            codes = codes | (high.reshape(-1, QK) << 4)
        codes = codes.float()
    return _values(codes, d16, m16, t).reshape(shape)


# --- GGUF files -------------------------------------------------------------------------------------

def read_gguf(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a GGUF file, dequantized to fp32 in its logical shape (the file's own weights, the
    full-precision side of an audit of that file). A damaged or truncated file, or a tensor type that
    tightrope does not read, is refused in one sentence."""
    import gguf  # noqa: PLC0415  (llama.cpp's reader; heavy, only for files)

    path = Path(path).expanduser()
    if not path.is_file():
        raise TightropeError(f"The GGUF file {path} does not exist.")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as err:  # noqa: BLE001  (the reader raises ValueError, IndexError, ... on damaged input)
        raise TightropeError(f"The GGUF file {path} is truncated or damaged (gguf's reader stopped with "
                             f"{type(err).__name__}); download or convert it again.") from None
    out: dict[str, torch.Tensor] = {}
    readable = ", ".join([*FLOAT_TYPES.values(), *_ALL_TYPES])
    for tensor in reader.tensors:
        type_id = int(tensor.tensor_type)
        kind = next((t for t in _ALL_TYPES.values() if t.type_id == type_id), None)
        shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))  # GGUF lists dimensions innermost first
        if kind is None and type_id not in FLOAT_TYPES:
            raise TightropeError(f"The GGUF file {path} has tensor '{tensor.name}' of type "
                                 f"{getattr(tensor.tensor_type, 'name', type_id)}, which tightrope does not read; "
                                 f"it reads {readable}.")
        if type_id == 30:  # BF16: the high half of an fp32
            values = torch.as_tensor(np.asarray(tensor.data).view(np.int16).astype(np.int32) << 16).view(torch.float32)
        elif kind is None:
            values = torch.as_tensor(np.asarray(tensor.data).astype(np.float32))
        else:
            values = dequantize(np.asarray(tensor.data), kind.name)
        out[tensor.name] = values.reshape(shape)
    return out
