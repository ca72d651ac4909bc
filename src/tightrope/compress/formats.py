"""Saving and reloading quantized models, and the ONNX Runtime int8 variant.

A quantized PyTorch model is written as ``model.safetensors`` (codes, scales and the untouched
full-precision tensors; never a pickle) + ``config.json`` + the tokenizer + ``card.json`` with
``"format": "tightrope-quant"``, the ``"compression"`` history and a ``"quantized"`` map from module
name to its kind. :func:`load_quantized` rebuilds the architecture from ``config.json`` (and the
pruning plan, when a structurally pruned model was quantized), puts an empty quantized module of
the recorded kind at each recorded name, and loads every tensor strictly.

The ONNX Runtime variant is ``model.onnx`` (ORT dynamic int8 MatMuls) + tokenizer + card with
``"format": "onnx-int8"``; :class:`OnnxClassifier` runs it behind the same ``TextClassifier`` face.
Both loaders are registered with :func:`tightrope.inference.register_format`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from tightrope import models
from tightrope.atomic import replaced_dir
from tightrope.compress import quant
from tightrope.compress.onnxrt import ONNX_FORMAT
from tightrope.compress.prune import STRUCTURED_FORMAT
from tightrope.compress.quant import _dyn_linear, quantized_modules, tensors_of
from tightrope.compress.structured import apply_structure_, structure_of
from tightrope.errors import TightropeError
from tightrope.inference import TextClassifier, is_structured, read_card, register_format

QUANT_FORMAT = "tightrope-quant"


def _empty_module(record: dict, tensors: dict[str, torch.Tensor], name: str) -> nn.Module:
    kind = record["kind"]
    bias = tensors.get(f"{name}.bias")
    if kind == "affine":
        mod = quant.AffineQuantLinear(record["in"], record["out"], record["bits"], record["group"], record["groups"],
                                      record["rows"], record["bias"])
        return mod
    if kind == "torch-dynamic-int8":
        Dyn = _dyn_linear()
        mod = Dyn(record["in"], record["out"], bias_=record["bias"], dtype=torch.qint8)
        ints = tensors[f"{name}.weight_int8"]
        scale = tensors[f"{name}.weight_scale"].double()
        if record["per_channel"]:
            qw = torch._make_per_channel_quantized_tensor(ints, scale, torch.zeros_like(scale, dtype=torch.long), 0)
        else:
            qw = torch._make_per_tensor_quantized_tensor(ints, float(scale[0]), 0)
        mod.set_weight_bias(qw, bias)
        return mod
    bnb = quant._bnb()
    if kind == "bnb-int8":
        mod = bnb.nn.Linear8bitLt(record["in"], record["out"], bias=record["bias"], has_fp16_weights=False,
                                  threshold=record["threshold"])
        cb = tensors[f"{name}.weight"]
        mod.weight = bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=tensors[f"{name}.SCB"])
        if bias is not None:
            mod.bias = nn.Parameter(bias, requires_grad=False)
        return mod.eval()
    if kind == "bnb-4bit":
        from tightrope.compress import bnb4  # noqa: PLC0415 - bitsandbytes is optional (MissingResourceError without it), imported only where used

        return bnb4.from_prequantized(record["in"], record["out"], bias, record["quant_type"], record["double_quant"],
                                      tensors, name)
    raise TightropeError(f"The saved module {name} has the unknown quantized kind '{kind}'.")


# --- save / load --------------------------------------------------------------------------------


def save_compressed(model: nn.Module, tokenizer, out_dir: str | Path, card: dict | None = None,
                    files: dict | None = None) -> Path:
    """Write a compressed model so that :func:`tightrope.inference.load` reloads it.

    Quantized models get the ``tightrope-quant`` (or ``onnx-int8``) format; a model that is only
    pruned is written by the pruning module's saver (its own format). ``files`` (name -> JSON payload)
    go beside card.json: the resources of an input transform (:func:`tightrope.inference.transform_files`).
    """
    out = Path(out_dir)
    card = {"kind": "tightrope.model", "created_by": "tightrope compress", **(card or {})}
    history = getattr(model, "_tightrope_compression", None)
    if history:
        card["compression"] = history
    structure = structure_of(model)
    blob = quant.onnx_bytes(model)
    records = quantized_modules(model)
    if blob is None and not records:
        return save_pruned(model, tokenizer, out, card, files=files)
    with replaced_dir(out) as tmp:
        tokenizer.save_pretrained(tmp)
        model.config.save_pretrained(tmp)
        if blob is not None:
            (tmp / "model.onnx").write_bytes(blob)
            card["format"] = ONNX_FORMAT
        else:
            from safetensors.torch import save_file  # noqa: PLC0415

            save_file(tensors_of(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
            card["format"] = QUANT_FORMAT
            card["quantized"] = records
            if structure is not None:
                card["structure"] = structure
        for name, payload in (files or {}).items():
            (tmp / name).write_text(json.dumps(payload))
        (tmp / "card.json").write_text(json.dumps(card, indent=2, default=str))
    return out


def load_quantized(path: str | Path, card: dict | None = None):
    """Rebuild a ``tightrope-quant`` model directory: ``(model, tokenizer)``."""
    from safetensors.torch import load_file  # noqa: PLC0415
    from transformers import AutoConfig, AutoModelForSequenceClassification  # noqa: PLC0415


    path = Path(path).expanduser()
    card = card if card is not None else read_card(path)
    records = card.get("quantized") or {}
    weights = path / "model.safetensors"
    if not weights.exists():
        raise TightropeError(f"{path} holds no model.safetensors, so it is not a saved quantized model.")
    config = AutoConfig.from_pretrained(str(path))
    model = AutoModelForSequenceClassification.from_config(config)
    if card.get("structure"):
        apply_structure_(model, card["structure"])
    tensors = load_file(str(weights))
    dyn = [n for n, r in records.items() if r["kind"] == "torch-dynamic-int8"]
    for name, record in records.items():
        if name not in dyn:  # torch's packed modules go in after loading: they cannot load a plain state
            quant._set_submodule(model, name, _empty_module(record, tensors, name))
    bnb_names = [n for n, r in records.items() if r["kind"].startswith("bnb")]
    rest = {k: v for k, v in tensors.items() if not any(k.startswith(n + ".") for n in dyn + bnb_names)}
    result = model.load_state_dict(rest, strict=False)
    missing = [k for k in result.missing_keys if not any(k.startswith(n + ".") for n in dyn + bnb_names)]
    if missing or result.unexpected_keys:
        raise TightropeError(
            f"The weights in {path} do not match its card: missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}."
        )
    for name in dyn:
        quant._set_submodule(model, name, _empty_module(records[name], tensors, name))
    model.eval()
    model._tightrope_compression = card.get("compression", [])
    tokenizer = models.load_tokenizer(str(path))
    return model, tokenizer


def _clf(model, tokenizer, path: Path, card: dict, label_names=None) -> TextClassifier:
    tok = card.get("tokenization", {})
    return TextClassifier(model, tokenizer, max_length=tok.get("max_length", 256), truncation=tok.get("truncation", "head"),
                          label_names=label_names, source=str(path), card=card)


@register_format(QUANT_FORMAT)
def _load_quant_classifier(path: Path, card: dict) -> TextClassifier:
    model, tokenizer = load_quantized(path, card)
    return _clf(model, tokenizer, path, card)


# --- pruned models: saving and loading -----------------------------------------------------------


def pruning_card(model: nn.Module) -> dict:
    """Card fields a saver adds for a pruned model: the format and plan of a structurally pruned one."""
    structure = structure_of(model)
    card: dict = {}
    if structure is not None:
        card.update(format=STRUCTURED_FORMAT, structure=structure)
    history = getattr(model, "_tightrope_compression", None)
    if history:
        card["compression"] = history
    return card


def save_pruned(model: nn.Module, tokenizer, out_dir: str | Path, card: dict | None = None,
                files: dict | None = None) -> Path:
    """Write a pruned model (safetensors + config + tokenizer + card.json that records how it was made;
    ``files``: other JSON files for the directory, such as an input transform's table)."""
    full = {"kind": "tightrope.model", "created_by": "tightrope compress", **(card or {}), **pruning_card(model)}
    return models.save_model((model, tokenizer), out_dir, extra={**(files or {}), "card.json": full})


def load_pruned(path: str | Path) -> models.LoadedModel:
    """Load a pruned classifier; a structurally pruned one is rebuilt from its plan, then loaded strictly."""
    from safetensors.torch import load_file  # noqa: PLC0415
    from transformers import AutoConfig, AutoModelForSequenceClassification  # noqa: PLC0415

    path = Path(path).expanduser()
    card = read_card(path) if path.is_dir() else {}
    config = None
    structure = card.get("structure")
    if structure is None and (path / "config.json").exists():
        config = AutoConfig.from_pretrained(str(path))
        structure = getattr(config, "tightrope_structure", None)
    if structure is None:
        loaded = models.load_classifier(str(path))
        loaded.model._tightrope_compression = card.get("compression", [])
        return loaded
    files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise TightropeError(f"{path} holds no model*.safetensors weights.")
    config = config or AutoConfig.from_pretrained(str(path))
    model = AutoModelForSequenceClassification.from_config(config)
    apply_structure_(model, structure)
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise TightropeError(f"The weights in {path} do not match its pruning plan: {str(err).splitlines()[0]}") from err
    model.eval()
    model._tightrope_compression = card.get("compression", [])
    tokenizer = models.load_tokenizer(str(path))
    return models.LoadedModel(model=model, tokenizer=tokenizer, source=str(path), path=str(path))


def load_trainable(name_or_path: str, label_names: list[str], *, trust_remote_code: bool = False) -> models.LoadedModel:
    """The model a training run starts from. A structurally pruned tightrope directory is rebuilt from its pruning
    plan (its config.json names the unpruned sizes), so a defense can be trained on a pruned model and keep its
    structure (save it with :func:`pruning_card`'s fields); anything else loads through
    :func:`tightrope.models.load_classifier`, which adds a fresh head if it has none."""
    if is_structured(name_or_path):
        loaded = load_pruned(name_or_path)
        if loaded.model.config.num_labels != len(label_names):
            raise TightropeError(f"{name_or_path} predicts {loaded.model.config.num_labels} labels but the data has "
                                 f"{len(label_names)}.")
        return loaded
    return models.load_classifier(name_or_path, label_names=label_names, require_head=False,
                                  trust_remote_code=trust_remote_code)


@register_format(STRUCTURED_FORMAT)
def _load_structured_classifier(path: Path, card: dict) -> TextClassifier:
    loaded = load_pruned(path)
    tok = card.get("tokenization", {})
    return TextClassifier(loaded.model, loaded.tokenizer, max_length=tok.get("max_length", 256),
                          truncation=tok.get("truncation", "head"), source=str(path), card=card)
