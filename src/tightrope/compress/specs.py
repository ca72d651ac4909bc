"""The names users type for compression: ``name`` or ``name:key=value,...`` -> a typed config.

One table of quantization schemes (:data:`QUANT_SCHEMES`) serves every command that quantizes:
``tightrope compress --quantize``, ``tightrope train --quantize`` (the quantize step of a defended
pipeline) and the study files' CLI-equivalent names. The word ``int8`` names one thing everywhere,
dynamic int8 (:class:`~tightrope.compress.quant.Int8Dynamic`); LLM.int8() is ``llm-int8``. Old
spellings that meant something else are refused in one sentence that names the new one.

The GGUF legacy block types (``gguf-q8_0``, ``gguf-q4_0``, ``gguf-q4_1``, ``gguf-q5_0``, ``gguf-q5_1``;
:mod:`tightrope.compress.gguf`) are in the table for the consumers that take them so far, fake
quantization (:mod:`tightrope.defenses.fakequant`), boxes (:mod:`tightrope.qattack.boxes`), the attack
scenarios and the audit (quantized by llama.cpp's ``gguf.quants``, :mod:`tightrope.qattack.quantize`);
``compress`` and ``train --quantize`` refuse them in one sentence. A misspelt name is answered with the
closest one. The k-quants (``gguf-q2_k`` ... ``gguf-q6_k``;
:mod:`tightrope.compress.gguf_k`) are in the table for fake quantization and :func:`tightrope.qattack.quantize.quantized_copy`; they have no boxes, so
the attacks and the audit refuse them in one sentence.
"""

from __future__ import annotations

from tightrope.compress import gguf, prune, quant
from tightrope.errors import TightropeError, did_you_mean

# scheme name -> (config class name in tightrope.compress.quant, default keyword arguments, what it is)
QUANT_SCHEMES: dict[str, tuple[str, dict, str]] = {
    "int8": ("Int8Dynamic", {}, "dynamic int8, per-channel weights (ONNX Runtime, fused graph)"),
    "int8-torch": ("Int8Dynamic", {"backend": "torch"}, "dynamic int8 through torch.ao"),
    "int8-ort": ("Int8Dynamic", {"backend": "onnxruntime"}, "dynamic int8 through ONNX Runtime"),
    "int8-tensor": ("Int8Dynamic", {"per_channel": False}, "dynamic int8, one weight scale per tensor"),
    "llm-int8": ("LLMInt8", {}, "bitsandbytes LLM.int8()"),
    "nf4": ("NF4", {}, "bitsandbytes NF4, blocks of 64"),
    "nf4-dq": ("NF4", {"double_quant": True}, "NF4 with double quantization"),
    "fp4": ("FP4", {}, "bitsandbytes FP4, blocks of 64"),
    "fp4-dq": ("FP4", {"double_quant": True}, "FP4 with double quantization"),
    "affine": ("Affine", {}, "affine 2-8 bit weights"),
    "gptq": ("GPTQ", {}, "GPTQ"),
    "gptq4": ("GPTQ", {"bits": 4}, "GPTQ, 4 bits"),
    "gptq8": ("GPTQ", {"bits": 8}, "GPTQ, 8 bits"),
    **{name: ("GGUF", {"type": t.name}, f"llama.cpp GGUF {t.name}, blocks of 32 (fake quantization, boxes, qattack, audit)")
       for name, t in gguf.SCHEMES.items()},
    **{name: ("GGUF", {"type": t.name}, f"llama.cpp GGUF {t.name}, super-blocks of 256 (fake quantization, quantized "
              "copies; no boxes)") for name, t in gguf.K_SCHEMES.items()},
}
#: Schemes of the table that compress_ (compress, train --quantize) builds: all but the GGUF block types.
COMPRESS_SCHEMES = tuple(n for n in QUANT_SCHEMES if n not in gguf.ALL_SCHEMES)
# Spellings that named another scheme before the names were unified.
RENAMED = {"int8-dynamic": "int8", "llm.int8": "llm-int8", "int8-llm": "llm-int8"}

PRUNE_METHODS = {"magnitude": "MagnitudePruning", "wanda": "Wanda", "sparsegpt": "SparseGPT", "2:4": "SemiStructured24", "24": "SemiStructured24",
                 "semi-structured": "SemiStructured24", "structured": "StructuredPruning"}


def _value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_spec(spec: str) -> tuple[str, dict]:
    """``"gptq:bits=4,group_size=64"`` -> ``("gptq", {"bits": 4, "group_size": 64})``."""
    name, _, rest = spec.strip().partition(":")
    kwargs: dict = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise TightropeError(f"The option '{item}' in '{spec}' needs the form key=value.")
        kwargs[key.strip().replace("-", "_")] = _value(value.strip())
    return name.strip().lower(), kwargs


def _build(cls, kwargs: dict, spec: str):
    try:
        return cls(**kwargs)
    except TypeError as err:
        fields = ", ".join(f for f in cls.__dataclass_fields__ if f not in ("include", "exclude"))
        raise TightropeError(f"'{spec}' has an option {cls.__name__} does not take; it takes: {fields}.") from err


def quant_config(spec: str, include: tuple[str, ...] = (), exclude: tuple[str, ...] = (), calibration: str | None = None):
    """A quantization config from a scheme name with options (:data:`QUANT_SCHEMES`)."""
    name, kwargs = parse_spec(spec)
    if name in RENAMED:
        raise TightropeError(f"The quantization '{name}' is now called '{RENAMED[name]}' "
                             f"({QUANT_SCHEMES[RENAMED[name]][2]}); 'int8' means dynamic int8 everywhere.")
    if name in gguf.ALL_SCHEMES:
        users = "fake quantization and quantized copies" if name in gguf.K_SCHEMES else "fake quantization, qattack and audit"
        raise TightropeError(f"The GGUF type '{name}' is supported by {users} only so far; "
                             f"compress and train quantize with {', '.join(COMPRESS_SCHEMES)}.")
    if name not in QUANT_SCHEMES:
        raise TightropeError(f"Unknown quantization '{name}'{did_you_mean(name, QUANT_SCHEMES)}; "
                             f"choose one of {', '.join(COMPRESS_SCHEMES)}.")
    cls_name, defaults, _ = QUANT_SCHEMES[name]
    cls = getattr(quant, cls_name)
    kwargs = {**defaults, **kwargs, "include": include, "exclude": exclude}
    if cls is quant.GPTQ and calibration and "calibration_texts" not in kwargs:
        kwargs["calibration_texts"] = calibration
    return _build(cls, kwargs, spec)


def prune_config(spec: str, include: tuple[str, ...] = (), exclude: tuple[str, ...] = (), calibration: str | None = None):
    """A pruning config from a spec (``magnitude``, ``wanda``, ``sparsegpt``, ``2:4``, ``structured``)."""
    text = spec.strip()
    # "2:4" holds the colon that separates a name from its options: read it as its other spelling "24"
    name, kwargs = parse_spec("24" + text[3:] if text.startswith("2:4") else text)
    if name not in PRUNE_METHODS or not hasattr(prune, PRUNE_METHODS[name]):
        raise TightropeError(f"Unknown pruning '{name}'; choose one of magnitude, wanda, sparsegpt, 2:4, structured.")
    cls = getattr(prune, PRUNE_METHODS[name])
    kwargs = {**kwargs, "include": include, "exclude": exclude}
    if calibration and "calibration_texts" in cls.__dataclass_fields__ and "calibration_texts" not in kwargs:
        kwargs["calibration_texts"] = calibration
    return _build(cls, kwargs, spec)
