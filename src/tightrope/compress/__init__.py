"""Quantization and pruning behind one verb, :func:`compress_`.

Importing this package registers every handler and every saved-format loader.
"""

from tightrope.compress import formats, onnxrt, prune, quant, structured  # noqa: F401  (register handlers and saved formats)
from tightrope.compress.api import (
           CompressionConfig,
           CompressionSummary,
           compress_,
           register_handler,
           select_modules,
)
from tightrope.compress.quant import FP4, GPTQ, NF4, Affine, Int8Dynamic, LLMInt8

__all__ = ["CompressionConfig", "CompressionSummary", "compress_", "register_handler", "select_modules",
           "Int8Dynamic", "LLMInt8", "NF4", "FP4", "Affine", "GPTQ"]
