"""Tokenize texts once and batch them with dynamic padding.

Truncation strategies (Sun et al. 2019, "How to Fine-Tune BERT for Text Classification", Sec. 5.3):
``head`` keeps the first tokens; ``head+tail`` keeps the first quarter and the last three quarters
of the budget, which they found best for long IMDB reviews.
"""

from __future__ import annotations

from typing import Literal

import torch

Truncation = Literal["head", "head+tail"]


def special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The ids a tokenizer puts before and after a single sequence (e.g. [CLS] ... [SEP]).

    Found by tokenizing one word with and without special tokens, because transformers 5 removed
    ``build_inputs_with_special_tokens`` from fast tokenizers.
    """
    bare = tokenizer("hello", add_special_tokens=False)["input_ids"]
    full = tokenizer("hello")["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return full[:start], full[start + len(bare) :]
    return [], []


def wrap(tokenizer, body: list[int]) -> list[int]:
    prefix, suffix = special_tokens(tokenizer)
    return prefix + body + suffix


def encode(tokenizer, texts: list[str], max_length: int, truncation: Truncation = "head") -> list[list[int]]:
    """Token ids for each text, special tokens included, at most ``max_length`` long."""
    if max_length < 8:
        raise ValueError(f"max_length must be at least 8, got {max_length}")
    if truncation == "head":
        return tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    prefix, suffix = special_tokens(tokenizer)
    budget = max_length - len(prefix) - len(suffix)
    head = budget // 4
    out = []
    for ids in tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]:  # truncated below
        if len(ids) > budget:
            ids = ids[:head] + ids[len(ids) - (budget - head):]
        out.append(prefix + ids + suffix)
    return out


def encode_with_offsets(tokenizer, texts: list[str], max_length: int, truncation: Truncation = "head"):
    """Token ids exactly as :func:`tightrope.encoding.encode` gives them, plus each token's character
    span in its text (``None`` for special tokens), so that tokens can be traced back to words."""
    prefix, suffix = special_tokens(tokenizer)
    budget = max_length - len(prefix) - len(suffix)
    enc = tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    all_ids, all_spans = [], []
    for ids, offsets in zip(enc["input_ids"], enc["offset_mapping"]):
        keep = list(range(len(ids)))
        if len(ids) > budget:
            head = budget if truncation == "head" else budget // 4
            keep = keep[:head] + (keep[len(ids) - (budget - head):] if budget > head else [])
        all_ids.append(prefix + [ids[k] for k in keep] + suffix)
        all_spans.append([None] * len(prefix) + [tuple(offsets[k]) for k in keep] + [None] * len(suffix))
    return all_ids, all_spans


def collate(sequences: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch of id lists to its longest member."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def length_sorted_batches(sequences: list[list[int]], batch_size: int) -> list[list[int]]:
    """Index batches grouped by length (for inference: less padding, same results)."""
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


@torch.inference_mode()
def predict_logits(model, sequences: list[list[int]], pad_id: int, batch_size: int = 64, progress=None) -> torch.Tensor:
    """Logits for every sequence, in input order, computed in length-sorted batches."""
    device = next(model.parameters()).device
    out = torch.empty((len(sequences), model.config.num_labels), dtype=torch.float32)
    for batch in length_sorted_batches(sequences, batch_size):
        inputs = {k: v.to(device) for k, v in collate([sequences[i] for i in batch], pad_id).items()}
        out[batch] = model(**inputs).logits.float().cpu()
        if progress is not None:
            progress(len(batch))
    return out
