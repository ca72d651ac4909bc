"""Quantization and pruning behind one verb, :func:`compress_`.

Importing this package registers every handler and every saved-format loader.
"""

from tightrope.compress.api import CompressionConfig, CompressionSummary, compress_, register_handler, select_modules

__all__ = ["CompressionConfig", "CompressionSummary", "compress_", "register_handler", "select_modules"]
