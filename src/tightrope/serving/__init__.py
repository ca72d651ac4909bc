"""Run an exported bundle with onnxruntime, tokenizers and numpy only: no torch, no transformers.

A bundle (written by ``tightrope export``, :func:`tightrope.compress.export.export_bundle`) is a
folder that Hugging Face optimum's ``ORTModelForSequenceClassification`` also loads::

    model.onnx        the int8 graph, word embeddings as an int8 table with a per-row scale
    config.json       the transformers config (labels, model type)
    tokenizer.json    the fast tokenizer (+ tokenizer_config.json, special_tokens_map.json)
    card.json         tightrope's card: format "onnx-bundle", tokenization (max length, truncation),
                      pad id, compression history, sizes

Nothing in this package imports torch, transformers or any tightrope module that does; a test
checks ``sys.modules`` after ``tightrope predict``. Its third-party imports are those of the
``serve`` extra: onnxruntime, tokenizers, numpy, and starlette + uvicorn for the HTTP server.
"""

from tightrope.serving.bundle import BUNDLE_FORMAT, Bundle, load_bundle

__all__ = ["BUNDLE_FORMAT", "Bundle", "load_bundle"]
