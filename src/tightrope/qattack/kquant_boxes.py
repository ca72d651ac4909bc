"""Boxes of GGUF k-quants (Q2_K ... Q6_K), error-based, as in "Mind the Gap".

Egashira et al., "Mind the Gap: A Practical Attack on GGUF Quantization" (ICML 2025), the attack's interval
construction for k-quants (its method section; the equation below): a k-quant's scales come from a search over
candidate scales (:func:`tightrope.compress.gguf_k.make_qkx2_quants`, ``make_qx_quants``, ``make_q3_quants``)
that moves with every weight, so no weight has an exact preimage interval as the legacy types do. The paper's interval is
instead the *quantization error* of each weight: with ``w`` a weight and ``q`` its dequantized value,

    lo = min(w, q),   hi = max(w, q)                                   (the "gap" between w and q)

Moving a weight towards its dequantized value lowers the error of the grid the search chose, so the search tends
to keep its optimum, and then the scales, mins and codes stay. It does not always: ``benchmarks/kquant_boxes.py``
measures that one uniform point of these boxes changes 1.5-12% of the sub-blocks of Gaussian and heavy-tailed
weights (Q6_K: 1.5-3%), so what moved is caught and restored (below).
Two kinds of weights are pinned (``lo = hi = w``), as the paper's reference implementation does
(``q_attack/repair/gguf/emulator.py``, ``GGUFEmulator.get_width``, whose "trick1" and "trick2" defined what
is pinned here):

- every weight of the sub-block(s) that set the super-block's fp16 ``d`` (the largest sub-block scale) and,
  for the affine types, ``dmin`` (the largest sub-block min); tightrope reads them from the packed bytes as
  the sub-blocks whose quantized scale (min) equals the super-block's largest one, so ties pin all of them;
- the largest and the smallest weight of every sub-block, which start the scale search (``max - min``, or
  the signed absmax); the other weights are also kept within the sub-block's ``[min, max]`` (affine types)
  or strictly inside its ``(-absmax, absmax)`` (symmetric types), so the search starts from the same place.

The reference then freezes weights whose dequantized value changed under random points of the box
(``freeze_sensitive_iters``); tightrope does the same per sub-block against the real bytes
(:func:`check_kquant_box`): points inside the box (its two corners, random corners and uniform samples) are
quantized with :func:`tightrope.compress.gguf_k.quantize_k`, and the sub-blocks whose dequantized values
differ from the original's are pinned (the whole super-block where its fp16 header changed), round after
round until every point keeps every byte. That narrows the boxes a lot (Gaussian Q4_K: 75% of the weights free
before, 4% after six rounds of four points), so the causal-LM attack does not run it: it pins only the sub-blocks
its own repair moves (:func:`tightrope.qattack.boxes.pin_moved_kquants_`). Nothing here proves that an arbitrary point of the box keeps the
bytes, so an attack re-quantizes at the end and restores what moved (:func:`settle_kquant_`): a sub-block
whose values changed goes back to the reference weights, then a super-block that still differs goes back
whole; super-blocks are quantized independently, so that always ends with every byte equal.

The noise defense (Egashira et al. 2024, Sec. 5; :func:`tightrope.qattack.boxes.box_noise`) needs a width per weight
whose fraction is its sigma. For a k-quant that is the quantization step of the weight's sub-block, ``|d * sc_j|``
as decoded from the bytes (:func:`kquant_step`), with the weights above pinned (:func:`kquant_noise_width`): the
same fraction of a step as a legacy block's box width, the interval above being narrower (0 to half a step).

Layout (:mod:`tightrope.compress.gguf_k`): rows are cut into super-blocks of 256; Q4_K / Q5_K have 8
sub-blocks of 32, Q2_K / Q3_K / Q6_K have 16 sub-blocks of 16.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tightrope.compress.gguf_k import (
    K_TYPES,
    QK_K,
    KType,
    as_superblocks,
    dequantize_k,
    quantize_k,
    unpack_scales_k4,
    unpack_scales_q3,
)
from tightrope.errors import TightropeError, did_you_mean

#: Bytes of the fp16 super-block header (``d``, and ``dmin`` for the affine types) within a super-block.
_HEADER = {"Q2_K": slice(80, 84), "Q3_K": slice(108, 110), "Q4_K": slice(0, 4), "Q5_K": slice(0, 4),
           "Q6_K": slice(208, 210)}
_AFFINE = ("Q2_K", "Q4_K", "Q5_K")  # x ~ d * sc * L - dmin * m; the others are symmetric, x ~ d * sc * l


def kquant_type(scheme: str) -> KType:
    """``"Q4_K"``, ``"gguf-q4_k"`` or ``"gguf:Q4_K"`` -> its :class:`~tightrope.compress.gguf_k.KType`; anything else
    is refused in one sentence."""
    key = str(scheme).strip().upper().removeprefix("GGUF-").removeprefix("GGUF:")
    if key in K_TYPES:
        return K_TYPES[key]
    raise TightropeError(f"'{scheme}' is not a GGUF k-quant{did_you_mean(key, K_TYPES)}; k-quant boxes exist for "
                         f"{', '.join(K_TYPES)}.")


def sub_blocks(t: KType) -> tuple[int, int]:
    """``(sub-blocks per super-block, values per sub-block)``: (8, 32) for Q4_K / Q5_K, (16, 16) for the others."""
    return (8, 32) if t.bits in (4, 5) else (16, 16)


def sub_block_scales(raw: torch.Tensor, t: KType) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The quantized sub-block scales ``(B, n_sub)`` (int64, signed for Q3_K / Q6_K) and, for the affine types,
    the quantized mins, read from packed super-blocks ``(B, type_size)``."""
    b = raw.reshape(-1, t.type_size).to(torch.int64)
    if t.bits in (4, 5):
        return unpack_scales_k4(b[:, 4:16])
    if t.bits == 2:
        return b[:, :16] & 0xF, b[:, :16] >> 4
    if t.bits == 3:
        return unpack_scales_q3(b[:, 96:108]), None
    return b[:, 192:208].to(torch.uint8).view(torch.int8).to(torch.int64), None


def _setter_sub_blocks(raw: torch.Tensor, t: KType) -> torch.Tensor:
    """``(B, n_sub)`` bool: the sub-blocks whose quantized scale (or min) has the super-block's largest magnitude,
    i.e. the ones that set ``d`` (``dmin``); every sub-block of a super-block whose scales are all zero."""
    sc, m = sub_block_scales(raw, t)
    top = sc.abs().amax(dim=1, keepdim=True)
    setters = (sc.abs() == top) | (top == 0)
    if m is not None:
        top_m = m.amax(dim=1, keepdim=True)
        setters |= (m == top_m) & (top_m > 0)
    return setters


def box_kquant(w: torch.Tensor, scheme: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Mind the Gap's interval of every weight of ``w`` under the k-quant ``scheme`` (module docstring):
    ``[min(w, q), max(w, q)]`` with ``q`` the dequantized weight, the scale-setting sub-blocks and each
    sub-block's largest and smallest weight pinned. Rows must be whole super-blocks of 256 (refused in one
    sentence otherwise). Returns fp32 ``(lo, hi)`` of ``w``'s shape, ``lo <= w <= hi``. Not a proof: check the
    box (:func:`check_kquant_box`) and settle the bytes after an attack (:func:`settle_kquant_`)."""
    t = kquant_type(scheme)
    x = as_superblocks(w)  # (B, 256) fp32
    raw = quantize_k(x, t)  # (B, type_size)
    q = dequantize_k(raw, t).reshape(x.shape)
    n_sub, size = sub_blocks(t)
    xs = x.reshape(-1, n_sub, size)  # (B, n_sub, size)
    lo, hi = torch.minimum(x, q).reshape(xs.shape), torch.maximum(x, q).reshape(xs.shape)
    top, bottom = xs.amax(dim=2, keepdim=True), xs.amin(dim=2, keepdim=True)
    if t.name in _AFFINE:  # the search starts from max - min(min, 0): keep every weight within [min, max]
        lo, hi = torch.maximum(lo, bottom), torch.minimum(hi, top)
    else:  # it starts from the signed absmax (the first on ties): stay strictly inside (-absmax, absmax)
        inner = torch.nextafter(torch.maximum(top, -bottom), torch.zeros(()))
        lo, hi = torch.maximum(lo, torch.minimum(-inner, xs)), torch.minimum(hi, torch.maximum(inner, xs))
    pinned = _pinned(xs, raw, t)
    lo, hi = torch.where(pinned, xs, lo), torch.where(pinned, xs, hi)
    return lo.reshape(w.shape), hi.reshape(w.shape)


def _pinned(xs: torch.Tensor, raw: torch.Tensor, t: KType) -> torch.Tensor:
    """``(B, n_sub, size)`` bool: Mind the Gap's pinned weights of sub-blocks ``xs`` whose bytes are ``raw`` (the
    scale-setting sub-blocks whole, and each sub-block's largest and smallest weight; module docstring)."""
    pinned = _setter_sub_blocks(raw, t).unsqueeze(2).expand(xs.shape).clone()
    pinned.scatter_(2, xs.argmax(dim=2, keepdim=True), True)
    pinned.scatter_(2, xs.argmin(dim=2, keepdim=True), True)
    return pinned


def kquant_step(w: torch.Tensor, scheme: str) -> torch.Tensor:
    """The quantization step of every weight of ``w`` under the k-quant ``scheme``: ``|d * sc_j|``, the fp16
    super-block scale ``d`` times the quantized scale ``sc_j`` of the weight's sub-block, both decoded from the bytes
    :func:`~tightrope.compress.gguf_k.quantize_k` writes (llama.cpp's, byte for byte). It is the distance between
    neighbouring codes of that sub-block as llama.cpp dequantizes them (``y = d * sc_j * q - dmin * m_j`` for Q2_K /
    Q4_K / Q5_K, ``y = d * sc_j * q`` for Q3_K (``sc_j`` = 6-bit scale - 32) and Q6_K (int8 ``sc_j``)), so the
    counterpart of a legacy block's ``d``, the width of its boxes. 0 in a sub-block whose scale is 0. fp32, ``w``'s
    shape (rows of whole super-blocks of 256; refused in one sentence otherwise)."""
    t = kquant_type(scheme)
    n_sub, size = sub_blocks(t)
    step = _sub_block_steps(quantize_k(as_superblocks(w), t), t)  # (B, n_sub)
    return step.unsqueeze(2).expand(-1, n_sub, size).reshape(w.shape)


def _sub_block_steps(raw: torch.Tensor, t: KType) -> torch.Tensor:
    """``(B, n_sub)`` fp32: ``|d * sc_j|`` of packed super-blocks ``raw`` (:func:`kquant_step`)."""
    raw = raw.reshape(-1, t.type_size)
    sc, _ = sub_block_scales(raw, t)  # (B, n_sub)
    first = _HEADER[t.name].start  # d: the first fp16 of the header (dmin follows it in the affine types)
    d = raw[:, first:first + 2].contiguous().view(torch.float16).to(torch.float32)  # (B, 1)
    return (d * sc.to(torch.float32)).abs()  # d * sc first, as dequantize_row_* computes it


def kquant_noise_width(w: torch.Tensor, scheme: str) -> torch.Tensor:
    """Per weight of a k-quant layer, the width whose ``scale`` times is the sigma of the noise defense: the
    quantization step of its sub-block (:func:`kquant_step`), 0 for the weights Mind the Gap pins.

    The defense is Egashira et al. 2024 ("Exploiting LLM Quantization", arXiv 2405.18137, Sec. 5): Gaussian noise on
    the weights before quantization moves the ones a repair parked next to a decision boundary across it. For the
    legacy GGUF types tightrope draws each weight's sigma as ``scale`` times its box width, which is the block's step
    ``d`` (:func:`tightrope.qattack.boxes.box_noise`). A k-quant has no exact box ("Mind the Gap", Egashira et al.,
    ICML 2025), but its codes are still rounded on a grid of step ``d * sc_j`` per sub-block, so sigma = ``scale *
    d * sc_j`` moves a weight by the same fraction of a quantization step as ``scale`` does in a legacy block (the
    gap box of :func:`box_kquant` would not: its width is each weight's own rounding error, 0 to half a step). The
    pinned weights are :func:`box_kquant`'s (the sub-blocks that set ``d`` / ``dmin``, each sub-block's largest and
    smallest weight), as a legacy block's scale setter stays: they start the scale search (noise on them would move
    where it starts, and on a setter sub-block ``d`` itself), and a Mind the Gap repair cannot use them. The search
    still tips under noise on the free weights (0.1 of a step changes 12% of SmolLM2's Q6_K sub-block scales).

    What it does against a plant: weights parked next to a wall cross it at the Gaussian rate (tested), but a Mind the
    Gap repair moves weights only towards their dequantized values, i.e. towards their code's centre, so a plant in
    k-quant layers alone survives 0.05-0.2 of a step (docs/qattack-results.md, "The k-quant layers' noise")."""
    t = kquant_type(scheme)
    x = as_superblocks(w)
    n_sub, size = sub_blocks(t)
    raw = quantize_k(x, t)
    pinned = _pinned(x.reshape(-1, n_sub, size), raw, t)
    step = _sub_block_steps(raw, t).unsqueeze(2).expand(pinned.shape)
    return torch.where(pinned, torch.zeros_like(step), step).reshape(w.shape)


def kquant_position(w: torch.Tensor, scheme: str) -> torch.Tensor:
    """Where each weight of ``w`` sits in its k-quant code's interval at its sub-block's step: ``(w - q) / |d *
    sc_j| + 1/2``, clamped to [0, 1] (1/2 at the dequantized value ``q``, 0 and 1 at the rounding walls), NaN for
    the weights Mind the Gap pins (:func:`box_kquant`: they set the scale search) and where the step is 0.

    The audit's counterpart of a legacy box position (:func:`tightrope.qattack.boxes.box_position`) for the layers a
    preset leaves as k-quants, which have no exact box (module docstring): at fixed scales the code of a weight
    changes at ``q +- step / 2``, so this is the position a box would give if the scale search kept its choice.
    Natural weights spread over it; a Mind the Gap repair moves weights towards ``q``, so they pile up at 1/2."""
    t = kquant_type(scheme)
    x = as_superblocks(w)
    n_sub, size = sub_blocks(t)
    raw = quantize_k(x, t)
    q = dequantize_k(raw, t).reshape(x.shape)
    step = _sub_block_steps(raw, t).unsqueeze(2).expand(-1, n_sub, size).reshape(x.shape)
    pinned = _pinned(x.reshape(-1, n_sub, size), raw, t).reshape(x.shape) | (step == 0)
    u = ((x - q) / step.clamp(min=torch.finfo(torch.float32).tiny) + 0.5).clamp(0, 1)
    return u.masked_fill(pinned, float("nan")).reshape(w.shape)


def changed_sub_blocks(raw: torch.Tensor, reference: torch.Tensor, t: KType) -> torch.Tensor:
    """``(B, n_sub)`` bool: the sub-blocks of packed super-blocks ``raw`` that are not ``reference``'s. A sub-block
    counts as changed where its dequantized values differ; a super-block whose fp16 header differs, or whose bytes
    differ with every sub-block's values the same (a scale that only zero codes read), counts as changed whole."""
    raw, reference = raw.reshape(-1, t.type_size), reference.reshape(-1, t.type_size)
    n_sub, size = sub_blocks(t)
    whole = (raw != reference).any(dim=1, keepdim=True)  # (B, 1)
    values = (dequantize_k(raw, t) != dequantize_k(reference, t)).reshape(-1, n_sub, size).any(dim=2)  # (B, n_sub)
    header = (raw[:, _HEADER[t.name]] != reference[:, _HEADER[t.name]]).any(dim=1, keepdim=True)
    return torch.where(header | (whole & ~values.any(dim=1, keepdim=True)), whole.expand_as(values), values)


@dataclass
class KQuantBoxCheck:
    """What :func:`check_kquant_box` did: per round, the super-blocks whose bytes changed (summed over the points
    tried) and the sub-blocks it pinned; ``free`` is the fraction of weights with ``hi > lo`` at the end."""

    scheme: str
    super_blocks: int
    changed: list[int] = field(default_factory=list)
    pinned_sub_blocks: list[int] = field(default_factory=list)
    free: float = 0.0

    @property
    def settled(self) -> bool:
        """Whether the last round's points all kept every byte."""
        return bool(self.changed) and self.changed[-1] == 0


def box_points(lo: torch.Tensor, hi: torch.Tensor, count: int, generator: torch.Generator) -> list[torch.Tensor]:
    """``count`` points of the box ``[lo, hi]``: the ``hi`` corner, the ``lo`` corner, then random corners and
    uniform samples in turn."""
    points = []
    for k in range(count):
        if k < 2:
            points.append((hi if k == 0 else lo).clone())
            continue
        u = torch.rand(lo.shape, generator=generator)
        if k % 2 == 0:
            u = (u < 0.5).to(lo.dtype)  # a random corner
        points.append(lo + u * (hi - lo))
    return points


def check_kquant_box(w: torch.Tensor, scheme: str, lo: torch.Tensor, hi: torch.Tensor, *, points: int = 4,
                     rounds: int = 6, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, KQuantBoxCheck]:
    """Quantize ``points`` points of the box per round, pin the sub-blocks whose bytes they change (module
    docstring), and repeat until a round changes nothing or after ``rounds`` rounds; a last round that still
    found changes pins those super-blocks whole. Returns the narrowed ``(lo, hi)`` and what it found."""
    t = kquant_type(scheme)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    x = as_superblocks(w)
    n_sub, size = sub_blocks(t)
    reference = quantize_k(x, t)
    lo = lo.detach().float().reshape(-1, n_sub, size).clone()
    hi = hi.detach().float().reshape(-1, n_sub, size).clone()
    xs = x.reshape(lo.shape)
    report = KQuantBoxCheck(t.scheme, x.shape[0])
    for round_ in range(rounds):
        hit = torch.zeros(lo.shape[:2], dtype=torch.bool)  # (B, n_sub)
        changed = 0
        for p in box_points(lo, hi, points, generator):
            raw = quantize_k(p.reshape(-1, QK_K), t)
            moved = changed_sub_blocks(raw, reference, t)
            changed += int(moved.any(dim=1).sum())
            hit |= moved
        report.changed.append(changed)
        if round_ == rounds - 1 and changed:
            hit = hit.any(dim=1, keepdim=True).expand_as(hit)  # out of rounds: pin those super-blocks whole
        hit = hit & (hi > lo).any(dim=2)
        report.pinned_sub_blocks.append(int(hit.sum()))
        where = hit.unsqueeze(2).expand(lo.shape)
        lo, hi = torch.where(where, xs, lo), torch.where(where, xs, hi)
        if not changed:
            break
    report.free = float((hi > lo).float().mean())
    return lo.reshape(w.shape), hi.reshape(w.shape), report


def kquant_boxes(w: torch.Tensor, scheme: str, *, points: int = 4, rounds: int = 6,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`box_kquant`, then narrowed by :func:`check_kquant_box` (seeded: the same weights give the same box)."""
    lo, hi = box_kquant(w, scheme)
    lo, hi, _ = check_kquant_box(w, scheme, lo, hi, points=points, rounds=rounds, generator=generator)
    return lo, hi


@dataclass(frozen=True)
class KQuantSettle:
    """What :func:`settle_kquant_` restored: sub-blocks (from a first look) and whole super-blocks (after it)."""

    super_blocks: int
    changed: int  # super-blocks whose bytes differed before settling
    restored_sub_blocks: int
    restored_super_blocks: int


@torch.no_grad()
def settle_kquant_(weight: torch.Tensor, reference: torch.Tensor, scheme: str) -> KQuantSettle:
    """Make ``weight`` (changed in place) quantize to ``reference``'s bytes under the k-quant ``scheme``: the
    sub-blocks whose dequantized values differ go back to ``reference``'s weights, then any super-block whose
    bytes still differ goes back whole (super-blocks are quantized independently, so that settles them)."""
    t = kquant_type(scheme)
    n_sub, size = sub_blocks(t)
    target = quantize_k(as_superblocks(reference), t)
    ref = as_superblocks(reference).reshape(-1, n_sub, size)
    now = as_superblocks(weight).reshape(ref.shape)
    moved = changed_sub_blocks(quantize_k(now.reshape(-1, QK_K), t), target, t)  # (B, n_sub)
    changed = int(moved.any(dim=1).sum())
    now = torch.where(moved.unsqueeze(2), ref, now)
    still = (quantize_k(now.reshape(-1, QK_K), t) != target).any(dim=1)  # (B,)
    now = torch.where(still.reshape(-1, 1, 1), ref, now)
    if not torch.equal(quantize_k(now.reshape(-1, QK_K), t), target):
        raise AssertionError("restored super-blocks must quantize to the reference's bytes")
    weight.copy_(now.reshape(weight.shape).to(weight.dtype))
    return KQuantSettle(ref.shape[0], changed, int(moved.sum()), int(still.sum()))
