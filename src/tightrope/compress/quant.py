"""Quantization configs and their handlers, applied in place by :func:`tightrope.compress.compress_`.

=================  ==============================================  =============================
config             what replaces each selected ``nn.Linear``       kernel
=================  ==============================================  =============================
``Int8Dynamic``    torch.ao dynamic int8 Linear (weights int8 per   fbgemm / onednn int8 GEMM
                   channel, activations quantized per batch), or
                   the whole model as an ONNX Runtime session
``LLMInt8``        ``bitsandbytes.nn.Linear8bitLt`` (LLM.int8())    bitsandbytes (CPU and GPU)
``NF4`` / ``FP4``  ``bitsandbytes.nn.Linear4bit``                  bitsandbytes (CPU and GPU)
``Affine``         :class:`AffineQuantLinear` (seed's min-max)      none: dequantize + fp32 GEMM
``GPTQ``           :class:`AffineQuantLinear` with GPTQ's codes     none: dequantize + fp32 GEMM
=================  ==============================================  =============================

``Int8Dynamic(backend="auto")`` picks ONNX Runtime when it is installed and torch's kernels otherwise:
measured on this machine on MiniLM at batch 1 x 256 tokens, ONNX Runtime dynamic int8 took 31 ms
and torch's 35 ms against 53 ms fp32 (issue 4). On the ONNX Runtime backend the exported graph is
first fused by ONNX Runtime's transformer optimizer (``fuse=True``: Q, K and V become one
``QAttention`` int8 GEMM, LayerNorm / GELU / residual adds fused kernels), which measured faster
than the unfused graph at the same accuracy; ``fuse=False``, ``per_channel`` and ``reduce_range``
stay selectable (``benchmarks/compression.py --int8-options`` compares them, docs/benchmarks.md).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from tightrope.compress import gptq
from tightrope.compress import primitives as P
from tightrope.compress.api import (
    CompressionConfig,
    CompressionSummary,
    register_handler,
    select_modules,
)
from tightrope.compress import blockwise
from tightrope.compress.wanda import calibration_batches, input_hessians
from tightrope.errors import MissingResourceError, TightropeError

# --- configs ----------------------------------------------------------------------------------


def _check_choice(method: str, name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise TightropeError(f"{method} {name} must be one of {', '.join(map(str, choices))}, not {value!r}.")


def _check_int(method: str, name: str, value, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        span = f"from {low} to {high}" if high is not None else f"of at least {low}"
        raise TightropeError(f"{method} {name} must be an integer {span}, not {value!r}.")


def _patterns(config: CompressionConfig) -> None:
    for name in ("include", "exclude"):
        value = getattr(config, name)
        object.__setattr__(config, name, (value,) if isinstance(value, str) else tuple(value))


BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


@dataclass(frozen=True, kw_only=True)
class Int8Dynamic(CompressionConfig):
    """Dynamic int8 (Jacob et al. 2018): int8 weights, activations quantized on the fly per batch.

    ``per_channel``: one weight scale per output channel instead of one per tensor.
    ONNX Runtime only: ``fuse`` runs its transformer optimizer (fused attention, LayerNorm, GELU)
    before quantizing, so Q, K and V become one int8 GEMM (:mod:`tightrope.compress.ortfuse`);
    ``reduce_range`` keeps weights in 7 bits, which avoids the int16 saturation of the u8 x s8
    ``vpmaddubsw`` kernel on AVX2 CPUs without VNNI.
    """

    backend: Literal["auto", "torch", "onnxruntime"] = "auto"
    per_channel: bool = True
    fuse: bool = True
    reduce_range: bool = False

    def __post_init__(self) -> None:
        _patterns(self)
        _check_choice(self.method, "backend", self.backend, ("auto", "torch", "onnxruntime"))
        for name in ("per_channel", "fuse", "reduce_range"):
            if not isinstance(getattr(self, name), bool):
                raise TightropeError(f"Int8Dynamic {name} must be true or false, not {getattr(self, name)!r}.")
        if self.backend == "torch" and self.reduce_range:
            raise TightropeError("Int8Dynamic reduce_range applies to the onnxruntime backend only; drop it for backend='torch'.")


@dataclass(frozen=True, kw_only=True)
class LLMInt8(CompressionConfig):
    """LLM.int8() (Dettmers et al. 2022): row-wise absmax int8 weights; input features with any
    ``|x| >= threshold`` (6.0 in the paper, Sec. 3.2) are multiplied in fp16."""

    threshold: float = 6.0

    def __post_init__(self) -> None:
        _patterns(self)
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) or self.threshold < 0:
            raise TightropeError(f"LLMInt8 threshold must be a number >= 0, not {self.threshold!r}.")


@dataclass(frozen=True, kw_only=True)
class NF4(CompressionConfig):
    """4-bit NormalFloat, block-wise absmax (QLoRA, Dettmers et al. 2023); 64 values per block."""

    blocksize: int = 64
    double_quant: bool = False

    def __post_init__(self) -> None:
        _patterns(self)
        _check_choice(self.method, "blocksize", self.blocksize, BLOCKSIZES)

    @property
    def quant_type(self) -> str:
        return "nf4"


@dataclass(frozen=True, kw_only=True)
class FP4(NF4):
    """4-bit float (E2M1, bitsandbytes' FP4), block-wise absmax."""

    @property
    def quant_type(self) -> str:
        return "fp4"


@dataclass(frozen=True, kw_only=True)
class Affine(CompressionConfig):
    """The seed paper's min-max quantization ``Q(w) = round((w - min w) / scale)`` at 2..8 bits, per
    tensor, channel or group. Simulated: codes are stored, the product runs in fp32."""

    bits: int = 8
    granularity: Literal["tensor", "channel", "group"] = "channel"
    group_size: int = 128

    def __post_init__(self) -> None:
        _patterns(self)
        _check_int(self.method, "bits", self.bits, 2, 8)
        _check_choice(self.method, "granularity", self.granularity, ("tensor", "channel", "group"))
        _check_int(self.method, "group_size", self.group_size, 1)


@dataclass(frozen=True, kw_only=True)
class GPTQ(CompressionConfig):
    """GPTQ (Frantar et al. 2022) on the affine grid, from calibration samples of the task.

    ``calibration_texts`` is a task name / data file (its train split) or a sequence of texts;
    ``group_size=None`` fits one grid per output row. ``sequential``: each transformer block is calibrated on
    the outputs of the blocks already quantized (the reference's mode, :mod:`tightrope.compress.blockwise`);
    off, one pass of the full-precision model calibrates every layer.
    """

    bits: int = 4
    group_size: int | None = 128
    calibration_texts: tuple[str, ...] | str = ()
    n_calibration: int = 128
    max_length: int = 128
    blocksize: int = 128
    percdamp: float = 0.01
    sequential: bool = True

    def __post_init__(self) -> None:
        _patterns(self)
        _check_choice(self.method, "bits", self.bits, (2, 3, 4, 8))
        if self.group_size is not None:
            _check_int(self.method, "group_size", self.group_size, 1)
        _check_int(self.method, "n_calibration", self.n_calibration, 1)
        _check_int(self.method, "blocksize", self.blocksize, 1)
        if not 0 < self.percdamp < 1:
            raise TightropeError(f"GPTQ percdamp must lie strictly between 0 and 1, not {self.percdamp!r}.")
        if not isinstance(self.calibration_texts, str):
            object.__setattr__(self, "calibration_texts", tuple(self.calibration_texts))

    def to_dict(self) -> dict:
        out = super().to_dict()
        texts = self.calibration_texts
        out["calibration_texts"] = texts if isinstance(texts, str) else f"{len(texts)} texts"
        return out


# --- modules ----------------------------------------------------------------------------------


class AffineQuantLinear(nn.Module):
    """A Linear whose weight is stored as affine codes ``w_hat = q * scale + minimum``.

    Codes of 4 bits or fewer are packed two per byte. The forward pass dequantizes to fp32 and
    runs an ordinary GEMM: the storage is real, the arithmetic is simulated (no low-bit kernel).
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group: int, n_groups: int, rows: int,
                 bias: bool = True):
        super().__init__()
        self.in_features, self.out_features, self.bits, self.group = in_features, out_features, bits, group
        n = in_features * out_features
        packed = (n + 1) // 2 if bits <= 4 else n
        self.register_buffer("qweight", torch.zeros(packed, dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(rows, n_groups))
        self.register_buffer("minimum", torch.zeros(rows, n_groups))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_quant(cls, aq: P.AffineQuant, bias: torch.Tensor | None) -> "AffineQuantLinear":
        out_f, in_f = aq.q.shape
        mod = cls(in_f, out_f, aq.bits, aq.group, aq.scale.shape[1], aq.scale.shape[0], bias is not None)
        mod.qweight = P.pack_4bit(aq.q).reshape(-1) if aq.bits <= 4 else aq.q.reshape(-1).clone()
        mod.scale, mod.minimum = aq.scale.float().clone(), aq.minimum.float().clone()
        if bias is not None:
            mod.bias = nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        return mod

    def codes(self) -> torch.Tensor:
        shape = (self.out_features, self.in_features)
        return P.unpack_4bit(self.qweight, shape) if self.bits <= 4 else self.qweight.reshape(shape)

    def dequantized(self) -> torch.Tensor:
        return P.dequantize_affine(P.AffineQuant(self.codes(), self.scale, self.minimum, self.bits, self.group))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.dequantized().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, group={self.group}"


def _bnb():
    if importlib.util.find_spec("bitsandbytes") is None:
        raise MissingResourceError("This method needs bitsandbytes, which is not installed: pip install bitsandbytes.")
    import bitsandbytes  # noqa: PLC0415

    return bitsandbytes


def quantized_kinds() -> tuple[type, ...]:
    """Module classes that hold quantized weights (to refuse quantizing twice)."""
    kinds: list[type] = [AffineQuantLinear]
    try:
        from torch.ao.nn.quantized.dynamic import Linear as DynLinear  # noqa: PLC0415

        kinds.append(DynLinear)
    except ImportError:  # pragma: no cover
        pass
    if importlib.util.find_spec("bitsandbytes") is not None:
        bnb = _bnb()
        kinds += [bnb.nn.Linear8bitLt, bnb.nn.Linear4bit]
    return tuple(kinds)


def quantized_by(model: nn.Module) -> str | None:
    """The quantization already applied to ``model``, or None."""
    if getattr(model, "_tightrope_onnx", None) is not None:
        return "Int8Dynamic(onnxruntime)"
    kinds = quantized_kinds()
    for name, module in model.named_modules():
        if isinstance(module, kinds):
            return f"{type(module).__name__} at {name}"
    return None


def _refuse_requantize(model: nn.Module, config: CompressionConfig) -> None:
    done = quantized_by(model)
    if done:
        raise TightropeError(
            f"This model is already quantized ({done}); apply {config.method} to the full-precision model instead."
        )


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


# --- accounting -------------------------------------------------------------------------------


def module_weight_stats(module: nn.Module) -> tuple[int, int, int]:
    """(logical weights, non-zero weights after dequantization, stored bytes of weight + constants)
    of one (possibly quantized) linear module; the bias is not counted in the bytes."""
    from torch.ao.nn.quantized.dynamic import Linear as DynLinear  # noqa: PLC0415

    if isinstance(module, AffineQuantLinear):
        w = module.dequantized()
        nbytes = sum(t.numel() * t.element_size() for t in (module.qweight, module.scale, module.minimum))
        return w.numel(), int(torch.count_nonzero(w)), nbytes
    if isinstance(module, DynLinear):
        qw = module.weight()
        ints = qw.int_repr()
        consts = qw.q_per_channel_scales().numel() * 4 if qw.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric) else 4
        return ints.numel(), int(torch.count_nonzero(qw.dequantize())), ints.numel() + consts
    if importlib.util.find_spec("bitsandbytes") is not None:
        bnb = _bnb()
        if isinstance(module, bnb.nn.Linear4bit):
            w = dequantize_bnb_4bit(module)
            state = module.weight.quant_state
            consts = state.absmax.numel() * state.absmax.element_size()
            if state.nested:
                consts += state.state2.absmax.numel() * 4 + 4
            return w.numel(), int(torch.count_nonzero(w)), module.weight.numel() + consts
        if isinstance(module, bnb.nn.Linear8bitLt):
            cb, scb = int8_state(module)
            return cb.numel(), int(torch.count_nonzero(cb)), cb.numel() + scb.numel() * 4
    w = module.weight
    return w.numel(), int(torch.count_nonzero(w)), w.numel() * w.element_size()


def int8_state(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(CB int8 codes, SCB fp32 row absmax) of a Linear8bitLt, wherever bitsandbytes keeps them."""
    cb = module.weight.CB if module.weight.CB is not None else module.state.CB
    scb = module.weight.SCB if module.weight.SCB is not None else module.state.SCB
    return cb if cb is not None else module.weight.data, scb


def dequantize_bnb_4bit(module: nn.Module) -> torch.Tensor:
    """The fp32 weight of a bitsandbytes 4-bit layer, by the path :func:`bnb4.kernel_check` chose."""
    from tightrope.compress import bnb4  # noqa: PLC0415 - bitsandbytes is optional (MissingResourceError without it), imported only where used

    return bnb4.weight_of(module)


def _nonzero(p: torch.Tensor) -> int:
    """Non-zeros of a tensor, also for quantized tensor subclasses (torchao) lacking ``count_nonzero``."""
    try:
        return int(torch.count_nonzero(p))
    except (NotImplementedError, RuntimeError, TypeError):
        dequantize = getattr(p, "dequantize", None)
        return int(torch.count_nonzero(dequantize())) if callable(dequantize) else p.numel()


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(stored, non-zero) parameters with quantized weights counted by their logical element count."""
    kinds = quantized_kinds()
    total = nonzero = 0
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, kinds):
            n, nz, _ = module_weight_stats(module)
            total, nonzero = total + n, nonzero + nz
            if getattr(module, "bias", None) is not None:
                b = module.bias() if callable(module.bias) else module.bias
                total, nonzero = total + b.numel(), nonzero + int(torch.count_nonzero(b))
                seen.add(id(module.bias))
            for p in module.parameters(recurse=False):
                seen.add(id(p))
            continue
    for p in model.parameters():
        if id(p) in seen:
            continue
        total += p.numel()
        nonzero += _nonzero(p)
    return total, nonzero


def _summary(model: nn.Module, config: CompressionConfig, chosen: dict[str, nn.Module], simulated: bool,
             notes: list[str]) -> CompressionSummary:
    logical = stored = 0
    for name in chosen:
        n, _, b = module_weight_stats(model.get_submodule(name))
        logical, stored = logical + n, stored + b
    total, nonzero = parameter_counts(model)
    return CompressionSummary(
        method=config.method, config=config.to_dict(), modules=sorted(chosen), bits=8 * stored / max(logical, 1),
        simulated=simulated, parameters=total, nonzero_parameters=nonzero, stored_bytes=stored_bytes(model),
        notes=[f"quantized weights: {logical} values in {stored} bytes (scales included)", *notes],
    )


# --- handlers ---------------------------------------------------------------------------------


def _onnxruntime_available() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None


def resolve_backend(backend: str) -> str:
    """``auto`` -> the measured fastest installed backend (ONNX Runtime, else torch)."""
    if backend == "auto":
        return "onnxruntime" if _onnxruntime_available() else "torch"
    if backend == "onnxruntime" and not _onnxruntime_available():
        raise MissingResourceError("The onnxruntime backend is not installed: pip install onnx onnxruntime.")
    return backend


# --- per-module handlers (torchao's shape: the entry point traverses, a handler swaps one module) ---

ModuleHandler = Callable[[nn.Linear, CompressionConfig], nn.Module]
MODULE_HANDLERS: dict[type, tuple[ModuleHandler, bool, Callable[[CompressionConfig], list[str]]]] = {}


def register_module_handler(config_cls: type, *, simulated: bool, notes: Callable[[CompressionConfig], list[str]]):
    """``@register_module_handler(NF4, ...)`` on ``(linear, config) -> quantized module``. The model-level
    handler (:func:`quantize_modules`) refuses a second quantization, selects the modules, swaps each
    one through this handler and summarises; ``qattack.quantize.quantized_copy`` reuses it."""

    def wrap(fn: ModuleHandler) -> ModuleHandler:
        MODULE_HANDLERS[config_cls] = (fn, simulated, notes)
        register_handler(config_cls)(quantize_modules)
        return fn

    return wrap


def quantize_modules(model: nn.Module, config: CompressionConfig) -> CompressionSummary:
    """Swap every module ``config`` selects for its quantized form, in place (one traversal for all
    per-module methods)."""
    handler, simulated, notes = MODULE_HANDLERS[type(config)]
    _refuse_requantize(model, config)
    chosen = select_modules(model, config)
    for name, lin in chosen.items():
        _set_submodule(model, name, handler(lin, config))
    return _summary(model, config, chosen, simulated, notes(config))


def _llm_int8_notes(config: LLMInt8) -> list[str]:
    return [f"bitsandbytes {_bnb().__version__}; outlier threshold {config.threshold}",
            "LLM.int8() saves memory, not time: its CPU matmul is slower than fp32"]


@register_module_handler(LLMInt8, simulated=False, notes=_llm_int8_notes)
def _llm_int8(lin: nn.Linear, config: LLMInt8) -> nn.Module:
    bnb = _bnb()
    mod = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None,
                              has_fp16_weights=False, threshold=float(config.threshold))
    mod.weight = bnb.nn.Int8Params(lin.weight.data.detach().float().contiguous().clone(), requires_grad=False,
                                   has_fp16_weights=False)
    if lin.bias is not None:
        mod.bias = nn.Parameter(lin.bias.data.detach().float().clone(), requires_grad=False)
    return mod.to("cpu").eval()  # moving the parameters is what makes bitsandbytes quantize them


def _bnb_4bit_notes(config: NF4) -> list[str]:
    from tightrope.compress import bnb4  # noqa: PLC0415 - bitsandbytes is optional (MissingResourceError without it), imported only where used

    return [f"bitsandbytes {_bnb().__version__}; {config.quant_type}, blocksize {config.blocksize}, "
            f"double quantization {'on' if config.double_quant else 'off'}", bnb4.kernel_check().line()]


@register_module_handler(NF4, simulated=False, notes=_bnb_4bit_notes)
def _bnb_4bit(lin: nn.Linear, config: NF4) -> nn.Module:
    from tightrope.compress import bnb4  # noqa: PLC0415 - bitsandbytes is optional (MissingResourceError without it), imported only where used

    return bnb4.linear_4bit(lin, config.quant_type, config.blocksize, config.double_quant)


register_module_handler(FP4, simulated=False, notes=_bnb_4bit_notes)(_bnb_4bit)


def _affine_notes(config: Affine) -> list[str]:
    return [f"{config.bits}-bit min-max per {config.granularity}"
            + (f" of {config.group_size}" if config.granularity == "group" else "")
            + "; simulated: codes stored, weights dequantized to fp32 for each product"]


@register_module_handler(Affine, simulated=True, notes=_affine_notes)
@torch.no_grad()
def _affine(lin: nn.Linear, config: Affine) -> nn.Module:
    return AffineQuantLinear.from_quant(P.quantize_affine(lin.weight, config.bits, config.granularity, config.group_size),
                                        lin.bias)


@register_handler(GPTQ)
@torch.no_grad()
def _gptq(model: nn.Module, config: GPTQ) -> CompressionSummary:

    _refuse_requantize(model, config)
    chosen = select_modules(model, config)
    for name, lin in chosen.items():
        if config.group_size is not None and lin.in_features % config.group_size:
            raise TightropeError(
                f"GPTQ group_size {config.group_size} does not divide the input width {lin.in_features} of {name}."
            )
    groups = blockwise.block_groups(model, chosen) if config.sequential else None
    if groups:  # the reference's way: each block calibrated on the outputs of the blocks quantized before it
        batches = calibration_batches(model, config.calibration_texts, config.n_calibration, max_length=config.max_length)
        steps = blockwise.sequential(model, groups, batches)
    else:
        steps = iter([(chosen, collect_hessians(model, chosen, config))])
    n_tokens = 0
    for layers, hessians in steps:  # a generator: a block's Hessians are taken after the blocks before it are quantized
        for name, lin in layers.items():
            aq = gptq.gptq_quantize(lin.weight, hessians[name].H, config.bits, config.group_size, config.blocksize,
                                    config.percdamp)
            _set_submodule(model, name, AffineQuantLinear.from_quant(aq, lin.bias))
            n_tokens = hessians[name].n
    how = ("each block calibrated on the quantized blocks' outputs" if groups
           else "Hessians from one pass of the full-precision model")
    return _summary(model, config, chosen, True, [
        f"GPTQ {config.bits}-bit, group {config.group_size}, {config.n_calibration} calibration samples "
        f"({n_tokens} tokens), damp {config.percdamp}; {how}",
        "simulated: codes stored, weights dequantized to fp32 for each product"])



def collect_hessians(model: nn.Module, chosen: dict[str, nn.Linear], config: GPTQ) -> dict:
    """Run the calibration samples once and accumulate ``H = 2 X X^T`` at each chosen Linear's input
    (padding tokens excluded)."""

    batches = calibration_batches(model, config.calibration_texts, config.n_calibration, max_length=config.max_length)
    return input_hessians(model, chosen, batches)


def onnx_bytes(model: nn.Module) -> bytes | None:
    blob = getattr(model, "_tightrope_onnx", None)
    return blob if isinstance(blob, (bytes, bytearray)) else None


__all__ = ["Int8Dynamic", "LLMInt8", "NF4", "FP4", "Affine", "GPTQ", "AffineQuantLinear", "quantized_by",
           "parameter_counts", "resolve_backend"]


# --- tensors of a quantized model, as saved -------------------------------------------------------


def _dyn_linear():
    from torch.ao.nn.quantized.dynamic import Linear  # noqa: PLC0415

    return Linear




def module_kind(module: nn.Module) -> dict | None:
    """The record that lets :func:`_empty_module` rebuild a quantized module, or None for others."""
    if isinstance(module, AffineQuantLinear):
        return {"kind": "affine", "in": module.in_features, "out": module.out_features, "bits": module.bits,
                "group": module.group, "groups": module.scale.shape[1], "rows": module.scale.shape[0],
                "bias": module.bias is not None}
    if isinstance(module, _dyn_linear()):
        qw = module.weight()
        per_channel = qw.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric)
        return {"kind": "torch-dynamic-int8", "in": module.in_features, "out": module.out_features,
                "per_channel": per_channel, "bias": module.bias() is not None}
    kinds = quantized_kinds()
    if isinstance(module, kinds):
        bnb = _bnb()
        if isinstance(module, bnb.nn.Linear8bitLt):
            return {"kind": "bnb-int8", "in": module.in_features, "out": module.out_features,
                    "threshold": float(module.state.threshold), "bias": module.bias is not None}
        if isinstance(module, bnb.nn.Linear4bit):
            qs = module.weight.quant_state
            return {"kind": "bnb-4bit", "in": module.in_features, "out": module.out_features, "quant_type": qs.quant_type,
                    "blocksize": qs.blocksize, "double_quant": bool(qs.nested), "bias": module.bias is not None}
    return None


def quantized_modules(model: nn.Module) -> dict[str, dict]:
    return {name: rec for name, m in model.named_modules() if (rec := module_kind(m)) is not None}


def tensors_of(model: nn.Module, copy: bool = True) -> dict[str, torch.Tensor]:
    """Every tensor needed to rebuild ``model``, with torch dynamic int8 weights unpacked to
    ``weight_int8`` / ``weight_scale`` (their packed form is not a tensor)."""
    records = quantized_modules(model)
    dyn = {n for n, r in records.items() if r["kind"] == "torch-dynamic-int8"}
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if not isinstance(value, torch.Tensor) or any(key.startswith(n + ".") for n in dyn):
            continue
        out[key] = value
    for name in dyn:
        module = model.get_submodule(name)
        qw = module.weight()
        out[f"{name}.weight_int8"] = qw.int_repr()
        if records[name]["per_channel"]:
            out[f"{name}.weight_scale"] = qw.q_per_channel_scales().float()
        else:
            out[f"{name}.weight_scale"] = torch.tensor([qw.q_scale()], dtype=torch.float32)
        if module.bias() is not None:
            out[f"{name}.bias"] = module.bias().detach()
    return {k: v.detach().contiguous().clone() for k, v in out.items()} if copy else out


def stored_bytes(model: nn.Module) -> int:
    """Bytes of the tensors a saved model holds (the ONNX file's size for an ORT variant)."""
    blob = onnx_bytes(model)
    if blob is not None:
        return len(blob)
    return sum(t.numel() * t.element_size() for t in tensors_of(model, copy=False).values())
