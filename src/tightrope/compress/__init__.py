"""Quantization and pruning behind one verb, :func:`compress_`.

Importing this package registers every handler and every saved-format loader.
"""

from tightrope.compress.api import CompressionConfig, CompressionSummary, compress_, register_handler, select_modules
from tightrope.compress import formats, quant  # noqa: F401  (registers handlers and the saved formats)
from tightrope.compress.quant import FP4, GPTQ, NF4, Affine, Int8Dynamic, LLMInt8

try:  # pruning lives in its own module; the package works without it
    from tightrope.compress import prune  # noqa: F401
except ImportError:  # pragma: no cover
    prune = None

__all__ = ["CompressionConfig", "CompressionSummary", "compress_", "register_handler", "select_modules",
           "Int8Dynamic", "LLMInt8", "NF4", "FP4", "Affine", "GPTQ"]
