"""What a command does, end to end, on model directories: the layer above every package that
defines a saved format or an input transform.

- :func:`load`: any variant tightrope writes (PyTorch, quantized, ONNX Runtime, structurally
  pruned), with the input transform its card names (a defense such as synonym encoding);
- :mod:`.compress`: load, prune, recover, quantize and save a model directory;
- :mod:`.evaluate`: accuracy, F1, latency, throughput and memory of a model directory;
- :mod:`.memprobe`: the fresh process that measures peak memory.

Importing this package imports :mod:`tightrope.compress`, which registers its saved formats with
:func:`tightrope.inference.register_format`, so the dispatch in :func:`tightrope.inference.load` knows
them all while the lower layers never import the higher ones; input transforms (a defense's
rewriting of the text) come from :mod:`tightrope.transforms`, which inference reads directly.
"""

from __future__ import annotations

import tightrope.compress  # noqa: F401 - importing it registers the saved formats
from tightrope import inference


def load(name_or_path: str, *, max_length: int | None = None, trust_remote_code: bool = False) -> inference.TextClassifier:
    """Load any model variant for inference (see :func:`tightrope.inference.load`)."""
    return inference.load(name_or_path, max_length=max_length, trust_remote_code=trust_remote_code)


__all__ = ["load"]
