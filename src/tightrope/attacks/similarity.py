"""Sentence encoder for the sentence-similarity constraint.

TextFooler uses the Universal Sentence Encoder (Cer et al. 2018), a TensorFlow Hub download that is not
available offline. The stated substitute: all-MiniLM-L6-v2 (the ``minilm`` alias, Reimers & Gurevych's
sentence-transformers model) with mean pooling over tokens and unit-norm output, which is how that model
was trained to embed sentences. It is independent of the victim (the base encoder, not a fine-tuned
classifier). Its similarity scale differs from USE's, so a threshold tuned for USE is a nominal match.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from tightrope import models


class SentenceEncoder:
    def __init__(self, model: str = "minilm", max_length: int = 128, batch_size: int = 64):
        from transformers import AutoModel, AutoTokenizer  # noqa: PLC0415


        path = models.resolve(model)
        self.name = f"{model} (mean pooling)"
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path, use_safetensors=True).eval()
        self.max_length, self.batch_size = max_length, batch_size
        self.cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    @torch.inference_mode()
    def _embed(self, texts: list[str]) -> torch.Tensor:
        out = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[start:start + self.batch_size], padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt")
            hidden = self.model(**batch).last_hidden_state  # (B, T, H)
            mask = batch["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
            out.append(torch.nn.functional.normalize(pooled, dim=-1))
        return torch.cat(out)

    def encode(self, texts: list[str]) -> torch.Tensor:
        """Unit-norm embeddings (N, H); texts seen before come from a cache."""
        rows = {t: self.cache.get(t) for t in texts}  # read once: another attack stream may evict meanwhile
        todo = [t for t, row in rows.items() if row is None]
        if todo:
            for text, row in zip(todo, self._embed(todo)):
                rows[text] = self.cache[text] = row
            while len(self.cache) > 50_000:
                try:
                    self.cache.popitem(last=False)
                except KeyError:  # emptied by another stream at the same moment
                    break
        return torch.stack([rows[t] for t in texts])
