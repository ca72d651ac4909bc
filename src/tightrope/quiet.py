"""What reaches a person's terminal: tightrope's own lines, not third-party progress bars and warnings.

transformers (the "Loading weights" bar since 5.25), huggingface_hub, bitsandbytes (it logs a failed
kernel download on AVX-512-BF16 CPUs), torch's ONNX exporter, optuna and onnxruntime each print
on their own terms. The command line calls :func:`configure` once: without ``--verbose`` they are
kept to errors; tightrope's own progress bars and its ``tightrope`` logger (one line each, on
stderr) stay. A library user who imports tightrope keeps whatever they configured.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

THIRD_PARTY_LOGGERS = ("transformers", "huggingface_hub", "bitsandbytes", "datasets", "optuna", "accelerate",
                       "torch", "onnxruntime", "onnxscript", "kernels", "urllib3", "filelock", "matplotlib")
# Read by those libraries when they are imported, and inherited by worker processes.
THIRD_PARTY_ENV = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                   "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "TOKENIZERS_PARALLELISM": "false"}


class _OneLine(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"tightrope: {record.getMessage()}"


def configure(verbose: bool = False) -> None:
    """Send the ``tightrope`` logger's notices to stderr; quiet third-party output unless ``verbose``."""
    ours = logging.getLogger("tightrope")
    if not any(getattr(h, "_tightrope", False) for h in ours.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_OneLine())
        handler._tightrope = True  # type: ignore[attr-defined]
        ours.addHandler(handler)
        ours.propagate = False
    ours.setLevel(logging.DEBUG if verbose else logging.WARNING)
    if verbose:
        return
    for key, value in THIRD_PARTY_ENV.items():
        os.environ.setdefault(key, value)
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", module=r"tightrope(\.|$)")
    _quiet_imported_libraries()


def _quiet_imported_libraries() -> None:
    """Libraries already imported read their settings at import time; tell them directly."""
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars  # noqa: PLC0415 - only when already imported

        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging  # noqa: PLC0415 - only when already imported

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    if "onnxruntime" in sys.modules:
        import onnxruntime  # noqa: PLC0415 - only when already imported

        onnxruntime.set_default_logger_severity(3)
