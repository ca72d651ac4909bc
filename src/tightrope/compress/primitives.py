"""Pure reference quantizers, one small function per format, in each format's own notation.

Everything here is tensor maths with no state and no module surgery, so it can be checked code for
code against the libraries that run the formats (tests/test_primitives.py does so against
bitsandbytes 0.50 and torch.ao) and reasoned about exactly by the quantization-attack code, which
needs to know which full-precision weights land on which code.

Formats
-------
- LLM.int8() weights (Dettmers et al. 2022, arXiv 2208.07339, Sec. 3.1 eq. 1 and Sec. 3.2):
  row-wise absmax int8, ``q = round(w * 127 / absmax_row)``, on the fp16 cast of the weight;
  outlier *activation* columns (|x| >= threshold, 6.0 in the paper) run through a higher-precision
  product: :func:`quantize_rowwise_absmax_int8`, :func:`dequantize_rowwise_absmax_int8`,
  :func:`llm_int8_linear`.
- NF4 / FP4 block-wise absmax (Dettmers et al. 2023, QLoRA, arXiv 2305.14314, Sec. 3 eq. 1 and the
  NF4 construction; bitsandbytes' FP4 is E2M1 with bias 2): :data:`NF4_CODE`, :data:`FP4_CODE`,
  :func:`quantize_blockwise`, :func:`dequantize_blockwise`, :func:`pack_4bit`, :func:`unpack_4bit`,
  double quantization of the absmax constants: :func:`quantize_absmax_double`.
- torch.ao dynamic int8 weights, symmetric per tensor or per output channel:
  :func:`quantize_symmetric_int8`, :func:`dequantize_symmetric_int8`.
- The seed paper's affine min-max quantization ``Q(w) = round((w - min w) / scale)`` with
  ``scale = (max w - min w) / (2^b - 1)``, per tensor, per channel or per group, 2..8 bits:
  :func:`quantize_affine`, :func:`dequantize_affine`.

Shapes: weights are ``(out_features, in_features)`` as in ``nn.Linear``; "row" = output channel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from tightrope.errors import TightropeError

# --- code tables ------------------------------------------------------------------------------

#: NormalFloat4 (QLoRA, Sec. 3 "4-bit NormalFloat"): quantiles of N(0, 1) scaled to [-1, 1], with an
#: exact zero; index = 4-bit code. Identical to ``bitsandbytes.functional.get_4bit_type("nf4")``.
NF4_CODE = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=torch.float32,
)

#: bitsandbytes FP4: 1 sign bit, 2 exponent bits (bias 2), 1 mantissa bit, listed in bit-pattern
#: order (code 0b0000..0b1111) and divided by the largest magnitude 12, as in
#: ``get_4bit_type("fp4")``. Magnitudes 0, 0.0625, 8, 12, 4, 6, 2, 3 (/12); codes 8..15 are the
#: negatives, so 0 appears twice (+0 = code 0, -0 = code 8).
FP4_CODE = torch.tensor([0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0], dtype=torch.float32)
FP4_CODE = torch.cat([FP4_CODE, -FP4_CODE]) / 12.0

CODES_4BIT = {"nf4": NF4_CODE, "fp4": FP4_CODE}


def dynamic_code(max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """The signed 8-bit dynamic-exponent map bitsandbytes uses for blockwise int8 and for the
    second level of double quantization (Dettmers 2016, arXiv 1511.04561; ``create_dynamic_map``).

    Reproduced here (rather than imported) so the reference needs no compiled library; the test
    checks it equals bitsandbytes' table value for value.
    """
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        fraction_items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1)
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    if additional_items > 0:
        boundaries = torch.linspace(0.1, 1, additional_items + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + max_exponent_bits - 1)) * means).tolist()
        data += (-(10 ** (-(max_exponent_bits - 1) + max_exponent_bits - 1)) * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (2**total_bits - len(data))
    return torch.tensor(sorted(data), dtype=torch.float32)


DYNAMIC_CODE = dynamic_code()

# --- LLM.int8(): row-wise absmax int8 -----------------------------------------------------------


def quantize_rowwise_absmax_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LLM.int8() weight quantization (eq. 1 applied per row, "vector-wise"): ``(q, scale)``.

    ``scale[i] = max_j |w16[i, j]|`` (fp32), ``q[i, j] = round(w16[i, j] * (127 / scale[i]))`` (int8),
    where ``w16`` is the fp16 cast of ``w`` (bitsandbytes' ``Int8Params`` casts to fp16 first, so
    weights that differ only below fp16 precision get the same code). ``round`` is half-to-even.
    An all-zero row has scale 0 and codes 0. Dequantize with ``q * scale / 127``.
    """
    w16 = w.detach().to(torch.float16)
    scale = w16.abs().amax(dim=1).float()  # (out,)
    q = torch.round(w16 * (127.0 / scale.unsqueeze(-1)))  # fp16 * fp32 -> fp32, as bitsandbytes
    q = torch.nan_to_num(q, nan=0.0).to(torch.int8)  # 0 * inf in an all-zero row
    return q, scale


def dequantize_rowwise_absmax_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``w_hat = q * scale / 127`` in fp32 (bitsandbytes multiplies by the reciprocal of 127)."""
    return q.float() * scale.view(-1, 1) * 7.874015718698502e-3


def outlier_columns(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Indices of input features (columns of ``x``, shape ``(tokens, in)``) holding any
    ``|x| >= threshold``: LLM.int8()'s mixed-precision decomposition set O (Sec. 3.2, eq. 4)."""
    if threshold <= 0:
        return torch.empty(0, dtype=torch.long)
    return torch.nonzero((x.abs() >= threshold).any(dim=0)).flatten()


def llm_int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                    threshold: float = 6.0) -> torch.Tensor:
    """Reference LLM.int8() product (eq. 4): ``X W^T`` split by input feature.

    Outlier columns O of X (:func:`outlier_columns`) stay in fp16 and meet the dequantized weight
    columns; every other column is quantized row-wise (per token) to int8, multiplied with the int8
    weight and rescaled by ``s_x * s_w / 127^2``. Mirrors bitsandbytes' CPU path; useful to reason
    about, not fast.
    """
    x2 = x.reshape(-1, x.shape[-1]).to(torch.float16)  # (T, in)
    cols = outlier_columns(x2, threshold)
    inlier = x2.clone()
    inlier[:, cols] = 0
    cx, sx = quantize_rowwise_absmax_int8(inlier.float())  # per-token absmax
    acc = cx.float() @ q.float().t()  # (T, out), exact in fp32 for these sizes
    out = acc * (sx.view(-1, 1) * scale.view(1, -1)) * (1.0 / (127.0 * 127.0))
    if cols.numel():
        w_cols = dequantize_rowwise_absmax_int8(q[:, cols], scale)  # (out, |O|)
        out = out + x2[:, cols].float() @ w_cols.t()
    if bias is not None:
        out = out + bias.float()
    return out.reshape(*x.shape[:-1], q.shape[0])


# --- block-wise absmax with a code table (NF4, FP4, dynamic int8) -------------------------------


def nearest_code(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index into ``code`` of the nearest value to each element of ``scaled`` (in [-1, 1]).

    Exactly bitsandbytes' rule: sort the code, cut at the midpoints between neighbours, and
    ``bucketize`` (a value exactly on a midpoint goes to the *lower* code value); then map the
    sorted position back to the code index. For FP4's two zeros this sends 0 and tiny negatives to
    +0 (code 0) and tiny positives to -0 (code 8), as bitsandbytes does.
    """
    order = torch.argsort(code, stable=True)
    sorted_code = code[order]
    bounds = (sorted_code[:-1] + sorted_code[1:]) / 2
    return order[torch.bucketize(scaled, bounds, out_int32=True).long()]


def _blocks(w: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten ``w`` to fp32 and return (flat, absmax per block of ``blocksize`` consecutive values)."""
    if blocksize <= 0:
        raise TightropeError(f"The block size must be positive, not {blocksize}.")
    flat = w.detach().reshape(-1).float()
    n = flat.numel()
    blocks = -(-n // blocksize)
    padded = torch.nn.functional.pad(flat, (0, blocks * blocksize - n))
    absmax = padded.view(blocks, blocksize).abs().amax(dim=1)  # padding zeros never win
    return flat, absmax


def quantize_blockwise(w: torch.Tensor, code: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise absmax quantization onto a code table (QLoRA eq. 1 per block): ``(q, absmax)``.

    The weight is flattened row-major and cut into blocks of ``blocksize`` values (the last block
    may be short). Per block ``absmax_b = max |w|``; each value is scaled by the reciprocal,
    ``clamp(w * (1 / absmax_b), -1, 1)`` (an all-zero block uses absmax 1e-38 in the product but
    stores 0), and rounded to the nearest code value (:func:`nearest_code`).

    Returns ``q`` as uint8 code indices with ``w``'s shape (one per value, unpacked; see
    :func:`pack_4bit`) and ``absmax`` as fp32 of shape ``(ceil(numel / blocksize),)``.
    """
    flat, absmax = _blocks(w, blocksize)
    n = flat.numel()
    per_value = absmax.clamp(min=1e-38).repeat_interleave(blocksize)[:n]
    scaled = torch.clamp(flat * (1.0 / per_value), -1, 1)
    q = nearest_code(scaled, code.float()).to(torch.uint8)
    return q.reshape(w.shape), absmax


def dequantize_blockwise(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    """``w_hat = code[q] * absmax_b`` in fp32, with ``q``'s shape."""
    n = q.numel()
    values = code.float()[q.reshape(-1).long()]
    return (values * absmax.float().repeat_interleave(blocksize)[:n]).reshape(q.shape)


def zero_code(code: torch.Tensor) -> int:
    """The code index that 0.0 rounds to (NF4: 7, FP4: 0)."""
    return int(nearest_code(torch.zeros(1), code.float())[0])


def pack_4bit(q: torch.Tensor, pad_code: int = 0) -> torch.Tensor:
    """Two 4-bit codes per byte, first value in the high nibble (bitsandbytes' layout), shape
    ``(ceil(n / 2), 1)`` uint8 as ``Params4bit`` stores it. An odd count is padded with
    ``pad_code``; bitsandbytes pads with the code of 0.0 (:func:`zero_code`)."""
    flat = q.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.nn.functional.pad(flat, (0, 1), value=pad_code)
    return ((flat[::2] << 4) | flat[1::2]).unsqueeze(1)


def unpack_4bit(packed: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Inverse of :func:`pack_4bit`: uint8 codes of ``shape``."""
    flat = packed.reshape(-1).to(torch.uint8)
    out = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)
    n = 1
    for s in shape:
        n *= s
    return out[:n].reshape(tuple(shape))


@dataclass(frozen=True)
class DoubleQuantAbsmax:
    """QLoRA double quantization (Sec. 3 "Double Quantization"): the fp32 block constants, minus
    their mean, quantized again block-wise (256 per block) with the 8-bit dynamic code."""

    q: torch.Tensor  # uint8 (n_blocks,)
    absmax2: torch.Tensor  # fp32 (ceil(n_blocks / 256),)
    offset: float  # mean of the first-level absmax
    blocksize2: int = 256


def quantize_absmax_double(absmax: torch.Tensor, blocksize2: int = 256) -> DoubleQuantAbsmax:
    """Quantize first-level absmax constants: ``c = absmax - mean(absmax)`` then
    :func:`quantize_blockwise` with :data:`DYNAMIC_CODE` and blocks of 256."""
    offset = absmax.float().mean()
    q, absmax2 = quantize_blockwise(absmax.float() - offset, DYNAMIC_CODE, blocksize2)
    return DoubleQuantAbsmax(q=q, absmax2=absmax2, offset=float(offset), blocksize2=blocksize2)


def dequantize_absmax_double(dq: DoubleQuantAbsmax) -> torch.Tensor:
    """Recover the first-level absmax: ``dynamic[q] * absmax2 + offset`` (fp32)."""
    return dequantize_blockwise(dq.q, dq.absmax2, DYNAMIC_CODE, dq.blocksize2) + torch.tensor(dq.offset)


def quantize_4bit(w: torch.Tensor, quant_type: Literal["nf4", "fp4"] = "nf4", blocksize: int = 64,
                  double_quant: bool = False) -> tuple[torch.Tensor, torch.Tensor | DoubleQuantAbsmax]:
    """NF4 / FP4 as bitsandbytes stores them: ``(q codes with w's shape, absmax or its double quant)``."""
    q, absmax = quantize_blockwise(w, CODES_4BIT[quant_type], blocksize)
    return q, (quantize_absmax_double(absmax) if double_quant else absmax)


def dequantize_4bit(q: torch.Tensor, absmax: torch.Tensor | DoubleQuantAbsmax, quant_type: Literal["nf4", "fp4"] = "nf4",
                    blocksize: int = 64) -> torch.Tensor:
    if isinstance(absmax, DoubleQuantAbsmax):
        absmax = dequantize_absmax_double(absmax)
    return dequantize_blockwise(q, absmax, CODES_4BIT[quant_type], blocksize)


# --- torch.ao dynamic int8: symmetric per tensor / per channel ---------------------------------


def quantize_symmetric_int8(w: torch.Tensor, per_channel: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.ao's default dynamic weight observer: ``(q int8, scale fp32)`` with zero point 0.

    ``MinMaxObserver`` / ``PerChannelMinMaxObserver`` with ``qint8`` and a symmetric scheme:
    ``scale = max(|min w|, |max w|) / ((127 - (-128)) / 2) = amax / 127.5`` (at least fp32 eps), per
    output channel (axis 0) or per tensor; ``q = clamp(round(w / scale), -128, 127)``, half-to-even.
    As in ``torch.quantize_per_channel`` the per-channel path multiplies by the fp32 reciprocal
    ``1 / scale`` while ``torch.quantize_per_tensor`` divides; the two differ in the last bit for a
    few values, and the codes here match each bit for bit.
    """
    w = w.detach().float()
    amax = w.abs().amax(dim=1) if per_channel else w.abs().amax()
    scale = torch.clamp(amax / 127.5, min=torch.finfo(torch.float32).eps)
    scaled = w * (1.0 / scale.view(-1, 1)) if per_channel else w / scale
    q = torch.clamp(torch.round(scaled), -128, 127).to(torch.int8)
    return q, scale.reshape(-1) if per_channel else scale.reshape(())


def dequantize_symmetric_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    s = scale.view(-1, 1) if scale.dim() == 1 else scale
    return q.float() * s


# --- the seed paper's affine min-max quantization ----------------------------------------------

Granularity = Literal["tensor", "channel", "group"]


@dataclass(frozen=True)
class AffineQuant:
    """``w_hat = q * scale + minimum`` per group of ``group`` consecutive inputs of a row.

    ``q`` is uint8 with ``w``'s shape; ``scale`` and ``minimum`` are fp32 of shape
    ``(rows, groups)`` (one column per tensor/row for the coarser granularities, broadcast).
    """

    q: torch.Tensor
    scale: torch.Tensor
    minimum: torch.Tensor
    bits: int
    group: int  # columns per group (in_features for per channel; numel for per tensor)


def affine_groups(w: torch.Tensor, granularity: Granularity, group_size: int) -> torch.Tensor:
    """View ``w`` as ``(rows, groups, group)`` for the requested granularity."""
    if w.dim() != 2:
        raise TightropeError(f"Affine quantization expects a 2-D weight, not shape {tuple(w.shape)}.")
    rows, cols = w.shape
    if granularity == "tensor":
        return w.reshape(1, 1, rows * cols)
    if granularity == "channel":
        return w.reshape(rows, 1, cols)
    if granularity == "group":
        if group_size <= 0 or cols % group_size:
            raise TightropeError(f"The group size {group_size} must divide the input width {cols}.")
        return w.reshape(rows, cols // group_size, group_size)
    raise TightropeError(f"Unknown granularity {granularity!r}; use tensor, channel or group.")


def affine_params(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, minimum)`` over the last axis: ``scale = (max - min) / (2^b - 1)``; a constant group
    gets scale 1 so that ``q = 0`` and ``w_hat = min`` exactly."""
    lo = w.amin(dim=-1)
    hi = w.amax(dim=-1)
    scale = (hi - lo) / (2**bits - 1)
    return torch.where(scale > 0, scale, torch.ones_like(scale)), lo


def affine_round(w: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, bits: int) -> torch.Tensor:
    """``Q(w) = clamp(round((w - min) / scale), 0, 2^b - 1)`` (the seed's formula; the clamp only
    matters when the grid was fitted on other values, as in GPTQ's updated columns)."""
    return torch.clamp(torch.round((w - minimum) / scale), 0, 2**bits - 1)


def check_bits(bits: int, low: int = 2, high: int = 8) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not low <= bits <= high:
        raise TightropeError(f"bits must be an integer from {low} to {high}, not {bits!r}.")


def quantize_affine(w: torch.Tensor, bits: int, granularity: Granularity = "channel", group_size: int = 128) -> AffineQuant:
    """The seed paper's min-max quantization ``Q(w) = round((w - min w) / scale)``, ``scale =
    (max w - min w) / (2^b - 1)``, with ``min w`` as the (real-valued) zero point, per tensor, per
    output channel, or per group of ``group_size`` inputs; 2..8 bits."""
    check_bits(bits)
    g = affine_groups(w.detach().float(), granularity, group_size)  # (R, G, S)
    scale, minimum = affine_params(g, bits)  # (R, G)
    q = affine_round(g, scale.unsqueeze(-1), minimum.unsqueeze(-1), bits).to(torch.uint8)
    return AffineQuant(q=q.reshape(w.shape), scale=scale, minimum=minimum, bits=bits, group=g.shape[-1])


def dequantize_affine(aq: AffineQuant) -> torch.Tensor:
    """``w_hat = Q * scale + min w`` in fp32, with ``q``'s shape."""
    shape = aq.q.shape
    rows = aq.scale.shape[0]
    g = aq.q.float().reshape(rows, -1, aq.group)
    return (g * aq.scale.unsqueeze(-1) + aq.minimum.unsqueeze(-1)).reshape(shape)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(||x||^2 / ||x - x_hat||^2)`` in dB (torchao's
    accuracy check for quantizers); +inf when exact."""
    ref = reference.detach().double()
    noise = (ref - approx.detach().double()).pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(ref.pow(2).sum() / noise))
