"""What a result was computed with: library versions, threads, device. Recorded next to every figure."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata

LIBRARIES = ("tightrope", "torch", "transformers", "accelerate", "bitsandbytes", "onnxruntime", "numpy")


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def environment() -> dict:
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "libraries": {name: v for name in LIBRARIES if (v := _version(name))},
        "bitsandbytes_4bit": _bnb_4bit_path(),
    }


def _bnb_4bit_path() -> str:
    """Which 4-bit dequantization this process ran: bitsandbytes' CPU kernel where its known-answer
    check passed, tightrope's reference where it failed (tightrope.compress.bnb4); "not used" when
    no 4-bit layer was built."""
    bnb4 = sys.modules.get("tightrope.compress.bnb4")  # not imported here: provenance sits below compress
    return bnb4.kernel_check().path if bnb4 is not None else "not used"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
