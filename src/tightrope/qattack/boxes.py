"""Per-weight preimage intervals ("boxes") of zero-shot quantizers.

Egashira et al. 2024, "Exploiting LLM Quantization" (arXiv 2405.18137), Sec. 3, step 2: for every
full-precision weight ``w`` compute the interval ``[lo, hi]`` of values that the quantizer maps to
the *same* code as ``w``, with the quantization scale held fixed. Any model whose weights all lie
inside their boxes quantizes to exactly the same integer codes and scales, hence to exactly the
same quantized model. The element that sets a scale (the absmax of a row, block or tensor) is
pinned, ``lo = hi = w``, and every other weight is kept within ``[-absmax, absmax]``, so no scale
can move (the paper's constraint that the absmax stays fixed).

Quantizers (code maths in :mod:`tightrope.compress.primitives`, checked against the libraries):

- ``llm-int8``: bitsandbytes LLM.int8() weights, row-wise absmax int8 on the fp16 cast,
  ``q = round(w16 * (127 / absmax_row))`` (Dettmers et al. 2022, eq. 1).
- ``nf4`` / ``fp4``: bitsandbytes 4-bit block-wise absmax, blocksize 64,
  ``q = nearest(clamp(w * (1 / absmax_b), -1, 1))`` (QLoRA eq. 1).
- ``int8-tensor``: torch.ao dynamic int8 weights, symmetric per tensor (``quantize_dynamic``'s
  default qconfig) or per output channel, ``q = clamp(round(w * (1 / s)), -128, 127)``,
  ``s = absmax / 127.5``.
- ``all``: the intersection of the three bitsandbytes boxes, as in the paper (Sec. 4 "all").
- ``gguf-q8_0``, ``gguf-q4_0``, ``gguf-q5_0``, ``gguf-q4_1``, ``gguf-q5_1``: llama.cpp's legacy GGUF
  blocks of 32 (:mod:`tightrope.compress.gguf`, bytes checked against ``gguf.quants``). The element
  that sets the scale is pinned (the signed largest-magnitude value of Q4_0 / Q5_0, the absmax of
  Q8_0, the max and min of the ``_1`` types), so every byte of the block stays the same.
- ``gguf-q4_k_m``, ``gguf-q4_k_s``, ``gguf-q5_k_m``, ``gguf-q5_k_s``: llama-quantize presets, which mix types per
  layer (:mod:`tightrope.compress.gguf_preset`). A layer whose type is a legacy one (a k-quant whose rows are
  no multiple of 256 falls back to one) gets that type's box; a layer that stays a k-quant has no exact box and is
  pinned whole by default (:func:`model_boxes`, which lists it in ``ModelBoxes.unboxed``), so an attack must leave it
  as it is. The noise defense (:func:`box_noise`) still moves it, by its sub-blocks' quantization steps.
- ``gguf-q2_k`` ... ``gguf-q6_k`` (k-quants, also the layers of a preset that stay k-quants), only with
  ``kquant_boxes=True``: the error-based intervals of "Mind the Gap" (Egashira et al., ICML 2025;
  :mod:`tightrope.qattack.kquant_boxes`), ``[min(w, q), max(w, q)]`` with ``q`` the dequantized weight and the
  scale setters pinned. They are *not* exact: a point inside them may change some sub-block's scale search.
  So :func:`model_boxes` gives such boxes a ``refresh`` that re-quantizes the layer during the projected repair
  and pins the sub-blocks whose bytes moved (back to the boxed weights at the next projection), and
  :func:`settle_kquants_` restores, after training, whatever still quantizes differently; after it every byte
  is the boxed model's.

Every quantizer above but the k-quants is monotone in ``w`` for a fixed scale, so the preimage of a code is an interval.
Its ends are first computed analytically (code boundary divided by the scale factor) and then
made exact with a few ``nextafter`` steps against the quantizer's own floating-point formula:
the returned ends quantize to the code themselves, and the next float beyond them does not (the
boxes are tight). LLM.int8 casts to fp16 first: its box is found on the fp16 grid, then widened
to every fp32 value whose fp16 cast falls inside it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from tightrope.compress import gguf as G
from tightrope.compress.gguf_k import quantize_k
from tightrope.compress.gguf_preset import PRESET_SCHEMES, has_box, layer_types
from tightrope.compress.primitives import CODES_4BIT
from tightrope.errors import TightropeError, did_you_mean
from tightrope.qattack.kquant_boxes import (
    KQuantSettle,
    box_kquant,
    changed_sub_blocks,
    kquant_noise_width,
    settle_kquant_,
    sub_blocks,
)

# Scheme names of tightrope.compress.specs.QUANT_SCHEMES (one name per scheme across the package).
# The default set of the attacks' checks and of the audit (the audit's shipped null is calibrated on these).
QUANTIZERS = ("llm-int8", "nf4", "fp4", "int8-tensor")
# GGUF legacy block types with exact boxes (tightrope.compress.gguf; the k-quants have error-based ones on request,
# kquant_boxes=True); the attacks verify
# them and the audit quantizes them with llama.cpp's gguf.quants (tightrope.qattack.quantize), on request:
# they are not in the defaults.
GGUF_QUANTIZERS = tuple(G.SCHEMES)
# The one registry of names the attack scenarios and the audit accept; each is quantized by a real library
# (tightrope.qattack.quantize.LIBRARIES).
ATTACK_QUANTIZERS = (*QUANTIZERS, *GGUF_QUANTIZERS)
# llama-quantize presets (gguf-q4_k_m ...): boxes per layer where its type has one (module docstring); not in
# the audit's defaults until its null holds them.
PRESET_QUANTIZERS = tuple(PRESET_SCHEMES)
ALL_MEMBERS = ("llm-int8", "nf4", "fp4")  # the paper's "all": every bitsandbytes zero-shot format
CHOICES = (*ATTACK_QUANTIZERS, *PRESET_QUANTIZERS, "all")
RENAMED = {"int8-dynamic": "int8-tensor"}  # spellings from before the names were unified


def check_quantizer(name: str, allowed: tuple[str, ...] = CHOICES, what: str = "") -> None:
    """Refuse a quantizer name that is not in ``allowed`` in one sentence (an old spelling with its new name,
    a GGUF type with the consumers that take it, a misspelling with the closest name)."""
    if name in RENAMED and RENAMED[name] in allowed:
        raise TightropeError(f"The quantizer '{name}' is now called '{RENAMED[name]}' (torch.ao dynamic int8, "
                             "one scale per tensor); 'int8' means dynamic int8 everywhere.")
    if name in G.K_SCHEMES and name not in allowed:
        raise TightropeError(f"The GGUF k-quant '{name}'{what} has no exact boxes, so it is not supported here (quantized_copy "
                             "and fake quantization take it, and qattack-lm --kquant-boxes attacks a preset's k-quant "
                             f"layers in error-based ones); choose one of {', '.join(allowed)}.")
    if name in GGUF_QUANTIZERS and name not in allowed:
        raise TightropeError(f"The GGUF type '{name}'{what} is not supported here; choose one of {', '.join(allowed)}.")
    if name not in allowed:
        raise TightropeError(f"Unknown quantizer '{name}'{what}{did_you_mean(name, allowed)}; "
                             f"choose one of {', '.join(allowed)}.")

_REFINE_STEPS = 24  # analytic ends are within a few ulps; 24 steps is a wide safety margin


def _refine(lo: torch.Tensor, hi: torch.Tensor, target: torch.Tensor, code_of: Callable,
            limit_lo: torch.Tensor, limit_hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Make ``[lo, hi]`` the exact preimage of ``target`` under the monotone ``code_of(x, index)``.

    Flat tensors of one dtype. ``code_of(x, idx)`` returns the code of values ``x`` sitting at
    flat positions ``idx`` (so per-element scales can be gathered). Ends are first moved inward
    until they quantize to ``target``, then outward while the next float still does and stays
    within ``[limit_lo, limit_hi]``. Returns ``(lo, hi, ok)``; ``ok`` is False where an end could
    not be made exact (the caller pins those weights).
    """
    lo = torch.maximum(lo, limit_lo)
    hi = torch.minimum(hi, limit_hi)
    up = torch.tensor(float("inf"), dtype=lo.dtype)
    down = -up

    def walk(end: torch.Tensor, towards: torch.Tensor, away: torch.Tensor, limit: torch.Tensor, sign: int) -> None:
        idx = torch.arange(end.numel())
        for _ in range(_REFINE_STEPS):  # inward: until the end itself quantizes to the target
            bad = code_of(end[idx], idx) * sign > target[idx] * sign
            idx = idx[bad]
            if idx.numel() == 0:
                break
            end[idx] = torch.nextafter(end[idx], towards.expand(idx.numel()))
        idx = torch.arange(end.numel())
        for _ in range(_REFINE_STEPS):  # outward: while the next float is still inside
            nxt = torch.nextafter(end[idx], away.expand(idx.numel()))
            good = (code_of(nxt, idx) == target[idx]) & (nxt * sign <= limit[idx] * sign)
            idx, nxt = idx[good], nxt[good]
            if idx.numel() == 0:
                break
            end[idx] = nxt

    walk(hi, down, up, limit_hi, +1)
    walk(lo, up, down, limit_lo, -1)
    idx = torch.arange(lo.numel())
    ok = (code_of(lo, idx) == target) & (code_of(hi, idx) == target) & (lo <= hi)
    return lo, hi, ok


def _pin(w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, pinned: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.where(pinned, w, lo), torch.where(pinned, w, hi)


def box_llm_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes of bitsandbytes LLM.int8() row-wise absmax int8 (on the fp16 cast) for a 2-D ``w``.

    Code ``q = round(w16 * s_i)``, ``s_i = 127 / absmax_i`` (fp32); its preimage on the fp16 grid is
    ``[(q - 1/2) / s_i, (q + 1/2) / s_i]`` up to rounding, clipped to ``[-absmax_i, absmax_i]``.
    The arg-absmax of each row is pinned; all-zero rows are pinned whole.
    """
    if w.dim() != 2:
        raise TightropeError(f"LLM.int8 quantizes 2-D weights, not shape {tuple(w.shape)}.")
    w = w.detach().float()
    w16 = w.to(torch.float16)
    absmax = w16.abs().amax(dim=1)  # (out,) fp16
    s = 127.0 / absmax.float()  # (out,) fp32, as bitsandbytes
    rows = torch.arange(w.shape[0]).repeat_interleave(w.shape[1])
    s_flat, a_flat = s[rows], absmax[rows]
    x = w16.reshape(-1)

    def code_of(v: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return torch.round(v * s_flat[idx])  # fp16 * fp32 -> fp32, as bitsandbytes

    q = code_of(x, torch.arange(x.numel()))
    lo = ((q - 0.5) / s_flat).to(torch.float16)
    hi = ((q + 0.5) / s_flat).to(torch.float16)
    lo, hi, ok = _refine(torch.nan_to_num(lo), torch.nan_to_num(hi), torch.nan_to_num(q), code_of, -a_flat, a_flat)
    pinned = ~ok | (a_flat == 0)
    arg = w16.abs().argmax(dim=1) + torch.arange(w.shape[0]) * w.shape[1]
    pinned[arg] = True
    lo, hi = _pin(w.reshape(-1), *_fp32_preimage_of_fp16(lo, hi), pinned)
    return lo.reshape(w.shape), hi.reshape(w.shape)


def _fp32_preimage_of_fp16(lo16: torch.Tensor, hi16: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp32 values whose fp16 cast (round to nearest, ties to even) lies in ``[lo16, hi16]``.

    The end beyond ``hi16`` is the midpoint to the next fp16 value (exact in fp32), kept when the
    tie rounds back to ``hi16`` and otherwise one fp32 ulp below it; likewise below ``lo16``.
    """
    inf = torch.tensor(float("inf"), dtype=torch.float16)
    up16 = torch.nextafter(hi16, inf.expand_as(hi16))
    down16 = torch.nextafter(lo16, (-inf).expand_as(lo16))
    mid_hi = (hi16.float() + up16.float()) / 2
    mid_lo = (lo16.float() + down16.float()) / 2
    hi = torch.where(mid_hi.to(torch.float16) == hi16, mid_hi, torch.nextafter(mid_hi, torch.full_like(mid_hi, -float("inf"))))
    lo = torch.where(mid_lo.to(torch.float16) == lo16, mid_lo, torch.nextafter(mid_lo, torch.full_like(mid_lo, float("inf"))))
    return lo, hi


_CHUNK_BLOCKS = 8192  # blocks per chunk (512K weights at blocksize 64): temporaries stay cache-sized


def _rank(scaled: torch.Tensor, bounds: list[float]) -> torch.Tensor:
    """Sorted-code rank of already scaled values: the number of bucket bounds strictly below each
    (``torch.bucketize(clamp(scaled, -1, 1), bounds)``, right=False; 15 uint8 compare-adds are about
    twice as fast as the binary search on CPU, and the clamp does not matter as every bound is in (-1, 1))."""
    rank = torch.zeros(scaled.shape, dtype=torch.uint8)
    for b in bounds:
        rank += scaled > b
    return rank.long()


def _blockwise_chunk(x: torch.Tensor, bounds: torch.Tensor, divide: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes of the blocks ``x`` (rows of one block each); ``divide``: the short-block formula.

    Within a block every weight with sorted code ``k`` has the same box, so the ends are solved
    once per (block, bound) pair: ``t_j`` is the largest float whose scaled value is still
    ``<= bounds[j]``; code ``k`` then has preimage ``[nextup(t_{k-1}), t_k]`` clipped to the absmax.
    These 15 thresholds per block are refined exactly with ``nextafter`` against the quantizer's own
    float formula, checked, and gathered per weight (a quarter of the per-weight work at block 64).
    """
    absmax, arg = x.abs().max(dim=1, keepdim=True)  # (B, 1): the scale setters
    safe = absmax.clamp(min=1e-38)
    recip = 1.0 / safe

    def scale(v: torch.Tensor) -> torch.Tensor:
        return v / safe if divide else v * recip

    inf = torch.tensor(float("inf"))
    t = bounds * safe  # (B, 15) analytic thresholds, within a few ulps
    for _ in range(_REFINE_STEPS):  # inward: until t itself scales to <= the bound
        over = scale(t) > bounds
        if not over.any():
            break
        t = torch.where(over, torch.nextafter(t, -inf), t)
    for _ in range(_REFINE_STEPS):  # outward: while the next float still scales to <= the bound
        up = torch.nextafter(t, inf)
        fits = scale(up) <= bounds
        if not fits.any():
            break
        t = torch.where(fits, up, t)
    hi_tab = torch.cat([torch.minimum(t, absmax), absmax], dim=1)  # (B, 16): hi of sorted code k
    lo_tab = torch.cat([-absmax, torch.maximum(torch.nextafter(t, inf), -absmax)], dim=1)
    blist = bounds.reshape(-1).tolist()
    codes = torch.arange(lo_tab.shape[1])
    ok_tab = (_rank(scale(lo_tab), blist) == codes) & (_rank(scale(hi_tab), blist) == codes) & (lo_tab <= hi_tab)
    k = _rank(scale(x), blist)  # (B, blocksize) sorted-code rank of every weight
    lo, hi, ok = lo_tab.gather(1, k), hi_tab.gather(1, k), ok_tab.gather(1, k)
    pinned = ~ok | (absmax == 0)
    pinned.scatter_(1, arg, True)
    return torch.where(pinned, x, lo), torch.where(pinned, x, hi)


def box_blockwise(w: torch.Tensor, code: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes of block-wise absmax quantization onto ``code`` (NF4, FP4), as bitsandbytes does it.

    ``w`` is flattened row-major into blocks of ``blocksize``; per block ``r_b = 1 / absmax_b``
    (fp32) and ``scaled = clamp(w * r_b, -1, 1)``; the code is found by bucketing ``scaled`` at the
    midpoints ``m_k`` of the sorted code values (a value on a midpoint goes to the lower code), so
    the sorted code ``k`` has preimage ``(m_{k-1} / r_b, m_k / r_b]``. The last, short block is
    divided by its absmax rather than multiplied by the reciprocal, as bitsandbytes' kernel does.
    The arg-absmax of each block is pinned; all-zero blocks are pinned whole. Large weights are
    processed in chunks of blocks (see :func:`_blockwise_chunk`).
    """
    if blocksize <= 0:
        raise TightropeError(f"The block size must be positive, not {blocksize}.")
    shape = w.shape
    x = w.detach().reshape(-1).float()
    n = x.numel()
    sorted_code = torch.sort(code.float()).values
    bounds = ((sorted_code[:-1] + sorted_code[1:]) / 2).reshape(1, -1)  # (1, 15)
    lo, hi = torch.empty_like(x), torch.empty_like(x)
    n_full = n // blocksize
    step = _CHUNK_BLOCKS * blocksize
    for start in range(0, n_full * blocksize, step):
        stop = min(start + step, n_full * blocksize)
        c_lo, c_hi = _blockwise_chunk(x[start:stop].view(-1, blocksize), bounds, divide=False)
        lo[start:stop], hi[start:stop] = c_lo.reshape(-1), c_hi.reshape(-1)
    if n % blocksize:
        tail = slice(n_full * blocksize, n)
        c_lo, c_hi = _blockwise_chunk(x[tail].view(1, -1), bounds, divide=True)
        lo[tail], hi[tail] = c_lo.reshape(-1), c_hi.reshape(-1)
    return lo.reshape(shape), hi.reshape(shape)


def box_nf4(w: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes of bitsandbytes NF4 (QLoRA NormalFloat4), block-wise absmax, blocksize 64."""
    return box_blockwise(w, CODES_4BIT["nf4"], blocksize)


def box_fp4(w: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes of bitsandbytes FP4 (E2M1), block-wise absmax, blocksize 64."""
    return box_blockwise(w, CODES_4BIT["fp4"], blocksize)


def box_int8_dynamic(w: torch.Tensor, per_channel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes of torch.ao dynamic int8 weights (symmetric, zero point 0).

    ``s = max(absmax / 127.5, eps)`` per tensor (``quantize_dynamic``'s default) or per output
    channel; FBGEMM quantizes with ``q = clamp(round(w * (1 / s)), -128, 127)`` in fp32, so code
    ``q`` has preimage ``[(q - 1/2) s, (q + 1/2) s]`` up to rounding, clipped to the absmax.
    The arg-absmax (of the tensor, or of each row) is pinned.
    """
    if w.dim() != 2:
        raise TightropeError(f"Dynamic int8 quantizes 2-D Linear weights, not shape {tuple(w.shape)}.")
    w = w.detach().float()
    absmax = w.abs().amax(dim=1) if per_channel else w.abs().amax().reshape(1)
    scale = torch.clamp(absmax / 127.5, min=torch.finfo(torch.float32).eps)
    inv = 1.0 / scale
    which = torch.arange(w.shape[0]).repeat_interleave(w.shape[1]) if per_channel else torch.zeros(w.numel(), dtype=torch.long)
    inv_flat, a_flat, s_flat = inv[which], absmax[which], scale[which]
    x = w.reshape(-1)

    def code_of(v: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return torch.clamp(torch.round(v * inv_flat[idx]), -128, 127)

    q = code_of(x, torch.arange(x.numel()))
    lo, hi, ok = _refine((q - 0.5) * s_flat, (q + 0.5) * s_flat, q, code_of, -a_flat, a_flat)
    pinned = ~ok | (a_flat == 0)
    if per_channel:
        pinned[w.abs().argmax(dim=1) + torch.arange(w.shape[0]) * w.shape[1]] = True
    else:
        pinned[x.abs().argmax()] = True
    lo, hi = _pin(x, lo, hi, pinned)
    return lo.reshape(w.shape), hi.reshape(w.shape)


def _ordered(v: torch.Tensor) -> torch.Tensor:
    """fp32 -> int64 keys in the floats' order (adjacent floats have adjacent keys; -0.0 and 0.0 share 0)."""
    bits = v.contiguous().view(torch.int32).to(torch.int64)
    return torch.where(bits >= 0, bits, -(bits & 0x7FFFFFFF))


def _from_ordered(key: torch.Tensor) -> torch.Tensor:
    bits = torch.where(key >= 0, key, (-key) | 0x80000000)
    return torch.where(bits >= 2 ** 31, bits - 2 ** 32, bits).to(torch.int32).view(torch.float32)


def _bisect(x: torch.Tensor, limit: torch.Tensor, target: torch.Tensor, code_of: Callable,
            guess: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The float farthest from ``x`` towards ``limit`` (inclusive) whose code is still ``target`` (the code of
    ``x``), for a code that is monotone in the value: a bisection over the floats between them, exact.

    ``guess``: an analytic bracket ``(inside, outside)`` of the end; each side is used where it checks out
    (the inside point has the code, the outside one has not), so the bisection runs over a few thousand
    floats rather than all between ``x`` and ``limit``. Used where :func:`_refine`'s few-ulp walk does not
    reach: codes computed after adding a constant larger than the scaled value (``x / d + 16.5``) or
    subtracting a minimum round many neighbouring floats of ``x`` alike.
    """
    idx = torch.arange(x.numel())
    low, high = torch.minimum(x, limit), torch.maximum(x, limit)
    good, bad = x.clone(), limit.clone()
    candidates = [limit] if guess is None else [torch.clamp(guess[0], low, high), torch.clamp(guess[1], low, high), limit]
    for i, point in enumerate(candidates):
        same = code_of(point, idx) == target
        good = torch.where(same, point, good)  # candidates go outwards: the last one inside is the best
        if i == 1 or point is limit:
            bad = torch.where(~same & (bad == limit), point, bad)
    good_k, bad_k = _ordered(good), _ordered(bad)
    open_idx = torch.nonzero((bad_k - good_k).abs() > 1).reshape(-1)
    while open_idx.numel():
        g, b = good_k[open_idx], bad_k[open_idx]
        mid = g + (b - g) // 2
        same = code_of(_from_ordered(mid), open_idx) == target[open_idx]
        good_k[open_idx] = torch.where(same, mid, g)
        bad_k[open_idx] = torch.where(same, b, mid)
        open_idx = open_idx[(bad_k[open_idx] - good_k[open_idx]).abs() > 1]
    return _from_ordered(good_k)


def box_gguf(w: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes of a GGUF legacy block type (``gguf-q8_0`` ... ``gguf-q5_1``): every byte of every block stays.

    ``w`` is cut row-major into blocks of 32 (:mod:`tightrope.compress.gguf`). With the block's scale
    setter pinned, ``d``, its fp16 bytes, ``1/d`` and ``m`` are fixed, and the code is a monotone function
    of each other weight, so its preimage is an interval; its ends are found exactly by bisection over
    the floats (:func:`_bisect`). The other weights stay within the setter's range: ``[-absmax, absmax]``
    (symmetric types) or ``[min, max]`` (``_1`` types). Q4_0 / Q5_0 keep the *signed* largest-magnitude
    value and take the first on ties, so a weight before the setter may not reach ``-M`` (it would become
    the setter and flip the sign of ``d``); a weight after it may. Blocks with ``d = 0`` (all zero, or
    constant for ``_1``) are pinned whole.
    """
    t = G.block_type(scheme)
    shape = w.shape
    x = G.as_blocks(w)  # (B, 32) fp32, or the one-sentence refusal of a row length that is no multiple of 32
    d, inv, m, setter = G.block_parameters(x, t)
    if t.offset:
        limit_lo, limit_hi = m.expand_as(x), x.gather(1, setter).expand_as(x)
    else:
        top = x.gather(1, setter)  # signed (Q8_0: its sign does not matter)
        limit_lo, limit_hi = (-top.abs()).expand_as(x), top.abs().expand_as(x)
        if t.bits != 8:  # a weight before the setter reaching -top would become the setter
            before = torch.arange(G.QK).expand_as(x) < setter
            inward = torch.nextafter(-top, top).abs()
            limit_lo = torch.where(before & (top > 0), -inward, limit_lo)
            limit_hi = torch.where(before & (top < 0), inward, limit_hi)
    inv_f, m_f = inv.expand_as(x).reshape(-1), m.expand_as(x).reshape(-1)

    def code_of(v: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return G.block_codes(v, t, inv_f[idx], m_f[idx])

    flat = x.reshape(-1)
    q = code_of(flat, torch.arange(flat.numel()))
    # analytic ends (fp64) of the code's interval in x / d (+ offset), and a generous margin for fp32 rounding
    q64, inv64, m64 = q.double().reshape(x.shape), inv.double(), m.double()
    shift = 0.0 if t.bits == 8 or t.offset else 2 ** (t.bits - 1)
    safe = torch.where(inv64 == 0, torch.ones_like(inv64), inv64)
    a, b = m64 + (q64 - shift - 0.5) / safe, m64 + (q64 - shift + 0.5) / safe
    end_lo, end_hi = torch.minimum(a, b), torch.maximum(a, b)
    margin = 8 * 2.0 ** -23 * ((2 ** t.bits + 1) / safe.abs() + end_hi.abs() + (end_hi - m64).abs()) + 1e-37
    stuck = (d == 0).expand_as(x).reshape(-1)  # pinned whole: nothing to search
    guess_lo = ((end_lo + margin).float().reshape(-1), (end_lo - margin).float().reshape(-1))
    guess_hi = ((end_hi - margin).float().reshape(-1), (end_hi + margin).float().reshape(-1))
    lo = _bisect(flat, torch.where(stuck, flat, limit_lo.reshape(-1)), q, code_of, guess_lo)
    hi = _bisect(flat, torch.where(stuck, flat, limit_hi.reshape(-1)), q, code_of, guess_hi)
    pinned = (d == 0).expand_as(x).clone().scatter_(1, setter, True)
    if t.offset:
        pinned.scatter_(1, x.argmin(dim=1, keepdim=True), True)
    lo, hi = _pin(flat, lo, hi, pinned.reshape(-1))
    return lo.reshape(shape), hi.reshape(shape)


def weight_box(w: torch.Tensor, quantizer: str | Iterable[str], blocksize: int = 64, *,
               kquant_boxes: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lo, hi)`` for one weight under one quantizer, ``"all"``, or the intersection of a list. ``kquant_boxes``: a
    GGUF k-quant (``gguf-q4_k`` ...) gets the error-based box of :func:`tightrope.qattack.kquant_boxes.box_kquant`
    (not exact: module docstring); without it a k-quant is refused."""
    if not isinstance(quantizer, str):
        members = tuple(quantizer)
        if not members:
            raise TightropeError("Name at least one quantizer to intersect.")
        boxes = [weight_box(w, q, blocksize, kquant_boxes=kquant_boxes) for q in members]
        lo = torch.stack([b[0] for b in boxes]).amax(0)
        hi = torch.stack([b[1] for b in boxes]).amin(0)
        return lo, hi
    if quantizer == "all":
        return weight_box(w, ALL_MEMBERS, blocksize)
    if quantizer == "llm-int8":
        return box_llm_int8(w)
    if quantizer in ("nf4", "fp4"):
        return box_blockwise(w, CODES_4BIT[quantizer], blocksize)
    if quantizer == "int8-tensor":
        return box_int8_dynamic(w)
    if quantizer in GGUF_QUANTIZERS:
        return box_gguf(w, quantizer)
    if kquant_boxes and quantizer in G.K_SCHEMES:
        return box_kquant(w, quantizer)
    if quantizer in PRESET_QUANTIZERS:
        raise TightropeError(f"'{quantizer}' mixes GGUF types per layer, so one weight has no box without its layer's "
                             "name; take the boxes of the whole model (model_boxes).")
    check_quantizer(quantizer, CHOICES)
    raise AssertionError(quantizer)  # check_quantizer refused it


def shrink(lo: torch.Tensor, hi: torch.Tensor, margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep a fraction ``margin`` (0 <= margin < 0.5) of each box's width free on both sides.

    The paper's safety margin against rounding differences between libraries and devices; larger
    margins leave the repair less room. Pinned weights (``lo == hi``) stay pinned.
    """
    if not 0.0 <= margin < 0.5:
        raise TightropeError(f"The margin is a fraction of the interval width in [0, 0.5), not {margin}.")
    width = hi - lo
    return lo + margin * width, hi - margin * width


def box_position(w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Relative position ``(w - lo) / (hi - lo)`` in [0, 1]; NaN where the box is a point (pinned)."""
    width = hi - lo
    pos = (w.detach().float() - lo) / width
    return torch.where(width > 0, pos.clamp(0, 1), torch.full_like(pos, float("nan")))


# --- whole models ---------------------------------------------------------------------------------

#: Linear layers a zero-shot quantizer leaves in full precision (transformers skips the output head).
HEAD_PATTERNS = ("classifier*", "*.classifier*", "score", "lm_head", "*.lm_head")


def quantized_linears(model: nn.Module, include: tuple[str, ...] = (), exclude: tuple[str, ...] = ()) -> dict[str, nn.Linear]:
    """The Linear layers a quantizer would replace: every Linear but the output head, by default.

    Matches what transformers does with ``BitsAndBytesConfig`` (the pooler is quantized, the
    classification head / lm_head is not). ``include`` / ``exclude`` are fnmatch globs over
    module names, for the paper's ablation over attacked layers.
    """
    import fnmatch  # noqa: PLC0415

    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    if include:
        chosen = {n: m for n, m in linears.items() if any(fnmatch.fnmatch(n, p) for p in include)}
    else:
        chosen = {n: m for n, m in linears.items() if not any(fnmatch.fnmatch(n, p) for p in HEAD_PATTERNS)}
    chosen = {n: m for n, m in chosen.items() if not any(fnmatch.fnmatch(n, p) for p in exclude)}
    if not chosen:
        raise TightropeError("This model has no Linear layer that a supported quantizer would quantize.")
    return chosen


@dataclass
class ModelBoxes:
    """Boxes for the weights of several Linear layers: ``lo[name]``, ``hi[name]`` (fp32, weight shape).

    ``refresh``: boxes that depend on the model itself (Wanda's, through its activations;
    :mod:`tightrope.qattack.pruning`) are recomputed from the model being trained every ``refresh_every`` steps of
    the projected repair; a quantizer's boxes are fixed (None)."""

    quantizer: str
    lo: dict[str, torch.Tensor] = field(default_factory=dict)
    hi: dict[str, torch.Tensor] = field(default_factory=dict)
    margin: float = 0.0
    refresh: Callable[[nn.Module], ModelBoxes] | None = None
    refresh_every: int = 10
    #: layers boxed as k-quants (``kquant_boxes=True``): their scheme, the weights they were boxed around and those
    #: weights' bytes, and the number of sub-blocks that :func:`pin_moved_kquants_` pinned so far
    kquants: dict[str, str] = field(default_factory=dict)
    reference: dict[str, torch.Tensor] = field(default_factory=dict)
    reference_bytes: dict[str, torch.Tensor] = field(default_factory=dict)
    kquant_pinned: int = 0
    #: a preset's layers left as k-quants without a box (pinned whole: ``lo == hi``), and their scheme
    unboxed: dict[str, str] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return list(self.lo)

    def numel(self) -> int:
        return sum(t.numel() for t in self.lo.values())

    def pinned_fraction(self) -> float:
        return sum(int((self.lo[n] == self.hi[n]).sum()) for n in self.lo) / max(1, self.numel())

    @property
    def kquant_layers(self) -> dict[str, str]:
        """``{layer: scheme}`` of every layer quantized as a k-quant, boxed (``kquants``) or pinned whole (``unboxed``)."""
        return {**self.unboxed, **self.kquants}


def preset_schemes(model: nn.Module, preset: str) -> dict[str, str]:
    """``{layer: scheme}`` (``gguf-q5_0``, ``gguf-q6_k`` ...) for every quantized Linear layer of ``model`` under a
    llama-quantize preset (:mod:`tightrope.compress.gguf_preset`)."""
    linears = quantized_linears(model)
    types = layer_types(((n, tuple(m.weight.shape)) for n, m in linears.items()), preset)
    return {name: f"gguf-{t.lower()}" for name, t in types.items()}


#: Projected-repair steps between two re-quantizations of the k-quant layers (:func:`pin_moved_kquants_`).
KQUANT_REFRESH_EVERY = 5


def model_boxes(model: nn.Module, quantizer: str | tuple[str, ...], *, margin: float = 0.0, include: tuple[str, ...] = (),
                exclude: tuple[str, ...] = (), blocksize: int = 64, kquant_boxes: bool = False) -> ModelBoxes:
    """Boxes of every quantized Linear weight of ``model`` (keys: module names). Under a preset, each layer
    gets its own type's box, and a layer left as a k-quant is pinned whole (module docstring), or, with
    ``kquant_boxes``, gets Mind the Gap's error-based box, which is re-checked during the repair
    (``refresh``: :func:`pin_moved_kquants_`) and settled after it (:func:`settle_kquants_`)."""
    label = quantizer if isinstance(quantizer, str) else "+".join(quantizer)
    boxes = ModelBoxes(quantizer=label, margin=margin)
    schemes = preset_schemes(model, quantizer) if label in PRESET_QUANTIZERS else {}
    for name, module in quantized_linears(model, include, exclude).items():
        scheme = schemes.get(name, quantizer)
        if isinstance(scheme, str) and scheme in G.K_SCHEMES and kquant_boxes:
            boxes.kquants[name] = scheme
            boxes.reference[name] = module.weight.detach().float().cpu().clone()
            boxes.reference_bytes[name] = quantize_k(boxes.reference[name], G.K_SCHEMES[scheme])
        elif name in schemes and not has_box(schemes[name]):
            w = module.weight.detach().float()
            boxes.lo[name], boxes.hi[name] = w.clone(), w.clone()
            boxes.unboxed[name] = schemes[name]
            continue
        lo, hi = weight_box(module.weight, scheme, blocksize, kquant_boxes=kquant_boxes)
        boxes.lo[name], boxes.hi[name] = shrink(lo, hi, margin) if margin else (lo, hi)
    if boxes.kquants:
        boxes.refresh, boxes.refresh_every = (lambda moved: pin_moved_kquants_(boxes, moved)), KQUANT_REFRESH_EVERY
    return boxes


@torch.no_grad()
def pin_moved_kquants_(boxes: ModelBoxes, model: nn.Module) -> ModelBoxes:
    """Re-quantize the k-quant layers of ``model`` and pin, in ``boxes``, every sub-block whose bytes differ from
    the boxed weights' (``lo = hi`` = the boxed weights: the next projection puts them back). Returns ``boxes``
    (what the ``refresh`` of k-quant boxes runs)."""
    for name, scheme in boxes.kquants.items():
        t = G.K_SCHEMES[scheme]
        n_sub, size = sub_blocks(t)
        ref = boxes.reference[name]
        raw = quantize_k(model.get_submodule(name).weight.detach().float().cpu(), t)
        moved = changed_sub_blocks(raw, boxes.reference_bytes[name], t)  # (B, n_sub)
        if not bool(moved.any()):
            continue
        where = moved.reshape(-1, n_sub, 1).expand(-1, n_sub, size).reshape(ref.shape)
        free = where & (boxes.hi[name] > boxes.lo[name])
        boxes.kquant_pinned += int((free.reshape(-1, n_sub, size).any(dim=2)).sum())
        boxes.lo[name] = torch.where(where, ref, boxes.lo[name])
        boxes.hi[name] = torch.where(where, ref, boxes.hi[name])
    return boxes


@torch.no_grad()
def settle_kquants_(model: nn.Module, boxes: ModelBoxes) -> dict[str, KQuantSettle]:
    """After a projected repair: make every k-quant layer of ``boxes`` quantize to the boxed weights' bytes
    (:func:`tightrope.qattack.kquant_boxes.settle_kquant_`: the sub-blocks, then super-blocks, that moved go back).
    Returns what was restored per layer."""
    return {name: settle_kquant_(model.get_submodule(name).weight, boxes.reference[name], scheme)
            for name, scheme in boxes.kquants.items()}


#: Whether :func:`box_noise` noises a preset's k-quant layers by default (docs/qattack-results.md, "The defense").
NOISE_KQUANTS = True


def noise_width(model: nn.Module, boxes: ModelBoxes, name: str, *, kquants: bool = NOISE_KQUANTS) -> torch.Tensor:
    """The width whose ``scale`` times is each weight's sigma in :func:`box_noise`: its box width (``hi - lo``: a
    legacy block's step, 0 where pinned) or, for a k-quant layer with ``kquants``, its sub-block's quantization step
    (:func:`tightrope.qattack.kquant_boxes.kquant_noise_width`, read from the layer's own bytes)."""
    scheme = boxes.kquant_layers.get(name) if kquants else None
    if scheme is not None:
        return kquant_noise_width(model.get_submodule(name).weight, scheme)
    return boxes.hi[name] - boxes.lo[name]


@torch.no_grad()
def box_noise(model: nn.Module, boxes: ModelBoxes, scale: float, generator: torch.Generator, *,
              kquants: bool = NOISE_KQUANTS) -> dict[str, torch.Tensor]:
    """``{layer: weight + N(0, (scale * width)^2)}`` for every boxed layer: Egashira et al.'s defense (Sec. 5) with
    each weight's sigma calibrated from its own quantization step (GGUF's and bitsandbytes' scales vary block by
    block, so one sigma per layer would be too large for some blocks and too small for others). The width is the
    weight's box width (:func:`noise_width`), and for a preset's k-quant layers (which have no exact box) the step
    of the weight's sub-block, ``|d * sc_j|`` decoded from the bytes, so ``scale`` is the same fraction of a step in
    every layer (a plant in the k-quant layers alone survives 0.05-0.2 of a step, since Mind the Gap's repair parks
    weights on their codes' centres rather than on walls: docs/qattack-results.md). ``kquants=False``: the k-quant
    layers get their box width instead (0 where a preset pins them whole, so they stay as they are). Pinned weights
    (width 0) and exact zeros stay as they are.
    The draws do not depend on ``kquants`` (one normal per weight of every layer, in order), so the other layers get
    the same noise either way."""
    out: dict[str, torch.Tensor] = {}
    for name in boxes.names:
        w = model.get_submodule(name).weight.detach().float()
        step = torch.randn(w.shape, generator=generator) * noise_width(model, boxes, name, kquants=kquants) * scale
        out[name] = torch.where(w == 0, w, w + step)
    return out


@torch.no_grad()
def project_(model: nn.Module, boxes: ModelBoxes) -> None:
    """Clamp every boxed weight into its box, in place (the projection of projected gradient descent)."""
    modules = dict(model.named_modules())
    for name in boxes.names:
        weight = modules[name].weight
        lo, hi = boxes.lo[name].to(weight.device, weight.dtype), boxes.hi[name].to(weight.device, weight.dtype)
        weight.copy_(torch.maximum(torch.minimum(weight, hi), lo))
