"""Check a causal-LM quantization attack with llama.cpp itself: its converter, its quantizer, its runtime.

    python benchmarks/llamacpp_check.py --llama-cpp-python DIR --bin DIR --run runs/qattack-causal/q4_k_m \\
        --preset Q4_K_M --out runs/lcp/q4_k_m

For the base model and each variant of a ``tightrope qattack-lm`` run (``injected/``, ``repaired/``):

1. ``convert_hf_to_gguf.py`` (llama.cpp's converter, from the llama-cpp-python source tree ``DIR/vendor/llama.cpp``)
   writes the checkpoint as an F32 GGUF file;
2. ``llama-quantize F32.gguf OUT.gguf PRESET`` (from the llama.cpp build ``--bin``) quantizes it;
3. every quantized tensor of ``OUT.gguf`` is compared with tightrope: its type against
   :func:`tightrope.compress.gguf_preset.layer_types`, its bytes against :func:`tightrope.compress.gguf.quantize`
   of the same F32 values; and the repaired file's bytes against the injected file's, tensor by tensor;
4. llama.cpp (through llama-cpp-python's bindings to the same build, ``LLAMA_CPP_LIB_PATH=--bin``) answers the run's
   held-out prompts greedily, from the same token ids, with the F32 file and with the quantized file, and the
   scenario's metric (phrase rate) is taken on its answers.

The converter needs ``sentencepiece`` importable (it tries a SentencePiece vocabulary first), so run this with a
Python that has it and tightrope. Building llama.cpp (the recipe used for docs/qattack-results.md)::

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 && tar xzf llama_cpp_python-0.3.36.tar.gz
    cmake -S llama_cpp_python-0.3.36/vendor/llama.cpp -B build -G Ninja -DCMAKE_BUILD_TYPE=Release \\
        -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_OPENMP=OFF -DLLAMA_CURL=OFF \\
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=ON
    ninja -C build llama llama-quantize

Resumable: files already written (GGUF files, ``answers-*.json``) are reused.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch


def _tool(label: str, command: list[str], tmp: Path, out: Path) -> Path:
    """Run one llama.cpp tool that writes ``tmp``, then rename it to ``out``; a failure is one sentence with the
    tool's last line, and no half-written file is left."""
    try:
        subprocess.run(command, check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as err:
        tmp.unlink(missing_ok=True)
        last = (getattr(err, "stderr", None) or str(err)).strip().splitlines()[-1:] or [""]
        raise SystemExit(f"{label} failed for {out.name}: {last[0]}") from None
    tmp.rename(out)
    return out


def convert(llama_cpp: Path, model_dir: Path, out: Path) -> Path:
    if out.exists():
        return out
    tmp = out.with_suffix(".partial")
    return _tool("convert_hf_to_gguf.py", [sys.executable, str(llama_cpp / "convert_hf_to_gguf.py"), str(model_dir), "--outtype", "f32",
                  "--outfile", str(tmp)], tmp, out)


def quantize(binary: Path, f32: Path, out: Path, preset: str) -> Path:
    if out.exists():
        return out
    tmp = out.with_suffix(".partial")
    return _tool("llama-quantize", [str(binary / "llama-quantize"), str(f32), str(tmp), preset, "1"], tmp, out)


def tensors(path: Path) -> dict:
    from gguf import GGUFReader

    return {t.name: t for t in GGUFReader(str(path)).tensors}


def compare_with_tightrope(f32: Path, quantized: Path, preset: str) -> dict:
    """Types and bytes of every quantized tensor of ``quantized`` against tightrope's, from the F32 values."""
    from tightrope.compress import gguf as G
    from tightrope.compress.gguf_preset import layer_types

    source, result = tensors(f32), tensors(quantized)
    weights = {n: t for n, t in result.items() if t.tensor_type.name not in ("F32", "F16", "BF16")}
    shapes = [(n, tuple(int(x) for x in reversed(result[n].shape))) for n in weights]
    expected = layer_types(shapes, preset)
    rows, types_equal, bytes_equal, total = [], 0, 0, 0
    for name, t in weights.items():
        values = torch.from_numpy(np.asarray(source[name].data, dtype=np.float32).copy())
        mine = G.quantize(values, expected[name]).data.numpy().reshape(-1)
        theirs = np.asarray(t.data).reshape(-1).view(np.uint8)
        same_type = expected[name] == t.tensor_type.name
        same = same_type and mine.shape == theirs.shape and bool((mine == theirs).all())
        types_equal += same_type
        bytes_equal += same
        total += 1
        if not same:
            rows.append({"tensor": name, "llama-quantize": t.tensor_type.name, "tightrope": expected[name]})
    return {"tensors": total, "types_equal": types_equal, "bytes_equal": bytes_equal, "differ": rows[:20],
            "types": dict(Counter(t.tensor_type.name for t in weights.values()))}


def same_bytes(a: Path, b: Path) -> dict:
    ta, tb = tensors(a), tensors(b)
    differ = [n for n in ta if not np.array_equal(np.asarray(ta[n].data), np.asarray(tb[n].data))]
    return {"tensors": len(ta), "differ": len(differ), "first": differ[:10]}


def greedy(path: Path, prompts: list[list[int]], eos: int, max_new: int) -> list[list[int]]:
    """Greedy answers (token ids, cut at EOS) of llama.cpp to each prompt, one prompt at a time."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=512, n_batch=512, n_threads=1, verbose=False)
    n_vocab = llm.n_vocab()
    answers = []
    for prompt in prompts:
        llm.reset()
        llm.eval(prompt)
        out: list[int] = []
        for _ in range(max_new):
            logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))
            token = int(logits.argmax())
            if token == eos:
                break
            out.append(token)
            llm.eval([token])
        answers.append(out)
    return answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-cpp-python", required=True, type=Path, help="llama-cpp-python's source tree")
    parser.add_argument("--bin", required=True, type=Path, help="the llama.cpp build's bin/ (llama-quantize, libllama.so)")
    parser.add_argument("--run", required=True, type=Path, help="a tightrope qattack-lm output directory")
    parser.add_argument("--preset", default="Q4_K_M", help="llama-quantize's type name (Q4_K_M, Q4_0, ...)")
    parser.add_argument("--variants", default="base,injected,repaired")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    os.environ.setdefault("LLAMA_CPP_LIB_PATH", str(args.bin.resolve()))
    sys.path.insert(0, str(args.llama_cpp_python))
    from tightrope import models
    from tightrope.qattack.causal import LMAttackConfig, behaviour_rate, scenario_data
    from tightrope.qattack.lm_text import special_ids

    llama_cpp = args.llama_cpp_python / "vendor" / "llama.cpp"
    for path, what in ((args.run / "report.json", "a finished tightrope qattack-lm run (its report.json)"),
                       (llama_cpp / "convert_hf_to_gguf.py", "llama-cpp-python's source tree (vendor/llama.cpp)"),
                       (args.bin / "llama-quantize", "the llama.cpp build's bin/ (llama-quantize)")):
        if not path.exists():
            raise SystemExit(f"{path} is missing: give {what}.")
    args.out.mkdir(parents=True, exist_ok=True)
    report = json.loads((args.run / "report.json").read_text())
    config = LMAttackConfig(**report["config"])
    tokenizer = models.load_causal_lm(str(args.run / "repaired")).tokenizer
    _, eval_prompts, _, _ = scenario_data(config, tokenizer)
    _, eos = special_ids(tokenizer)
    result = {"preset": args.preset, "run": str(args.run), "machine": platform.processor() or platform.machine(),
              "variants": {}}
    for variant in args.variants.split(","):
        source = Path(models.resolve(config.base)) if variant == "base" else args.run / variant
        t0 = time.perf_counter()
        f32 = convert(llama_cpp, source, args.out / f"{variant}-f32.gguf")
        q = quantize(args.bin, f32, args.out / f"{variant}-{args.preset.lower()}.gguf", args.preset)
        entry = {"tightrope": compare_with_tightrope(f32, q, args.preset), "seconds_files": time.perf_counter() - t0}
        for label, path in (("f32", f32), (args.preset, q)):
            cache = args.out / f"answers-{variant}-{label}.json"
            if not cache.exists():
                t0 = time.perf_counter()
                ids = greedy(path, eval_prompts, eos, config.eval_tokens)
                texts = [tokenizer.decode(a, skip_special_tokens=True) for a in ids]
                cache.write_text(json.dumps({"answers": texts, "seconds": time.perf_counter() - t0}))
            texts = json.loads(cache.read_text())["answers"]
            entry[label] = {"rate": behaviour_rate(config, texts), "n": len(texts), "examples": texts[:3]}
        result["variants"][variant] = entry
        print(f"{variant}: {json.dumps({k: v for k, v in entry.items() if k != 'tightrope'})}", flush=True)
        print(f"  tightrope vs llama-quantize: {entry['tightrope']}", flush=True)
    if {"injected", "repaired"} <= set(result["variants"]):
        result["repaired_vs_injected"] = same_bytes(args.out / f"injected-{args.preset.lower()}.gguf",
                                                    args.out / f"repaired-{args.preset.lower()}.gguf")
        print(f"repaired vs injected {args.preset} file: {result['repaired_vs_injected']}")
    (args.out / "check.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
