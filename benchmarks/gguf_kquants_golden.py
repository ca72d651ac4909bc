"""Golden bytes of GGUF k-quants from llama.cpp itself, for tests/gguf_kquants_golden.json.

llama.cpp's k-quant reference quantizers (``quantize_row_q2_K_ref``, ``quantize_row_q4_K_ref`` ... in ggml-quants.c) are called through
ctypes by ``ggml_quantize_chunk(type, src, dst, 0, nrows, n_per_row, imatrix = NULL)``, which is what
``llama-quantize`` does without an importance matrix. gguf-py has no quantizer for these types, so this is
the reference tightrope's :mod:`tightrope.compress.gguf_k` is checked against. The inputs are
``golden_inputs()`` of tests/test_gguf_kquants.py (seeded numpy). Every tensor's bytes are stored as a SHA-256
digest, and the bytes of the "edge" tensor's rows 1 and 3 (the edge cases) in full (base64), to show where a
mismatch is while keeping the fixture a few KB.

Build the library (a few minutes on one core) from llama-cpp-python's sdist (0.3.36, which vendors llama.cpp)::

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d /tmp/lcp && cd /tmp/lcp && tar xzf *.tar.gz
    cd llama_cpp_python-0.3.36/vendor/llama.cpp && touch ggml/ggml.pc.in
    cmake -S ggml -B /tmp/lcp/build -DGGML_NATIVE=OFF -DBUILD_SHARED_LIBS=ON -DCMAKE_BUILD_TYPE=Release
    cmake --build /tmp/lcp/build --target ggml-base -j1

then ``python benchmarks/gguf_kquants_golden.py --lib /tmp/lcp/build/src/libggml-base.so`` (or set
``TIGHTROPE_GGML_LIB``) rewrites the fixture and prints a table comparing tightrope's bytes; ``--check``
compares with the fixture instead, and ``--stress 6`` also compares 6 random 256 x 1024 tensors (normal at
random scales, t(2) tails, 30% zeros with sign-only rows) super-block by super-block. Without the library
the script says so and exits 0 (skipped).
"""

from __future__ import annotations

import argparse
import base64
import ctypes
import hashlib
import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "gguf_kquants_golden.json"
GGML_TYPES = {"Q2_K": 10, "Q3_K": 11, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14}
EDGE_ROWS = [1, 3]  # the rows of the edge tensor stored byte for byte
TYPE_SIZES = {"Q2_K": 84, "Q3_K": 110, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}


def golden_inputs() -> dict[str, np.ndarray]:
    spec = importlib.util.spec_from_file_location("_kq_cases", ROOT / "tests" / "test_gguf_kquants.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.golden_inputs()


def llama_cpp_quantize(lib: ctypes.CDLL, x: np.ndarray, name: str) -> bytes:
    """The bytes ``ggml_quantize_chunk`` writes for ``x`` (2-D fp32, rows of whole super-blocks), imatrix NULL."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, n = x.shape
    out = np.zeros(rows * n // 256 * TYPE_SIZES[name], dtype=np.uint8)
    written = lib.ggml_quantize_chunk(GGML_TYPES[name], x.ctypes.data_as(ctypes.c_void_p),
                                      out.ctypes.data_as(ctypes.c_void_p), 0, rows, n, None)
    assert written == out.size, (written, out.size)
    return out.tobytes()


def load_library(path: str) -> ctypes.CDLL:
    """llama.cpp's libggml-base with ``ggml_quantize_chunk``'s signature declared."""
    lib = ctypes.CDLL(path)
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    return lib


def stress(lib: ctypes.CDLL, trials: int) -> dict[str, tuple[int, int]]:
    """``{type: (mismatched super-blocks, super-blocks)}`` of tightrope against llama.cpp on random tensors."""
    import torch  # noqa: PLC0415

    from tightrope.compress import gguf_k  # noqa: PLC0415

    rng = np.random.default_rng(7)
    counts = {name: [0, 0] for name in GGML_TYPES}
    for trial in range(trials):
        x = rng.standard_normal((256, 1024)).astype(np.float32) * np.float32(10.0 ** rng.uniform(-4, 1))
        if trial % 3 == 1:
            x = (rng.standard_t(2, x.shape) * 0.02).astype(np.float32)
        if trial % 3 == 2:
            x[rng.random(x.shape) < 0.3] = 0
            x[::7], x[::5] = np.abs(x[::7]), -np.abs(x[::5])
        for name in GGML_TYPES:
            size = TYPE_SIZES[name]
            ref = np.frombuffer(llama_cpp_quantize(lib, x, name), np.uint8).reshape(-1, size)
            mine = gguf_k.quantize_k(torch.from_numpy(x), gguf_k.K_TYPES[name]).numpy().reshape(-1, size)
            counts[name][0] += int((ref != mine).any(axis=1).sum())
            counts[name][1] += ref.shape[0]
    return {name: (bad, total) for name, (bad, total) in counts.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lib", default=os.environ.get("TIGHTROPE_GGML_LIB", ""), help="path of libggml-base.so")
    parser.add_argument("--check", action="store_true", help="compare with the fixture instead of rewriting it")
    parser.add_argument("--stress", type=int, default=0, help="also compare this many random 256 x 1024 tensors")
    args = parser.parse_args()
    if not args.lib or not Path(args.lib).is_file():
        print("skipped: llama.cpp's libggml-base is not here (--lib or TIGHTROPE_GGML_LIB); see the docstring")
        return 0
    lib = load_library(args.lib)
    import torch  # noqa: PLC0415

    from tightrope.compress import gguf_k  # noqa: PLC0415

    torch.set_num_threads(1)
    golden: dict = {"made_by": "benchmarks/gguf_kquants_golden.py", "llama_cpp": "llama-cpp-python 0.3.36 (vendored "
                    "llama.cpp, ggml 0.25.3), ggml_quantize_chunk with imatrix NULL", "bytes": {}, "sha256": {}}
    print(f"{'case':<10} {'type':<6} {'bytes':>6} {'tightrope equal':>16}")
    for case, x in golden_inputs().items():
        for name in GGML_TYPES:
            ref = llama_cpp_quantize(lib, x, name)
            mine = gguf_k.quantize_k(torch.from_numpy(x), gguf_k.K_TYPES[name]).numpy().tobytes()
            print(f"{case:<10} {name:<6} {len(ref):>6} {str(mine == ref):>16}")
            if case == "edge":
                rows = np.frombuffer(ref, np.uint8).reshape(x.shape[0], -1)[EDGE_ROWS]
                golden["bytes"][f"{case}/{name}"] = base64.b64encode(rows.tobytes()).decode()
            golden["sha256"][f"{case}/{name}"] = hashlib.sha256(ref).hexdigest()
    for name, (bad, total) in stress(lib, args.stress).items() if args.stress else ():
        print(f"stress {name}: {bad} of {total} super-blocks differ from llama.cpp's")
    if args.check:
        stored = json.loads(FIXTURE.read_text())
        same = stored["bytes"] == golden["bytes"] and stored["sha256"] == golden["sha256"]
        print(f"fixture {'matches' if same else 'DIFFERS'}")
        return 0 if same else 1
    FIXTURE.write_text(json.dumps(golden, indent=1) + "\n")
    print(f"wrote {FIXTURE.relative_to(ROOT)} ({FIXTURE.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
