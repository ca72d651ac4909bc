"""Quantization-aware (adversarial) training: fake quantization with a straight-through estimator.

During training every selected ``nn.Linear`` weight is replaced, in the forward pass, by its
quantize-then-dequantize value computed with the *reference* quantizer of the format it will ship
in (:mod:`tightrope.compress.primitives`), so the forward values are exactly those of the real
quantized model. The backward pass treats rounding as the identity: the straight-through
estimator of Bengio, Leonard and Courville (2013), as used for quantization-aware training by
Jacob et al. (2018), Sec. 3 ("Training with simulated quantization"). The absmax quantizers here
never clip (every weight lies inside its block's range), so the STE needs no clipping mask.

The fp32 "latent" weights are what the optimizer updates and what is saved; real quantization
happens at export (``compress_`` with the matching config). The weight swap uses
``torch.nn.utils.parametrize`` (the standard PyTorch mechanism), registered only for the duration
of one objective call and computed once per call (``parametrize.cached``), so the model's state
dict, checkpoints and optimizer never see it.

Schemes (the format each one matches, bit for bit):

- ``llm-int8``      LLM.int8() weights, row-wise absmax on the fp16 cast (bitsandbytes ``Linear8bitLt``)
- ``int8``          dynamic int8, symmetric per output channel (``quantize_dynamic`` per-channel)
- ``int8-tensor``   torch.ao dynamic int8, symmetric per tensor (``quantize_dynamic`` default)
- ``nf4`` / ``fp4`` bitsandbytes 4-bit, block-wise absmax, blocks of 64 (QLoRA)
- ``gguf-q8_0``, ``gguf-q4_0``, ``gguf-q4_1``, ``gguf-q5_0``, ``gguf-q5_1``: llama.cpp's GGUF blocks of 32
  (:mod:`tightrope.compress.gguf`, equal to ``gguf.quants``' round trip)
- ``gguf-q2_k`` ... ``gguf-q6_k``: llama.cpp's k-quants, super-blocks of 256
  (:mod:`tightrope.compress.gguf_k`, bytes equal to llama.cpp's own quantizer); rows that are no multiple of
  256 get llama-quantize's fallback type (:func:`tightrope.compress.gguf.tensor_type`)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

from tightrope.compress import gguf as G
from tightrope.compress import primitives as P
from tightrope.compress.api import CompressionConfig, select_modules
from tightrope.compress.specs import RENAMED
from tightrope.errors import TightropeError, did_you_mean
from tightrope.train import cross_entropy_objective


def _int8_llm(w: torch.Tensor) -> torch.Tensor:
    return P.dequantize_rowwise_absmax_int8(*P.quantize_rowwise_absmax_int8(w))


def _int8_dynamic(w: torch.Tensor) -> torch.Tensor:
    return P.dequantize_symmetric_int8(*P.quantize_symmetric_int8(w, per_channel=True))


def _int8_tensor(w: torch.Tensor) -> torch.Tensor:
    return P.dequantize_symmetric_int8(*P.quantize_symmetric_int8(w, per_channel=False))


def _four_bit(kind: str, blocksize: int = 64) -> Callable[[torch.Tensor], torch.Tensor]:
    def qdq(w: torch.Tensor) -> torch.Tensor:
        q, absmax = P.quantize_4bit(w, kind, blocksize)
        return P.dequantize_4bit(q, absmax, kind, blocksize)

    return qdq


#: scheme name -> reference quantize-dequantize function (weight -> fp32 weight of the same shape).
QDQ: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "llm-int8": _int8_llm,
    "int8": _int8_dynamic,
    "int8-tensor": _int8_tensor,
    "nf4": _four_bit("nf4"),
    "fp4": _four_bit("fp4"),
    **{name: (lambda w, t=t.name: G.quantize(w, t).dequantized) for name, t in G.SCHEMES.items()},
    **{name: (lambda w, t=t.name: G.quantize(w, G.tensor_type(t, w.shape[-1]).name).dequantized)
       for name, t in G.K_SCHEMES.items()},
}


def register_scheme(name: str, qdq: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Plug in another reference quantizer (e.g. a new format of tightrope.compress)."""
    QDQ[name] = qdq


def check_scheme(scheme: str) -> None:
    """Refuse an unknown scheme, or an old spelling with its new name (:data:`tightrope.compress.specs.RENAMED`)."""
    if scheme in RENAMED:
        raise TightropeError(f"The fake-quantization scheme '{scheme}' is now called '{RENAMED[scheme]}'; "
                             "'int8' means dynamic int8 everywhere, LLM.int8() is 'llm-int8'.")
    if scheme not in QDQ:
        raise TightropeError(f"Unknown fake-quantization scheme '{scheme}'{did_you_mean(scheme, QDQ)}; "
                             f"known: {', '.join(QDQ)}.")


def quantize_dequantize(w: torch.Tensor, scheme: str) -> torch.Tensor:
    """The values the real quantizer of ``scheme`` gives ``w`` after dequantization (fp32, no grad)."""
    check_scheme(scheme)
    with torch.no_grad():
        return QDQ[scheme](w.detach()).to(w.dtype).reshape(w.shape)


class _StraightThrough(torch.autograd.Function):
    """Forward: the quantized values exactly; backward: the identity (STE)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, scheme: str) -> torch.Tensor:  # noqa: ARG004
        return quantize_dequantize(w, scheme)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ARG004
        return grad, None


def fake_quantize(w: torch.Tensor, scheme: str) -> torch.Tensor:
    """``Q(w)`` in the forward pass, d/dw = identity in the backward pass."""
    return _StraightThrough.apply(w, scheme)


class FakeQuantize(nn.Module):
    """A parametrization: ``module.weight`` reads as ``fake_quantize(original, scheme)``."""

    def __init__(self, scheme: str):
        super().__init__()
        check_scheme(scheme)
        self.scheme = scheme

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return fake_quantize(w, self.scheme)


@contextlib.contextmanager
def fake_quantized(model: nn.Module, scheme: str, include: tuple[str, ...] = (),
                   exclude: tuple[str, ...] = ()) -> Iterator[list[str]]:
    """Within the block, the selected Linear layers compute with fake-quantized weights.

    Selection is the compress API's (``include`` / ``exclude`` globs; by default every encoder
    Linear, the head and pooler excluded), so training sees exactly the layers export quantizes.
    Yields the names of the layers. On exit the original Parameter objects are put back.
    """
    modules = select_modules(model, CompressionConfig(include=tuple(include), exclude=tuple(exclude)))
    parametrization = FakeQuantize(scheme)
    done: list[nn.Module] = []
    try:
        for module in modules.values():
            if parametrize.is_parametrized(module, "weight"):
                raise TightropeError("A layer is already parametrized; fake quantization cannot be nested.")
            parametrize.register_parametrization(module, "weight", parametrization, unsafe=True)
            done.append(module)
        with parametrize.cached():
            yield list(modules)
    finally:
        for module in done:
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)


class QuantAware:
    """Wrap any objective so that it trains through fake quantization (QAT, or QAT + adversarial).

    ``QuantAware(PGDTraining(...), scheme="nf4")`` attacks and trains the 4-bit model the user will
    ship; the latent fp32 weights are updated through the STE.
    """

    def __init__(self, objective: Callable | None = None, scheme: str = "llm-int8", include: tuple[str, ...] = (),
                 exclude: tuple[str, ...] = ()):
        check_scheme(scheme)

        self.objective = objective or cross_entropy_objective
        self.scheme, self.include, self.exclude = scheme, tuple(include), tuple(exclude)

    def __call__(self, model, batch: dict) -> torch.Tensor:
        with fake_quantized(model, self.scheme, self.include, self.exclude):
            return self.objective(model, batch)

    def describe(self) -> dict:
        inner = getattr(self.objective, "describe", None)
        return {"fake_quant": self.scheme, **(inner() if callable(inner) else {})}
