"""GGUF k-quants (llama.cpp's Q2_K, Q3_K, Q4_K, Q5_K, Q6_K), bit for bit, without an importance matrix.

The block formats are llama.cpp's (``ggml/src/ggml-common.h``, ``block_q4_K`` ... ``block_q6_K``) and the
quantizers mirror ``quantize_row_q2_K_ref`` / ``_q3_K_ref`` / ... / ``quantize_row_q6_K_ref`` of
``ggml/src/ggml-quants.c`` (llama.cpp as vendored by llama-cpp-python 0.3.36), which is what
``llama-quantize`` runs when it is given no importance matrix (``ggml_quantize_chunk`` with
``imatrix = NULL``). A row is cut into super-blocks of ``QK_K = 256`` values:

- ``Q4_K`` (144 bytes) / ``Q5_K`` (176 bytes): eight sub-blocks of 32, each fitted by
  ``make_qkx2_quants`` (:func:`make_qkx2_quants`): an affine code ``x ~ s * L - m`` with ``L`` in
  ``[0, 15]`` / ``[0, 31]``, weights ``av_x + |x_i|`` (``av_x`` the sub-block's RMS), and a search over
  21 / 16 candidate inverse scales ``(rmin + 0.1 k + nmax) / (max - min)`` that keeps the least weighted
  squared error. The eight scales and eight mins are then quantized to 6 bits against the super-block's
  fp16 ``d = max_scale / 63`` and ``dmin = max_min / 63``, packed in 12 bytes (``get_scale_min_k4``), and
  every value is re-coded against its *stored* scale: ``L = nearest_int((x + dmin * m_j) / (d * sc_j))``.
- ``Q2_K`` (84 bytes): sixteen sub-blocks of 16, each fitted by ``make_qkx2_quants`` with ``L`` in ``[0, 3]``,
  weights ``|x_i|``, mean absolute error and 16 candidates; scales and mins are 4 bits each (one byte per
  sub-block) against the fp16 ``d = max_scale / 15`` and ``dmin = max_min / 15``, then re-coded as above.
- ``Q3_K`` (110 bytes): sixteen sub-blocks of 16, each fitted by ``make_q3_quants`` (:func:`make_q3_quants`,
  codes in ``[-4, 3]`` refined element by element); the scales are 6 bits (offset 32) against the fp16
  ``d = max_scale / -32``, and the codes' third bits sit apart in ``hmask``.
- ``Q6_K`` (210 bytes): sixteen sub-blocks of 16, each fitted by ``make_qx_quants(16, 32, ..., rmse_type=1)``
  (:func:`make_qx_quants`, a symmetric code ``x ~ s * l``, ``l`` in ``[-32, 31]``, weights ``x_i^2`` and 18
  candidate scales around ``-32 / max``); the sixteen scales become int8 against the fp16
  ``d = max_scale / -128`` and every value is re-coded as ``nearest_int(x / (d * sc_j))``.

All arithmetic is fp32 in the C reference's order (sums run element by element, as the C loops do; the
library is built without FMA contraction, ``-DGGML_NATIVE=OFF``), ``nearest_int`` is emulated bit for bit
(``fval + 12582912.f``, round half to even) and the fp16 casts are round-to-nearest-even. The work is
vectorised across sub-blocks, never within one, so the floating-point results are the C ones.
``tests/test_gguf_kquants.py`` checks the bytes against golden bytes made by llama.cpp itself
(``benchmarks/gguf_kquants_golden.py``, through ctypes) and the values against ``gguf.quants.dequantize``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tightrope.errors import TightropeError

QK_K = 256  # values per super-block (ggml-common.h)
GROUP_MAX_EPS = 1e-15  # ggml-quants.c: a sub-block of smaller absmax is "all zero"
_F32 = torch.float32


@dataclass(frozen=True)
class KType:
    """One GGML k-quant type: its name, GGMLQuantizationType value, bits per code and bytes per super-block."""

    name: str
    type_id: int
    bits: int
    type_size: int
    fallback: str  # the legacy type llama-quantize writes for rows that are no multiple of 256

    @property
    def scheme(self) -> str:
        """The scheme name of :data:`tightrope.compress.specs.QUANT_SCHEMES` (``gguf-q4_k``)."""
        return f"gguf-{self.name.lower()}"


K_TYPES: dict[str, KType] = {t.name: t for t in (
    KType("Q2_K", 10, 2, 84, "Q4_0"), KType("Q3_K", 11, 3, 110, "Q4_0"), KType("Q4_K", 12, 4, 144, "Q5_0"), KType("Q5_K", 13, 5, 176, "Q5_1"), KType("Q6_K", 14, 6, 210, "Q8_0"))}


def _f(v: float) -> torch.Tensor:
    """An fp32 scalar tensor: constants enter the arithmetic exactly as the C float literals do."""
    return torch.tensor(np.float32(v), dtype=_F32)


def nearest_int(v: torch.Tensor) -> torch.Tensor:
    """ggml-quants.c ``nearest_int``: the low mantissa bits of ``v + 12582912.f`` (round half to even for
    ``|v| <= 4194303``; beyond that the same wrapped integer the C code gets). int32, ``v``'s shape."""
    bits = (v.to(_F32) + _f(12582912.0)).view(torch.int32)
    return (bits & 0x007FFFFF) - 0x00400000


def fp16_round(v: torch.Tensor) -> torch.Tensor:
    """``GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(v))``: fp32 through fp16 (round to nearest even) and back."""
    return v.to(torch.float16).to(_F32)


def sqrtf(v: torch.Tensor) -> torch.Tensor:
    """C's ``sqrtf``, correctly rounded: torch's fp32 ``sqrt`` is not on every CPU (on an AVX-512 Xeon it returns
    0.142549589 for sqrt(0.0203203876), one ulp below; that moved one Q5_K super-block of SmolLM2 away from
    llama-quantize's bytes). The fp64 root rounded to fp32 is the correctly rounded fp32 root (53 >= 2 * 24 + 2)."""
    return torch.sqrt(v.double()).float()


def make_qkx2_quants(x: torch.Tensor, weights: torch.Tensor, nmax: int, rmin: float, rdelta: float,
                     nstep: int, use_mad: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ggml-quants.c ``make_qkx2_quants(n, nmax, x, weights, L, &the_min, Laux, rmin, rdelta, nstep, use_mad)``
    for sub-blocks ``x`` of shape ``(n, S)`` (element-major: ``x[i]`` is element ``i`` of all ``S``
    sub-blocks). Returns ``(L, scale, the_min)``: codes ``(n, S)`` int32, and fp32 ``(S,)`` with ``x ~ scale
    * L - the_min``. A flat sub-block (``max == min`` after ``min = min(min, 0)``) gets ``L = 0``, scale 0."""
    n = x.shape[0]
    mn, mx = x[0].clone(), x[0].clone()
    sum_w = weights[0].clone()
    sum_x = sum_w * x[0]
    for i in range(1, n):
        mn = torch.where(x[i] < mn, x[i], mn)
        mx = torch.where(x[i] > mx, x[i], mx)
        sum_w = sum_w + weights[i]
        sum_x = sum_x + weights[i] * x[i]
    mn = torch.where(mn > 0, torch.zeros_like(mn), mn)
    flat = mx == mn
    top = _f(nmax)

    def span() -> torch.Tensor:  # max - min with the min found so far (the search moves it, as the C loop does)
        return torch.where(flat, torch.ones_like(mx), mx - mn)

    def codes(iscale: torch.Tensor) -> torch.Tensor:
        return nearest_int(iscale * (x - mn)).clamp(0, nmax)

    def error(scale: torch.Tensor, low: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
        total = torch.zeros_like(mn)
        for i in range(n):
            diff = scale * L[i].to(_F32) + low - x[i]
            total = total + weights[i] * (diff.abs() if use_mad else diff * diff)
        return total

    iscale = top / span()
    scale = _f(1.0) / iscale
    L = codes(iscale)
    best = error(scale, mn, L)
    for step in range(nstep + 1):
        iscale = (_f(rmin) + _f(rdelta) * _f(step) + top) / span()
        aux = codes(iscale)
        sum_l, sum_l2, sum_xl = (torch.zeros_like(mn) for _ in range(3))
        for i in range(n):
            wl = weights[i] * aux[i].to(_F32)
            sum_l = sum_l + wl
            sum_l2 = sum_l2 + wl * aux[i].to(_F32)
            sum_xl = sum_xl + wl * x[i]
        D = sum_w * sum_l2 - sum_l * sum_l
        solvable = D > 0
        safe_d = torch.where(solvable, D, torch.ones_like(D))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / safe_d
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe_d
        positive = this_min > 0
        this_scale = torch.where(positive, sum_xl / torch.where(positive, sum_l2, torch.ones_like(sum_l2)), this_scale)
        this_min = torch.where(positive, torch.zeros_like(this_min), this_min)
        cur = error(this_scale, this_min, aux)
        better = solvable & (cur < best) & ~flat
        L = torch.where(better, aux, L)
        best = torch.where(better, cur, best)
        scale = torch.where(better, this_scale, scale)
        mn = torch.where(better, this_min, mn)
    L = torch.where(flat, torch.zeros_like(L), L)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    return L, scale, -mn


def make_qx_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml-quants.c ``make_qx_quants(n, nmax, x, L, rmse_type = 1, qw = NULL)`` for sub-blocks ``x`` of shape
    ``(n, S)`` (element-major). Returns ``(L, scale)``: codes ``l + nmax`` in ``[0, 2 nmax - 1]`` ``(n, S)``
    int32 and the fp32 scale ``(S,)``; a sub-block whose absmax is below ``GROUP_MAX_EPS`` gets ``L = 0``
    and scale 0. ``max`` is the signed value of largest magnitude, the first one on ties (as the C loop)."""
    n = x.shape[0]
    amax = torch.zeros_like(x[0])
    mx = torch.zeros_like(x[0])
    for i in range(n):
        ax = x[i].abs()
        bigger = ax > amax
        amax = torch.where(bigger, ax, amax)
        mx = torch.where(bigger, x[i], mx)
    zero = amax < GROUP_MAX_EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)

    def fit(iscale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        l = nearest_int(iscale * x).clamp(-nmax, nmax - 1)
        sumlx, suml2 = torch.zeros_like(mx), torch.zeros_like(mx)
        for i in range(n):
            w = x[i] * x[i]
            li = l[i].to(_F32)
            sumlx = sumlx + w * x[i] * li
            suml2 = suml2 + w * li * li
        return l, sumlx, suml2

    l, sumlx, suml2 = fit(_f(-nmax) / mx)
    L = l + nmax
    scale = torch.where(suml2 != 0, sumlx / torch.where(suml2 != 0, suml2, torch.ones_like(suml2)), torch.zeros_like(suml2))
    best = scale * sumlx
    for step in [*range(-9, 0), *range(1, 10)]:
        l, sumlx, suml2 = fit(-(_f(nmax) + _f(0.1) * _f(step)) / mx)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        L = torch.where(better, l + nmax, L)
        scale = torch.where(better, sumlx / torch.where(better, suml2, torch.ones_like(suml2)), scale)
        best = torch.where(better, scale * sumlx, best)
    return torch.where(zero, torch.zeros_like(L), L), torch.where(zero, torch.zeros_like(scale), scale)


def make_q3_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml-quants.c ``make_q3_quants(n, nmax, x, L, do_rmse = true)`` for sub-blocks ``x`` of shape ``(n, S)``
    (element-major): codes ``l`` in ``[-nmax, nmax - 1]`` from ``-nmax / max``, then up to five passes of the
    C loop's element-by-element refinement (each element's code re-solved against the others' sums, kept when
    the fit ``sumlx^2 / suml2`` grows). Returns ``(L, scale)``: ``l + nmax`` ``(n, S)`` int32 (0 for an
    all-zero sub-block) and ``sumlx / suml2``. A pass that changes nothing leaves the state as it was, so
    running all five passes equals the C loop's early ``break``."""
    n = x.shape[0]
    amax, mx = torch.zeros_like(x[0]), torch.zeros_like(x[0])
    for i in range(n):
        bigger = x[i].abs() > amax
        amax = torch.where(bigger, x[i].abs(), amax)
        mx = torch.where(bigger, x[i], mx)
    zero = amax < GROUP_MAX_EPS
    L = nearest_int((_f(-nmax) / torch.where(zero, _f(1), mx)) * x).clamp(-nmax, nmax - 1)
    sumlx, suml2 = torch.zeros_like(mx), torch.zeros_like(mx)
    for i in range(n):
        w, li = x[i] * x[i], L[i].to(_F32)
        sumlx = sumlx + w * x[i] * li
        suml2 = suml2 + w * li * li
    for _ in range(5):
        for i in range(n):
            w, li = x[i] * x[i], L[i].to(_F32)
            slx = sumlx - w * x[i] * li
            sl2 = suml2 - w * li * li
            new = nearest_int(x[i] * sl2 / torch.where(slx > 0, slx, _f(1))).clamp(-nmax, nmax - 1)
            nf = new.to(_F32)
            slx2, sl22 = slx + w * x[i] * nf, sl2 + w * nf * nf
            keep = (slx > 0) & (new != L[i]) & (sl22 > 0) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            L[i] = torch.where(keep, new, L[i])
            sumlx, suml2 = torch.where(keep, slx2, sumlx), torch.where(keep, sl22, suml2)
    scale = torch.where(suml2 > 0, sumlx / torch.where(suml2 > 0, suml2, _f(1)), _f(0))
    return torch.where(zero, torch.zeros_like(L), L + nmax), torch.where(zero, _f(0), scale)


def as_superblocks(w: torch.Tensor) -> torch.Tensor:
    """``w`` as fp32 super-blocks ``(B, 256)``, row-major (rows must be whole super-blocks; refused in one
    sentence otherwise)."""
    if w.dim() == 0 or w.shape[-1] % QK_K:
        raise TightropeError(f"GGUF k-quants quantize rows in super-blocks of {QK_K} values; a tensor of shape "
                             f"{tuple(w.shape)} has rows that are not a multiple of {QK_K}.")
    return w.detach().to(_F32).cpu().reshape(-1, QK_K)


def _fp16_bytes(v: torch.Tensor) -> torch.Tensor:
    return v.to(torch.float16).contiguous().view(torch.uint8).reshape(-1, 2)


def _pack_scales_k4(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """The 12 bytes of eight 6-bit scales and mins ``(B, 8)`` (the inverse of ``get_scale_min_k4``)."""
    ls, lm = ls.to(torch.int64), lm.to(torch.int64)
    return torch.cat([ls[:, :4] | ((ls[:, 4:] >> 4) << 6), lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
                      (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)], dim=1).to(torch.uint8)


def unpack_scales_k4(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``get_scale_min_k4`` for j = 0..7 of the 12 bytes ``(B, 12)``: ``(sc, m)``, each ``(B, 8)`` int64."""
    s = s.to(torch.int64)
    sc = torch.cat([s[:, 0:4] & 63, (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)], dim=1)
    m = torch.cat([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], dim=1)
    return sc, m


def unpack_scales_q3(s: torch.Tensor) -> torch.Tensor:
    """Q3_K's sixteen signed scales ``sc - 32`` ``(B, 16)`` from its 12 scale bytes ``(B, 12)``: low nibbles in
    bytes 0-7 (scale j and j + 8), the two high bits of scale j at bit ``2 (j / 4)`` of byte ``8 + j % 4``."""
    s = s.to(torch.int64)
    j = torch.arange(16)
    low = torch.where(j < 8, s[:, j % 8] & 0xF, s[:, j % 8] >> 4)
    return (low | (((s[:, 8 + j % 4] >> (2 * (j // 4))) & 3) << 4)) - 32


def _quantize_affine(x: torch.Tensor, t: KType) -> torch.Tensor:
    """``quantize_row_q4_K_ref`` / ``quantize_row_q5_K_ref`` of super-blocks ``(B, 256)`` -> bytes ``(B, size)``."""
    nb = x.shape[0]
    nmax = 2 ** t.bits - 1
    rmin, nstep = (-1.0, 20) if t.bits == 4 else (-0.5, 15)
    sub = x.reshape(nb * 8, 32).T.contiguous()  # (32, S): element-major sub-blocks
    sum_x2 = torch.zeros(sub.shape[1], dtype=_F32)
    for i in range(32):
        sum_x2 = sum_x2 + sub[i] * sub[i]
    av_x = sqrtf(sum_x2 / _f(32))
    L, scales, mins = make_qkx2_quants(sub, av_x + sub.abs(), nmax, rmin, 0.1, nstep)
    scales, mins = scales.reshape(nb, 8), mins.reshape(nb, 8)
    zero = torch.zeros((), dtype=_F32)  # the C loop's running max from +0.0 (a -0.0 min never replaces it)
    max_scale = torch.where(scales > 0, scales, zero).amax(dim=1, keepdim=True)
    max_min = torch.where(mins > 0, mins, zero).amax(dim=1, keepdim=True)
    inv_scale = torch.where(max_scale > 0, _f(63) / torch.where(max_scale > 0, max_scale, _f(1)), _f(0))
    inv_min = torch.where(max_min > 0, _f(63) / torch.where(max_min > 0, max_min, _f(1)), _f(0))
    ls = (nearest_int(inv_scale * scales) & 0xFF).clamp(max=63)  # uint8_t ls = nearest_int(...); MIN(63, ls)
    lm = (nearest_int(inv_min * mins) & 0xFF).clamp(max=63)
    d16, dmin16 = (max_scale / _f(63)).to(torch.float16), (max_min / _f(63)).to(torch.float16)
    d = d16.to(_F32) * ls.to(_F32)  # (B, 8)
    dm = dmin16.to(_F32) * lm.to(_F32)
    d_e, dm_e = d.reshape(1, -1), dm.reshape(1, -1)  # (1, S) against (32, S)
    recoded = nearest_int((sub + dm_e) / torch.where(d_e != 0, d_e, _f(1))).clamp(0, nmax)
    L = torch.where(d_e != 0, recoded, L)  # `if (!d) continue;` keeps make_qkx2_quants' codes
    L = L.T.reshape(nb, 4, 2, 32).to(torch.int64)  # (B, 64-chunk, half, 32)
    qs = ((L[:, :, 0] & 0xF) | ((L[:, :, 1] & 0xF) << 4)).reshape(nb, 128)
    parts = [_fp16_bytes(d16), _fp16_bytes(dmin16), _pack_scales_k4(ls, lm)]
    if t.bits == 5:  # qh[j]: bit 2c (element 64c + j) and bit 2c + 1 (element 64c + 32 + j)
        high = (L >> 4) & 1  # (B, 4, 2, 32)
        shifts = (2 * torch.arange(4).reshape(1, 4, 1, 1) + torch.arange(2).reshape(1, 1, 2, 1))
        parts.append((high << shifts).sum(dim=(1, 2)))
    parts.append(qs)
    return torch.cat([p.to(torch.uint8) for p in parts], dim=1)


def _quantize_q2(x: torch.Tensor) -> torch.Tensor:
    """``quantize_row_q2_K_ref`` of super-blocks ``(B, 256)`` -> bytes ``(B, 84)``: sixteen sub-blocks of 16 fitted
    by ``make_qkx2_quants(16, 3, ..., weights |x|, -0.5, 0.1, 15, use_mad)``, 4-bit scales and mins in one byte."""
    nb = x.shape[0]
    sub = x.reshape(nb * 16, 16).T.contiguous()  # (16, S)
    L, scales, mins = make_qkx2_quants(sub, sub.abs(), 3, -0.5, 0.1, 15, use_mad=True)
    scales, mins = scales.reshape(nb, 16), mins.reshape(nb, 16)
    zero = torch.zeros((), dtype=_F32)
    max_scale = torch.where(scales > 0, scales, zero).amax(dim=1, keepdim=True)
    max_min = torch.where(mins > 0, mins, zero).amax(dim=1, keepdim=True)
    ls = torch.where(max_scale > 0, nearest_int(_f(15) / torch.where(max_scale > 0, max_scale, _f(1)) * scales), 0)
    lm = torch.where(max_min > 0, nearest_int(_f(15) / torch.where(max_min > 0, max_min, _f(1)) * mins), 0)
    packed = ((ls & 0xFF) | (lm << 4)) & 0xFF  # y[i].scales[j] = l; y[i].scales[j] |= (l << 4), as uint8
    d16 = torch.where(max_scale > 0, max_scale / _f(15), zero).to(torch.float16)
    dmin16 = torch.where(max_min > 0, max_min / _f(15), zero).to(torch.float16)
    d = (d16.to(_F32) * (packed & 0xF).to(_F32)).reshape(1, -1)  # (1, S)
    dm = (dmin16.to(_F32) * (packed >> 4).to(_F32)).reshape(1, -1)
    recoded = nearest_int((sub + dm) / torch.where(d != 0, d, _f(1))).clamp(0, 3)
    L = torch.where(d != 0, recoded, L).T.reshape(nb, 2, 4, 32).to(torch.int64)  # (B, 128-half, quarter, 32)
    qs = (L << (2 * torch.arange(4).reshape(1, 1, 4, 1))).sum(dim=2).reshape(nb, 64)
    return torch.cat([packed.to(torch.uint8), qs.to(torch.uint8), _fp16_bytes(d16), _fp16_bytes(dmin16)], dim=1)


def _quantize_q3(x: torch.Tensor) -> torch.Tensor:
    """``quantize_row_q3_K_ref`` of super-blocks ``(B, 256)`` -> bytes ``(B, 110)``: sixteen sub-blocks of 16 fitted
    by :func:`make_q3_quants`, 6-bit scales (offset 32) against the fp16 ``d = max_scale / -32``, codes
    re-coded as ``nearest_int(x / (d * sc_j))`` in ``[-4, 3]``; the third bit of each code goes to ``hmask``."""
    nb = x.shape[0]
    sub = x.reshape(nb * 16, 16).T.contiguous()  # (16, S)
    L, scales = make_q3_quants(sub, 4)
    scales = scales.reshape(nb, 16)
    max_scale = scales.gather(1, scales.abs().argmax(dim=1, keepdim=True))  # the first largest |scale|
    some = max_scale != 0
    iscale = _f(-32) / torch.where(some, max_scale, _f(1))
    raw = nearest_int(iscale * scales) & 0xFF
    l = torch.where(some, torch.where(raw > 127, raw - 256, raw).clamp(-32, 31) + 32, 0)  # int8_t, MAX, MIN, + 32
    low = (l[:, :8] & 0xF) | ((l[:, 8:] & 0xF) << 4)  # (B, 8)
    high = ((l >> 4).reshape(nb, 4, 4) << (2 * torch.arange(4).reshape(1, 4, 1))).sum(dim=1)  # (B, 4): j%4, j/4
    d16 = torch.where(some, _f(1) / iscale, _f(0)).to(torch.float16)
    d = (d16.to(_F32) * (l - 32).to(_F32) * some).reshape(1, -1)  # (1, S); 0 where the scales are all zero
    recoded = nearest_int(sub / torch.where(d != 0, d, _f(1))).clamp(-4, 3) + 4
    L = torch.where(d != 0, recoded, L).T.reshape(nb, 256).to(torch.int64)
    hmask = ((L.reshape(nb, 8, 32) > 3).to(torch.int64) << torch.arange(8).reshape(1, 8, 1)).sum(dim=1)  # (B, 32)
    q = (L & 3).reshape(nb, 2, 4, 32)
    qs = (q << (2 * torch.arange(4).reshape(1, 1, 4, 1))).sum(dim=2).reshape(nb, 64)
    return torch.cat([hmask.to(torch.uint8), qs.to(torch.uint8), low.to(torch.uint8), high.to(torch.uint8),
                      _fp16_bytes(d16)], dim=1)


def _quantize_q6(x: torch.Tensor) -> torch.Tensor:
    """``quantize_row_q6_K_ref`` of super-blocks ``(B, 256)`` -> bytes ``(B, 210)``."""
    nb = x.shape[0]
    sub = x.reshape(nb * 16, 16).T.contiguous()  # (16, S)
    L, scales = make_qx_quants(sub, 32)
    scales = scales.reshape(nb, 16)
    first = scales.abs().argmax(dim=1, keepdim=True)  # the first of the largest |scale| (strict > in C)
    max_scale = scales.gather(1, first)
    empty = max_scale.abs() < GROUP_MAX_EPS
    iscale = _f(-128) / torch.where(empty, _f(1), max_scale)
    d16 = (_f(1) / iscale).to(torch.float16)
    sc = (nearest_int(iscale * scales).clamp(max=127) & 0xFF).to(torch.uint8).view(torch.int8)  # (B, 16)
    d = (d16.to(_F32) * sc.to(_F32)).reshape(1, -1)  # (1, S)
    recoded = nearest_int(sub / torch.where(d != 0, d, _f(1))).clamp(-32, 31) + 32
    L = torch.where(d != 0, recoded, L).T.reshape(nb, 2, 4, 32).to(torch.int64)  # (B, 128-half, quarter, 32)
    ql = torch.cat([(L[:, :, 0] & 0xF) | ((L[:, :, 2] & 0xF) << 4), (L[:, :, 1] & 0xF) | ((L[:, :, 3] & 0xF) << 4)],
                   dim=2).reshape(nb, 128)
    qh = ((L >> 4) << (2 * torch.arange(4).reshape(1, 1, 4, 1))).sum(dim=2).reshape(nb, 64)
    data = torch.cat([ql.to(torch.uint8), qh.to(torch.uint8), sc.view(torch.uint8), _fp16_bytes(d16)], dim=1)
    return torch.where(empty, torch.zeros_like(data), data)  # memset(&y[i], 0, ...) for an all-zero super-block


def quantize_k(w: torch.Tensor, t: KType) -> torch.Tensor:
    """The packed bytes ``(*rows, row_length / 256 * type_size)`` of ``w`` quantized as llama.cpp's
    ``quantize_row_<t>_ref`` does it (no importance matrix)."""
    x = as_superblocks(w)
    quantizers = {2: _quantize_q2, 3: _quantize_q3, 6: _quantize_q6}
    data = quantizers[t.bits](x) if t.bits in quantizers else _quantize_affine(x, t)
    return data.reshape(*w.shape[:-1], w.shape[-1] // QK_K * t.type_size)


def dequantize_k(raw: torch.Tensor, t: KType) -> torch.Tensor:
    """fp32 values of packed super-blocks ``(*rows, n * type_size)`` uint8, as llama.cpp's
    ``dequantize_row_q4_K`` / ``_q5_K`` / ``_q6_K`` (and ``gguf.quants.dequantize``): ``(*rows, n * 256)``."""
    if raw.dim() == 0 or raw.shape[-1] % t.type_size:
        raise TightropeError(f"{t.name} data has rows of whole {t.type_size}-byte super-blocks; this has shape "
                             f"{tuple(raw.shape)}.")
    shape = (*raw.shape[:-1], raw.shape[-1] // t.type_size * QK_K)
    b = raw.reshape(-1, t.type_size).to(torch.int64)
    nb = b.shape[0]
    if t.bits == 2:  # y = d * (sc & 0xF) * q - dmin * (sc >> 4), sub-blocks of 16
        sc, qs = b[:, :16], b[:, 16:80].reshape(nb, 2, 1, 32)
        halves = raw.reshape(-1, t.type_size)[:, 80:84].contiguous().view(torch.float16).to(_F32)  # (B, 2): d, dmin
        q = ((qs >> (2 * torch.arange(4).reshape(1, 1, 4, 1))) & 3).reshape(nb, 16, 16)
        dl = (halves[:, :1] * (sc & 0xF).to(_F32)).reshape(nb, 16, 1)
        ml = (halves[:, 1:] * (sc >> 4).to(_F32)).reshape(nb, 16, 1)
        return (dl * q.to(_F32) - ml).reshape(shape)
    if t.bits == 3:  # y = d * (sc - 32) * (q - 4), q's third bit in hmask
        hm, qs, sc = b[:, :32], b[:, 32:96].reshape(nb, 2, 1, 32), unpack_scales_q3(b[:, 96:108])
        d = raw.reshape(-1, t.type_size)[:, 108:110].contiguous().view(torch.float16).to(_F32)  # (B, 1)
        q2 = ((qs >> (2 * torch.arange(4).reshape(1, 1, 4, 1))) & 3).reshape(nb, 8, 32)
        high = (hm.reshape(nb, 1, 32) >> torch.arange(8).reshape(1, 8, 1)) & 1  # element 32b + m: bit b of hmask[m]
        q = (q2 + 4 * high - 4).reshape(nb, 16, 16)
        return ((d * sc.to(_F32)).reshape(nb, 16, 1) * q.to(_F32)).reshape(shape)
    if t.bits == 6:
        ql, qh = b[:, :128].reshape(nb, 2, 64), b[:, 128:192].reshape(nb, 2, 1, 32)
        sc = b[:, 192:208].to(torch.uint8).view(torch.int8).to(_F32)  # (B, 16)
        d = raw.reshape(-1, t.type_size)[:, 208:210].contiguous().view(torch.float16).to(_F32)  # (B, 1)
        low = torch.stack([ql[:, :, :32] & 0xF, ql[:, :, 32:] & 0xF, ql[:, :, :32] >> 4, ql[:, :, 32:] >> 4], dim=2)
        q = (low | (((qh >> (2 * torch.arange(4).reshape(1, 1, 4, 1))) & 3) << 4)) - 32  # (B, 2, 4, 32)
        scale = (d * sc).reshape(nb, 16, 1)  # d * sc[is] first, as the C expression
        return (scale * q.reshape(nb, 16, 16).to(_F32)).reshape(shape)
    halves = raw.reshape(-1, t.type_size)[:, :4].contiguous().view(torch.float16).to(_F32)  # (B, 2): d, dmin
    sc, m = unpack_scales_k4(b[:, 4:16])
    qs = b[:, -128:].reshape(nb, 4, 32)
    q = torch.stack([qs & 0xF, qs >> 4], dim=2)  # (B, 4, 2, 32)
    if t.bits == 5:
        qh = b[:, 16:48].reshape(nb, 1, 1, 32)
        shifts = 2 * torch.arange(4).reshape(1, 4, 1, 1) + torch.arange(2).reshape(1, 1, 2, 1)
        q = q | (((qh >> shifts) & 1) << 4)
    d1 = (halves[:, :1] * sc.to(_F32)).reshape(nb, 8, 1)
    m1 = (halves[:, 1:] * m.to(_F32)).reshape(nb, 8, 1)
    return (d1 * q.reshape(nb, 8, 32).to(_F32) - m1).reshape(shape)
