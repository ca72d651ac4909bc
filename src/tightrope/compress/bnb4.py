"""bitsandbytes 4-bit layers (NF4, FP4) whose results do not depend on the CPU they run on.

tightrope's 4-bit semantics are bitsandbytes' reference (QLoRA, Dettmers et al. 2023, eq. 1 per
block): bitsandbytes' own codes, each block of 64 consecutive values dequantized by *its own*
absmax, then an fp32 matrix product. That is what a user's GPU runs with ``compute_dtype=float32``.

bitsandbytes' CPU backend does not always compute that:

- its native ``dequantize_4bit`` (0.50.2, AVX-512 CPUs) scales values by the wrong block's absmax
  when a block straddles two rows (a ``[48, 96]`` weight with blocks of 64: block 2 comes out
  1.34x too large, block 5 0.48x; ``benchmarks/bnb_4bit_fault.py`` reproduces it);
- on CPUs with AVX-512-BF16 its ``Linear4bit`` forward repacks the weight and multiplies in bf16.

So tightrope checks the installed kernel once per process against a known answer
(:func:`kernel_check`) and its :class:`CheckedLinear4bit` always runs "dequantize, then fp32
``linear``": with bitsandbytes' dequantization where the check passed, with
:func:`tightrope.compress.primitives.dequantize_blockwise` (the same codes, each block's own absmax)
where it failed. Which path ran is said once on stderr (the ``tightrope`` logger) and recorded by
:func:`tightrope.provenance.environment` in cards, reports and audit JSON.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Callable, Literal

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import torch
from torch import nn

from tightrope.compress import primitives as P

log = logging.getLogger("tightrope")

Dequantize = Callable[[torch.Tensor, "bnbf.QuantState"], torch.Tensor]

# Shapes whose blocks of 64 straddle rows (the faulty case), fit rows exactly, or end short.
CHECK_SHAPES: tuple[tuple[int, ...], ...] = ((48, 96), (6, 160), (3, 64), (64, 64), (2, 384), (7, 9), (130,))
CHECK_BLOCKSIZE = 64


@dataclass(frozen=True)
class KernelCheck:
    """The outcome of the known-answer check of bitsandbytes' CPU ``dequantize_4bit``."""

    path: Literal["bitsandbytes", "reference"]
    faults: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.path == "bitsandbytes"

    def line(self) -> str:
        """One sentence for stderr and for the records."""
        version = getattr(bnb, "__version__", "?")
        if self.ok:
            return f"bitsandbytes {version} CPU 4-bit dequantization passed its known-answer check; 4-bit layers use it."
        return (f"bitsandbytes {version} CPU 4-bit dequantization failed its known-answer check on this CPU "
                f"({self.faults[0]}); 4-bit layers use tightrope's reference dequantization of the same codes.")


def reference_dequantize(data: torch.Tensor, state: bnbf.QuantState) -> torch.Tensor:
    """bitsandbytes' packed codes dequantized by each block's own absmax (fp32, the weight's shape)."""
    codes = P.unpack_4bit(data.view(torch.uint8), state.shape)
    return P.dequantize_blockwise(codes, reference_absmax(state), P.CODES_4BIT[state.quant_type], state.blocksize)


def reference_absmax(state: bnbf.QuantState) -> torch.Tensor:
    """The fp32 absmax of each block; with QLoRA double quantization, the 8-bit absmax of the
    absmax dequantized plus the offset."""
    if not state.nested:
        return state.absmax.float()
    s2 = state.state2
    return P.dequantize_blockwise(state.absmax.view(torch.uint8), s2.absmax, s2.code, s2.blocksize) + state.offset


def bitsandbytes_dequantize(data: torch.Tensor, state: bnbf.QuantState) -> torch.Tensor:
    return bnbf.dequantize_4bit(data, state).float()


def find_faults(dequantize: Dequantize | None = None) -> list[str]:
    """Where ``dequantize`` disagrees with :func:`reference_dequantize` on bitsandbytes' own codes.

    Random weights of :data:`CHECK_SHAPES`, NF4 and FP4, with and without double quantization; one
    sentence fragment per disagreement (empty when the kernel is right).
    """
    dequantize = dequantize or bitsandbytes_dequantize
    faults = []
    gen = torch.Generator().manual_seed(0)
    for shape in CHECK_SHAPES:
        w = torch.randn(shape, generator=gen) * 0.05
        for quant_type in ("nf4", "fp4"):
            for nested in (False, True):
                data, state = bnbf.quantize_4bit(w, blocksize=CHECK_BLOCKSIZE, quant_type=quant_type,
                                                 compress_statistics=nested)
                got = dequantize(data, state).reshape(-1)  # bitsandbytes returns a 1-D weight as (1, n)
                want = reference_dequantize(data, state).reshape(-1)
                if got.shape != want.shape or not torch.equal(got, want):
                    worst = (got - want).abs().max() if got.shape == want.shape else float("nan")
                    faults.append(f"{quant_type}{' double-quantized' if nested else ''} "
                                  f"{'x'.join(map(str, shape))}: off by up to {float(worst):.3g}")
    return faults


def check(dequantize: Dequantize | None = None) -> KernelCheck:
    faults = find_faults(dequantize)
    return KernelCheck("reference" if faults else "bitsandbytes", tuple(faults))


@functools.cache
def kernel_check() -> KernelCheck:
    """The check of the installed kernel, run once per process and said once on stderr when it
    fails (``kernel_check.cache_clear()`` runs it again)."""
    result = check()
    (log.info if result.ok else log.warning)(result.line())
    return result


def dequantize(data: torch.Tensor, state: bnbf.QuantState) -> torch.Tensor:
    """The fp32 weight of packed 4-bit ``data``, by whichever path :func:`kernel_check` chose."""
    if kernel_check().ok:
        return bitsandbytes_dequantize(data, state)
    return reference_dequantize(data, state)


def simulated_fault(data: torch.Tensor, state: bnbf.QuantState) -> torch.Tensor:
    """A fault of the kind seen on AVX-512 CPUs, for machines without it (tests): where the row
    length is not a multiple of the block size, values take the absmax of the block they would be in
    if every row started a new block; rows of whole blocks come out right, as on the faulty kernel."""
    out = reference_dequantize(data, state)
    rows, cols = (state.shape[0], state.shape[-1]) if len(state.shape) == 2 else (1, state.shape[0])
    if cols % state.blocksize == 0:
        return out
    absmax = reference_absmax(state)
    right = (torch.arange(rows * cols) // state.blocksize).reshape(rows, cols)
    per_row = -(-cols // state.blocksize)
    wrong = (torch.arange(rows)[:, None] * per_row + torch.arange(cols)[None, :] // state.blocksize)
    wrong = wrong.clamp(max=absmax.numel() - 1)
    return (out.reshape(rows, cols) / absmax[right].clamp(min=1e-38) * absmax[wrong]).reshape(out.shape)


def weight_of(module: nn.Module) -> torch.Tensor:
    """The fp32 weight of a ``bnb.nn.Linear4bit`` (also one bitsandbytes repacked for its CPU kernel)."""
    data, state = module.weight.data, module.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse  # noqa: PLC0415 - private, version-bound

        data, state = _convert_weight_packed_for_cpu_inverse(data.clone(), state)
        module.weight.data, module.weight.quant_state = data, state
    return dequantize(data, state)


class CheckedLinear4bit(bnb.nn.Linear4bit):
    """``bnb.nn.Linear4bit`` whose forward is "dequantize, then fp32 ``linear``" on every CPU.

    The stored codes, state and state dict are bitsandbytes' own; only the forward differs from
    bitsandbytes' CPU backend, which may repack the weight and multiply in bf16 (AVX-512-BF16 CPUs).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        return nn.functional.linear(x.float(), weight_of(self), bias).to(x.dtype)


def linear_4bit(linear: nn.Linear, quant_type: str, blocksize: int = 64, double_quant: bool = False) -> CheckedLinear4bit:
    """A :class:`CheckedLinear4bit` holding bitsandbytes' quantization of ``linear``'s weight."""
    mod = CheckedLinear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                            compute_dtype=torch.float32, compress_statistics=double_quant, quant_type=quant_type)
    mod.weight = bnb.nn.Params4bit(linear.weight.detach().float().contiguous().clone(), requires_grad=False,
                                   quant_type=quant_type, blocksize=blocksize, compress_statistics=double_quant)
    if linear.bias is not None:
        mod.bias = nn.Parameter(linear.bias.detach().float().clone(), requires_grad=False)
    mod = mod.to("cpu").eval()  # moving the parameter is what makes bitsandbytes quantize it
    mod.weight.logical_numel = linear.in_features * linear.out_features
    return mod


def from_prequantized(in_features: int, out_features: int, bias: torch.Tensor | None, quant_type: str,
                      double_quant: bool, tensors: dict[str, torch.Tensor], name: str) -> CheckedLinear4bit:
    """Rebuild a saved 4-bit layer from its state dict entries (``{name}.weight`` and its state)."""
    mod = CheckedLinear4bit(in_features, out_features, bias=bias is not None, compute_dtype=torch.float32,
                            compress_statistics=double_quant, quant_type=quant_type)
    prefix = f"{name}.weight."
    stats = {k[len(f"{name}."):]: v for k, v in tensors.items() if k.startswith(prefix)}
    mod.weight = bnb.nn.Params4bit.from_prequantized(tensors[f"{name}.weight"], stats, requires_grad=False,
                                                     device="cpu", module=mod)
    mod.weight.logical_numel = in_features * out_features
    if bias is not None:
        mod.bias = nn.Parameter(bias, requires_grad=False)
    return mod.eval()
