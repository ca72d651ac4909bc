"""Quantize a copy of a model with the *real* libraries, and read back their integer codes.

The attack is only real if the libraries users run agree with the boxes, so verification and
the audit never use the reference maths of :mod:`tightrope.compress.primitives` to quantize:

- ``llm-int8``: ``bitsandbytes.nn.Linear8bitLt`` (``has_fp16_weights=False``, outlier threshold
  6.0 as in LLM.int8() and transformers' default), codes from ``int8_vectorwise_quant``;
- ``nf4`` / ``fp4``: ``bitsandbytes.nn.Linear4bit`` (blocksize 64, fp32 compute), codes from
  ``quantize_4bit``;
- ``int8-tensor``: ``torch.ao.quantization.quantize_dynamic`` (default qconfig: symmetric
  per-tensor qint8 weights), codes from the packed weight's ``int_repr``;
- ``gguf-q8_0``, ``gguf-q4_0``, ``gguf-q4_1``, ``gguf-q5_0``, ``gguf-q5_1``: ``gguf.quants.quantize`` /
  ``dequantize``, the numpy port of llama.cpp's reference quantizers (``quantize_row_*_ref``) that llama.cpp
  ships as its ``gguf`` Python package. That is the real-library check for GGUF: it is the definition
  llama.cpp's own conversion script applies, and tightrope's :mod:`tightrope.compress.gguf` (which the boxes
  use) is a separate implementation checked against it. The "codes" are the packed blocks, bytes as a GGUF
  file stores them (fp16 scale, fp16 minimum for the ``_1`` types, the packed codes). Layout: a Linear
  weight ``[out, in]`` is written to GGUF as it is (``convert_hf_to_gguf.py`` does not transpose; the file
  lists the dimensions innermost first, ``ne = [in, out]``), and llama.cpp quantizes each row of ``in``
  values in blocks of 32, so the blocks run along the *input* dimension; a layer whose input dimension is
  not a multiple of 32 is refused in one sentence. The quantized copy holds the dequantized weights in
  ordinary fp32 Linear layers (biases stay fp32, as llama.cpp keeps them): the weights are exactly those
  llama.cpp stores, but the product is fp32, whereas llama.cpp's CPU kernels also round the activations to
  Q8_0 blocks for these types; that activation rounding is not modelled here.

- ``gguf-q2_k``, ``gguf-q3_k``, ``gguf-q4_k``, ``gguf-q5_k``, ``gguf-q6_k`` (k-quants, :data:`K_QUANTIZERS`):
  ``gguf.quants`` has no k-quant quantizer, so the bytes are tightrope's (:mod:`tightrope.compress.gguf_k`, checked byte for
  byte against llama.cpp's own ``ggml_quantize_chunk`` without an importance matrix,
  ``tests/test_gguf_kquants.py``) and the values are ``gguf.quants.dequantize``'s. A layer whose input
  dimension is no multiple of 256 gets llama-quantize's fallback type (Q2_K, Q3_K -> Q4_0, Q4_K -> Q5_0,
  Q5_K -> Q5_1, Q6_K -> Q8_0; :func:`tightrope.compress.gguf.tensor_type`), quantized by ``gguf.quants`` as
  above. :func:`quantized_copy`, :func:`library_codes` and
  :func:`codes_equal` take these types; the attacks and the audit do not, as k-quants have no exact boxes (the
  causal-LM attack boxes a preset's k-quant layers on request, ``kquant_boxes``: error-based boxes, settled to
  every byte after the repair, :mod:`tightrope.qattack.kquant_boxes`).
- ``gguf-q4_k_m`` ... (llama-quantize presets, :data:`tightrope.qattack.boxes.PRESET_QUANTIZERS`): each layer
  quantized as above to the type llama-quantize writes for it (:func:`tightrope.qattack.boxes.preset_schemes`).

The layers replaced are those of :func:`tightrope.qattack.boxes.quantized_linears` (every Linear
but the output head), as transformers' ``BitsAndBytesConfig`` does; the GGUF types leave the same head in
full precision, so every quantizer is compared on the same layers.
"""

from __future__ import annotations

import copy
import importlib.util
import warnings

import torch
from torch import nn

from tightrope.compress import gguf as G
from tightrope.compress.api import compress_
from tightrope.compress.primitives import unpack_4bit
from tightrope.compress.quant import FP4, NF4, Int8Dynamic, LLMInt8
from tightrope.errors import MissingResourceError, TightropeError
from tightrope.qattack.boxes import (
    ATTACK_QUANTIZERS,
    GGUF_QUANTIZERS,
    PRESET_QUANTIZERS,
    check_quantizer,
    preset_schemes,
    quantized_linears,
)

#: GGUF k-quants: quantized here (module docstring), but without boxes, so not in ATTACK_QUANTIZERS.
K_QUANTIZERS = tuple(G.K_SCHEMES)
#: Every quantizer :func:`quantized_copy` and :func:`codes_equal` take (:func:`library_codes`: all but the presets,
#: which need the layer's name).
COPY_QUANTIZERS = (*ATTACK_QUANTIZERS, *K_QUANTIZERS, *PRESET_QUANTIZERS)
_GGUF = (*GGUF_QUANTIZERS, *K_QUANTIZERS, *PRESET_QUANTIZERS)


def missing_library(quantizer: str) -> str | None:
    """One sentence saying why ``quantizer`` cannot run here, or None when it can."""
    try:
        check_quantizer(quantizer, COPY_QUANTIZERS)
    except TightropeError as err:
        return str(err)
    if quantizer in _GGUF and importlib.util.find_spec("gguf") is None:
        return f"{quantizer} needs llama.cpp's gguf package, which is not installed (pip install gguf)."
    if quantizer in ("llm-int8", "nf4", "fp4") and importlib.util.find_spec("bitsandbytes") is None:
        return f"{quantizer} needs bitsandbytes, which is not installed (pip install bitsandbytes)."
    if quantizer == "int8-tensor" and "x86" not in torch.backends.quantized.supported_engines \
            and "fbgemm" not in torch.backends.quantized.supported_engines \
            and "qnnpack" not in torch.backends.quantized.supported_engines:
        return "int8-tensor needs a torch build with a quantized engine (fbgemm, x86 or qnnpack)."
    return None


def _require(quantizer: str) -> None:
    reason = missing_library(quantizer)
    if reason:
        raise MissingResourceError(reason)


# The quantizers of the attack as tightrope.compress configs: the same handlers compress a model.
CONFIGS = {"llm-int8": lambda include: LLMInt8(threshold=6.0, include=include),
           "nf4": lambda include: NF4(include=include), "fp4": lambda include: FP4(include=include),
           "int8-tensor": lambda include: Int8Dynamic(backend="torch", per_channel=False, include=include)}
#: Every quantizer the attacks and the audit accept, and the real library that quantizes it for them.
LIBRARIES = {**{name: "bitsandbytes" for name in ("llm-int8", "nf4", "fp4")}, "int8-tensor": "torch.ao",
             **{name: "gguf.quants (llama.cpp)" for name in GGUF_QUANTIZERS},
             **{name: "tightrope.compress.gguf_k (bytes as llama.cpp's) + gguf.quants.dequantize" for name in K_QUANTIZERS},
             **{name: "per layer: gguf.quants or tightrope.compress.gguf_k (llama-quantize's types)" for name in PRESET_QUANTIZERS}}


def gguf_reference(weight: torch.Tensor, quantizer: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(packed blocks, dequantized weight)`` of one weight ``[out, in]`` by llama.cpp's ``gguf.quants``: rows
    of ``in`` values in blocks of 32 (module docstring); the blocks are uint8 ``[out, in / 32 * type size]``. A
    k-quant: tightrope's bytes, ``gguf.quants``' values, or llama-quantize's fallback type for rows that are
    no multiple of 256."""
    _require(quantizer)
    import gguf  # noqa: PLC0415  (llama.cpp's package; imported only for GGUF)
    from gguf import quants  # noqa: PLC0415

    w = weight.detach().float().cpu().contiguous()
    if w.dim() != 2 or w.shape[1] % G.QK:
        raise TightropeError(f"{quantizer} quantizes rows of the input dimension in blocks of {G.QK}; a weight of shape "
                             f"{tuple(w.shape)} has rows of {w.shape[-1]} values, not a multiple of {G.QK}.")
    t = G.tensor_type(quantizer, w.shape[1])
    kind = gguf.GGMLQuantizationType(t.type_id)
    packed = G.quantize(w, t.name).data.numpy() if t.name in G.K_TYPES else quants.quantize(w.numpy(), kind)
    return torch.from_numpy(packed.copy()), torch.from_numpy(quants.dequantize(packed, kind).copy()).reshape(w.shape)


def quantized_copy(model: nn.Module, quantizer: str, modules: list[str] | None = None) -> nn.Module:
    """A deep copy of ``model`` whose Linear layers (``modules``, default :func:`quantized_linears`) run
    through the real quantized kernels, built by :func:`tightrope.compress.compress_` itself; for a GGUF type,
    Linear layers holding the weights ``gguf.quants`` dequantizes (module docstring)."""
    _require(quantizer)
    names = modules if modules is not None else list(quantized_linears(model))
    clone = copy.deepcopy(model).float().cpu().eval()
    for name in names:
        if not isinstance(clone.get_submodule(name), nn.Linear):
            raise TightropeError(f"{name} is a {type(clone.get_submodule(name)).__name__}, not a Linear layer a "
                                 "quantizer can replace.")
    if quantizer in _GGUF:
        schemes = preset_schemes(clone, quantizer) if quantizer in PRESET_QUANTIZERS else dict.fromkeys(names, quantizer)
        dequantized = {name: gguf_reference(clone.get_submodule(name).weight, schemes[name])[1] for name in names}
        with torch.no_grad():
            for name, w in dequantized.items():
                clone.get_submodule(name).weight.copy_(w)
        return clone
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compress_(clone, CONFIGS[quantizer](tuple(names)))
    return clone


def library_codes(weight: torch.Tensor, quantizer: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, scales)`` of one weight as the real library computes them; for a GGUF type the packed blocks
    (scales, minima and codes together, the bytes a GGUF file stores) and no separate scales."""
    _require(quantizer)
    if quantizer in PRESET_QUANTIZERS:
        raise TightropeError(f"'{quantizer}' mixes GGUF types per layer; compare whole models with codes_equal.")
    if quantizer in _GGUF:
        return gguf_reference(weight, quantizer)[0], torch.empty(0)
    w = weight.detach().float().contiguous().cpu()
    if quantizer == "llm-int8":
        import bitsandbytes.functional as F  # noqa: PLC0415

        q, scale, _ = F.int8_vectorwise_quant(w.to(torch.float16))
        return q, scale
    if quantizer in ("nf4", "fp4"):
        import bitsandbytes.functional as F  # noqa: PLC0415


        packed, state = F.quantize_4bit(w, blocksize=64, quant_type=quantizer)
        return unpack_4bit(packed, w.shape), state.absmax
    from torch.ao.quantization import default_dynamic_qconfig  # noqa: PLC0415

    observer = default_dynamic_qconfig.weight()
    observer(w)
    scale, zero_point = observer.calculate_qparams()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = torch.quantize_per_tensor(w, float(scale), int(zero_point), torch.qint8)
    return q.int_repr(), torch.tensor([q.q_scale()])


def codes_equal(a: nn.Module, b: nn.Module, quantizer: str, modules: list[str] | None = None) -> tuple[int, int]:
    """``(mismatched, total)`` code and scale counts between two models under the real library (GGUF: bytes of
    the packed blocks; a preset: each layer's own type)."""
    names = modules if modules is not None else list(quantized_linears(a))
    schemes = preset_schemes(a, quantizer) if quantizer in PRESET_QUANTIZERS else dict.fromkeys(names, quantizer)
    mismatched = total = 0
    for name in names:
        qa, sa = library_codes(a.get_submodule(name).weight, schemes[name])
        qb, sb = library_codes(b.get_submodule(name).weight, schemes[name])
        mismatched += int((qa != qb).sum()) + int((sa != sb).sum())
        total += qa.numel() + sa.numel()
    return mismatched, total
