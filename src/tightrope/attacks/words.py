"""Word-level transformations: synonym swaps from counter-fitted embeddings (TextFooler), from WordNet
(PWWS), and gradient-guided token swaps (HotFlip). Each returns, for one word index, the new words
to try there; the search scores all of them in one batched forward pass.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from tightrope.attacks.resources import wordnet
from tightrope.attacks.text import AttackedText, Part, word_tokens
from tightrope.encoding import encode_with_offsets
from tightrope.errors import TightropeError
from tightrope.transforms import recover_case


class Transformation(Part):
    name = "transformation"

    def prepare(self, text: AttackedText, indices: list[int], *, label: int | None = None) -> None:
        """Optional batched work for many indices of one text before ``candidates`` is called for each.
        ``label`` is the example's true label, for transformations guided by the loss (the search passes it;
        a transformation keeps no per-example state)."""

    def candidates(self, text: AttackedText, index: int, rng, *, label: int | None = None) -> list[str]:
        raise NotImplementedError


class WordSwapEmbedding(Transformation):
    """The ``max_candidates`` nearest words by cosine in a counter-fitted embedding (Jin et al. 2020: N = 50)."""

    name = "word_swap_embedding"

    def __init__(self, embedding, max_candidates: int = 50):
        self.embedding, self.max_candidates = embedding, max_candidates
        self._memo: dict[str, list[str]] = {}

    def params(self):
        return {"max_candidates": self.max_candidates, "embedding": self.embedding.description.get("source")}

    def prepare(self, text, indices, *, label=None):
        todo = list(dict.fromkeys(text.words[i].lower() for i in indices) - self._memo.keys())
        if todo:  # one matrix product for all the words of the text
            for word, near in zip(todo, self.embedding.neighbours(todo, self.max_candidates)):
                self._memo[word] = [w for w, _ in near]
            if len(self._memo) > 200_000:
                self._memo.clear()

    def candidates(self, text, index, rng, *, label=None):
        word = text.words[index]
        near = self._memo.get(word.lower())  # read once: another attack stream may clear the memo meanwhile
        if near is None:
            near = [w for w, _ in self.embedding.neighbours([word.lower()], self.max_candidates)[0]]
            self._memo[word.lower()] = near
        return [recover_case(word, w) for w in near]


@lru_cache(maxsize=100_000)
def wordnet_synonyms(word: str) -> tuple[str, ...]:
    """Single-word WordNet lemmas sharing a synset with ``word`` (any part of speech), in WordNet order."""

    out: dict[str, None] = {}
    for synset in wordnet().synsets(word.lower()):
        for lemma in synset.lemmas():
            name = lemma.name()
            if "_" not in name and name.isalpha() and name.lower() != word.lower():
                out[name.lower()] = None
    return tuple(out)


class WordSwapWordNet(Transformation):
    """WordNet synonyms (Ren et al. 2019, Sec. 3.1: the synonym set L_i of each word)."""

    name = "word_swap_wordnet"

    def params(self):
        return {"source": "WordNet 3.0 synsets, single words"}

    def candidates(self, text, index, rng, *, label=None):
        word = text.words[index]
        return [recover_case(word, w) for w in wordnet_synonyms(word)]


class WordSwapGradient(Transformation):
    """HotFlip-style swaps (Ebrahimi et al. 2018, Eq. 2): the first-order change of the loss when token
    ``x_i`` becomes ``v`` is ``(e_v - e_{x_i}) . grad_{e_{x_i}} L``; the ``top_n`` best whole-word tokens
    of the vocabulary are the candidates. Works on words that are one token of the victim's tokenizer.

    The gradient comes from ``twin`` (a ``TextClassifier`` with a differentiable torch model): the victim
    itself when it has gradients, else a differentiable twin of it; queries always go to the victim.
    """

    name = "word_swap_gradient"

    def __init__(self, twin, top_n: int = 1):
        self.twin, self.top_n = twin, top_n
        self._grads: dict[tuple[str, int], dict[int, list[str]]] = {}  # (text, label) -> word -> candidates
        embeddings = twin.model.get_input_embeddings().weight.detach()
        vocab = twin.tokenizer.convert_ids_to_tokens(list(range(embeddings.shape[0])))
        self.allowed = torch.tensor([t.isalpha() and t.isascii() and len(t) > 1 for t in vocab])
        self.vocab = vocab

    def params(self):
        return {"top_n": self.top_n, "gradient_source": self.twin.source or "victim"}

    def _token_positions(self, text: AttackedText) -> tuple[list[int], dict[int, int]]:
        """Input ids of the text exactly as the twin encodes it (its max length and truncation, head+tail
        included) and, for each word that is one token of them, its token position."""
        (ids,), (spans,) = encode_with_offsets(self.twin.tokenizer, [text.text], self.twin.max_length,
                                               getattr(self.twin, "truncation", "head"))
        by_word = word_tokens(text, spans)
        return ids, {w: toks[0] for w, toks in by_word.items() if len(toks) == 1}

    def prepare(self, text, indices, *, label=None):
        if label is None:
            raise TightropeError("Gradient-guided swaps need the example's label; the search passes it.")
        key = (text.text, label)
        known = self._grads.get(key, {})
        missing = [i for i in indices if i not in known]
        if not missing:
            return
        self._grads[key] = {**known, **self._gradient_candidates(text, missing, label)}
        while len(self._grads) > 8:  # only the texts in progress are needed again: one per attack stream
            try:
                del self._grads[next(iter(self._grads))]
            except (KeyError, StopIteration, RuntimeError):  # another stream changed it meanwhile
                break

    def _gradient_candidates(self, text, indices, label) -> dict[int, list[str]]:
        """The ``top_n`` swaps of every word of ``indices`` ([] for a word that is not one token)."""
        ids, single = self._token_positions(text)
        model = self.twin.model
        emb_layer = model.get_input_embeddings()
        input_ids = torch.tensor([ids])
        with torch.enable_grad():
            embeds = emb_layer(input_ids).detach().requires_grad_(True)  # (1, T, H)
            logits = model(inputs_embeds=embeds, attention_mask=torch.ones_like(input_ids)).logits
            loss = torch.nn.functional.cross_entropy(logits.float(), torch.tensor([label]))
            (grad,) = torch.autograd.grad(loss, embeds)
        table = emb_layer.weight.detach()  # (V, H)
        out: dict[int, list[str]] = {i: [] for i in indices}
        wanted = [i for i in indices if i in single]
        if wanted:
            pos = torch.tensor([single[i] for i in wanted])
            g = grad[0, pos]  # (W, H)
            gain = g @ table.T - (embeds[0, pos].detach() * g).sum(-1, keepdim=True)  # (W, V): (e_v - e_x) . g
            gain[:, ~self.allowed] = -torch.inf
            gain[torch.arange(len(wanted)), input_ids[0, pos]] = -torch.inf
            top = gain.topk(self.top_n, dim=1).indices
            for i, row in zip(wanted, top.tolist()):
                out[i] = [recover_case(text.words[i], self.vocab[v]) for v in row]
        return out

    def candidates(self, text, index, rng, *, label=None):
        found = self._grads.get((text.text, label))
        if found is None or index not in found:  # not prepared, or evicted by another stream: compute it now
            if label is None:
                raise TightropeError("Gradient-guided swaps need the example's label; the search passes it.")
            found = self._gradient_candidates(text, [index], label)
        return found[index]
