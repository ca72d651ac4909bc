"""Classifier logits with the last encoder layer computed for the first token only.

A BERT-family sequence classifier reads one row of its last layer: BERT's pooler and RoBERTa's
classification head both take ``hidden_states[:, 0]``. transformers computes the whole last layer and
throws every other row away. The last layer needs the keys and values of every token (from the
layer below), but the query, the attention's output projection and the feed-forward block only for
that first row. For MiniLM-L6 (hidden 384, feed-forward 1,536, 6 layers) the layer's matrix products
are 12 d^2 per token, of which the keys and values are 2 d^2: computing one row saves 10/12 of a
layer, about 14% of the forward pass's multiply-adds at any length (the attention scores are a small
share at 64-256 tokens).

The logits are the model's own up to float rounding (the products run on other shapes, so the last
bits may differ; the tests hold them to 1e-5). :func:`first_token_logits` answers ``None`` for a model
it does not cover, and the caller runs the full forward pass.

Written here because neither transformers nor ONNX Runtime's optimizer drops the unread rows of the
last layer (the transformer optimizer fuses attention per layer, whole).
"""

from __future__ import annotations

import torch
from torch import nn

# (model class, how its head reads the first row); each was checked against the full forward pass.
HEADS = {
    "BertForSequenceClassification": "pooler",
    "RobertaForSequenceClassification": "features",
    "XLMRobertaForSequenceClassification": "features",
}
ATTENTION = ("eager", "sdpa")


def _bypassed(module: nn.Module) -> bool:
    """A forward replaced on the instance (an ONNX Runtime session's, say) or a hook: this path would skip it."""
    return "forward" in vars(module) or bool(module._forward_hooks or module._forward_pre_hooks)


def supports(model: nn.Module) -> bool:
    """Whether :func:`first_token_logits` computes this model: a covered head on an encoder (not a decoder)
    of plain torch modules, with eager or SDPA attention, and nothing attached to the modules whose own
    forward this path does not call (the model, its encoder, the last layer and its attention)."""
    config = getattr(model, "config", None)
    if type(model).__name__ not in HEADS or config is None or getattr(config, "is_decoder", False):
        return False
    if getattr(config, "_attn_implementation", None) not in ATTENTION:
        return False
    layers = getattr(getattr(getattr(model, "base_model", None), "encoder", None), "layer", None)
    if not layers:
        return False
    last = layers[-1]
    skipped = (model, model.base_model, model.base_model.encoder, last, last.attention, last.attention.self)
    if any(_bypassed(m) for m in skipped):
        return False
    if HEADS[type(model).__name__] == "pooler" and getattr(model.base_model, "pooler", None) is None:
        return False
    return layers[-1].attention.self.all_head_size > 0 and not getattr(layers[-1], "add_cross_attention", False)


def first_row(layer: nn.Module, hidden: torch.Tensor, mask) -> torch.Tensor:
    """The output of a BERT layer for the first token only, (B, 1, d): its query attends over every
    token's key and value; the output projection and feed-forward block run on one row."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # noqa: PLC0415 - transformers loads with the model
    from transformers.models.bert.modeling_bert import eager_attention_forward  # noqa: PLC0415

    attention = layer.attention.self
    size = attention.attention_head_size
    batch, length, _ = hidden.shape
    query = attention.query(hidden[:, :1]).view(batch, 1, -1, size).transpose(1, 2)
    key = attention.key(hidden).view(batch, length, -1, size).transpose(1, 2)
    value = attention.value(hidden).view(batch, length, -1, size).transpose(1, 2)
    attend = ALL_ATTENTION_FUNCTIONS.get_interface(attention.config._attn_implementation, eager_attention_forward)
    row_mask = None if mask is None else mask[:, :, :1]  # the bidirectional mask's rows are all alike
    context, _ = attend(attention, query, key, value, row_mask, dropout=0.0, scaling=attention.scaling)
    out = layer.attention.output(context.reshape(batch, 1, -1), hidden[:, :1])
    return layer.feed_forward_chunk(out)


def first_token_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor | None:
    """The classifier's logits, its last layer computed for the first token only; ``None`` if the model
    is not one :func:`supports` covers. For inference: dropout is not applied."""
    if model.training or not supports(model):
        return None
    from transformers.masking_utils import create_bidirectional_mask  # noqa: PLC0415

    base = model.base_model
    hidden = base.embeddings(input_ids=input_ids)
    mask = create_bidirectional_mask(config=base.config, inputs_embeds=hidden, attention_mask=attention_mask)
    *lower, last = base.encoder.layer
    for layer in lower:
        out = layer(hidden, mask)
        hidden = out[0] if isinstance(out, tuple) else out
    first = first_row(last, hidden, mask)
    if HEADS[type(model).__name__] == "pooler":
        return model.classifier(base.pooler(first))
    return model.classifier(first)
