"""Discrete adversarial training with a cheap word-level attack generated on the fly (A2T).

Yoo and Qi (2021), "Towards Improving Adversarial Training of NLP Models" (Findings of EMNLP 2021):
at every training step, a share of the batch is attacked by a *cheap* attack against the current
model, and the model trains on the clean and the adversarial texts, min_theta E[L(x, y) + alpha
L(x_adv, y)] (their Eq. 1; alpha = 1 is our ``mix = 0.5`` up to a factor 2). The attack (TextAttack's
``A2TYoo2021`` recipe, made cheaper here):

1. word importance from the gradient of the loss with respect to the student's input embeddings
   (one backward pass for all attacked examples): the L1 norm of the mean gradient over a word's
   tokens (TextAttack's ``wir_method="gradient"``); words past the truncation window score nothing;
2. greedy swaps, most important word first, with the nearest counter-fitted neighbours
   (Mrkšić et al. 2016; ``max_candidates`` = 20 as in A2T) whose cosine is at least ``min_cos``;
   stopwords are never changed; at most ``max(ceil(max_share * words), min_words)`` words change
   (A2T's MaxModificationRate(0.1, min_threshold=4)); a swap is kept when it lowers the true
   label's probability, and the search stops when the label flips or ``query_budget`` candidate
   texts have been scored;
3. the candidates of *all* attacked examples at one greedy step are scored in one batched forward
   pass (no gradients, eval mode), so a step costs one importance pass plus at most
   ``min(budget / candidates, words cap)`` scoring passes.

Two additions to the recipe, both off by default:

- ``wordnet=True`` also tries PWWS's candidates (every WordNet synonym of the word, single words),
  after the counter-fitted neighbours: the attacks that win on sentiment data swap WordNet synonyms
  of other senses ("sharp" -> "precipitous"), which no counter-fitted neighbour set contains.
- ``input_transform`` (a :class:`tightrope.transforms.SynonymEncoding`) is a rewrite of every input
  that the model applies before tokenization (the ``canonical`` defense's): the attack then runs on
  the rewritten text and every candidate is rewritten before it is scored, so the model is trained
  against the swaps that survive its own transform, as an adaptive attacker would pick them. The
  transform rides along as ``input_transform`` and is saved with the model.

Left out of A2T's recipe to keep it cheap: the part-of-speech and sentence-encoder constraints
(A2T's DistilBERT-STS threshold 0.9). A2T uses cosine >= 0.8 on the 300d counter-fitted vectors;
the default here is TextFooler's 0.5 on the 50d vectors tightrope builds (``min_cos`` to change it).

Adversarial texts are re-tokenised with the student's tokenizer at the training run's max length
and truncation (``max_length=None``: the batch's width, which equals the max length whenever a text
of the batch was truncated). With a distillation criterion the teacher reads the adversarial texts
through its own tokenizer: discrete adversarial texts go to both models. An example the model
already misclassifies is not attacked (its "adversarial" copy is the clean text); an attack that
does not flip the label within its budget still contributes its most damaging text.

``cache=PATH`` is the budget version (:mod:`tightrope.defenses.a2t_cache`): every training text is
attacked once, against the model at the start of training (:meth:`A2TTraining.before_training`, which
:func:`tightrope.train.train` calls), the results are kept in ``PATH``, and each batch's attacked share
reads its adversarial texts from there at every epoch, in this run and in later ones (a second seed,
a pruned variant's recovery with ``cache_reuse="base"``).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from tightrope import models
from tightrope.attacks.embedding import logits_from_embeddings, word_embeddings
from tightrope.attacks.recipes import default_embedding
from tightrope.attacks.resources import TEXTFOOLER_STOPWORDS
from tightrope.attacks.text import AttackedText, word_tokens
from tightrope.attacks.words import recover_case, wordnet_synonyms
from tightrope.defenses import a2t_cache
from tightrope.defenses.adversarial import _check_mix, cross_entropy
from tightrope.encoding import Truncation, collate, encode, encode_with_offsets
from tightrope.errors import TightropeError


@dataclass(frozen=True)
class A2TExample:
    """One attacked training text."""

    text: str
    adversarial: str
    label: int
    changed: tuple[int, ...]  # word indices (AttackedText.words) that were swapped
    words: int  # words in the text
    max_changes: int  # the cap on swapped words for this text
    queries: int  # candidate texts scored
    flipped: bool  # the model's prediction left the true label
    skipped: bool  # already misclassified, not attacked
    p_clean: float  # probability of the true label, before and after
    p_adversarial: float

    def to_dict(self) -> dict:
        return asdict(self)


class A2TTraining:
    """A2T adversarial training (Yoo and Qi 2021): an objective ``(model, batch) -> loss``.

    ``tokenizer`` is the student's (a tokenizer, or a model name / directory to load it from);
    ``embedding`` a :class:`tightrope.attacks.counterfit.WordEmbedding` (default: the counter-fitted
    GloVe vectors, built once and cached). ``adv_share`` of each batch is attacked;
    loss = (1 - mix) * L(clean batch) + mix * L(adversarial texts). ``criterion`` is
    ``(logits, batch) -> loss`` (cross-entropy, or :class:`tightrope.defenses.distill.Distillation`).
    After each call, ``last`` holds the :class:`A2TExample` of every attacked text and ``stats``
    running totals. ``cache`` (a folder) makes the attack's texts once, at the start of training, and
    reads them back afterwards; ``cache_reuse="base"`` accepts a cache built against another model of
    the same base (a compressed variant), ``cache_rebuild`` replaces a cache built for anything else
    (:mod:`tightrope.defenses.a2t_cache`).
    """

    name = "a2t"
    cache_block = 32  # distinct texts attacked, and written to the cache, at a time

    def __init__(self, tokenizer, embedding=None, *, adv_share: float = 0.5, mix: float = 0.5,
                 max_candidates: int = 20, min_cos: float = 0.5, max_share: float = 0.1, min_words: int = 4,
                 query_budget: int = 100, max_length: int | None = None, truncation: Truncation = "head",
                 stopwords: frozenset[str] | None = None, criterion=None, score_batch_size: int = 64,
                 wordnet: bool = False, input_transform=None, cache: str | Path | None = None,
                 cache_reuse: a2t_cache.Reuse = "model", cache_rebuild: bool = False):

        if not 0.0 < adv_share <= 1.0:
            raise TightropeError(f"adv_share, the share of each batch that is attacked, must lie in (0, 1], got {adv_share}.")
        _check_mix(mix)
        if int(max_candidates) < 1:
            raise TightropeError(f"max_candidates must be at least 1, got {max_candidates}.")
        if not -1.0 <= min_cos <= 1.0:
            raise TightropeError(f"min_cos is a cosine similarity and must lie in [-1, 1], got {min_cos}.")
        if not 0.0 < max_share <= 1.0:
            raise TightropeError(f"max_share, the share of words an attack may change, must lie in (0, 1], got {max_share}.")
        if int(min_words) < 0:
            raise TightropeError(f"min_words must be zero or positive, got {min_words}.")
        if int(query_budget) < 1:
            raise TightropeError(f"query_budget must be at least 1 candidate text, got {query_budget}.")
        if max_length is not None and max_length < 8:
            raise TightropeError(f"max_length must be at least 8, got {max_length}.")
        if truncation not in ("head", "head+tail"):
            raise TightropeError(f"Unknown truncation '{truncation}'; use head or head+tail.")
        if cache_reuse not in a2t_cache.REUSE:
            raise TightropeError(f"cache_reuse must be one of {', '.join(a2t_cache.REUSE)}, not '{cache_reuse}'.")
        if isinstance(tokenizer, str):

            tokenizer = models.load_tokenizer(models.resolve(tokenizer), tokenizer)
        if tokenizer is None:
            raise TightropeError("A2T re-tokenises adversarial texts, so it needs the student's tokenizer.")
        self.tokenizer = tokenizer
        self._embedding = embedding
        self.adv_share, self.mix = float(adv_share), float(mix)
        self.max_candidates, self.min_cos = int(max_candidates), float(min_cos)
        self.max_share, self.min_words, self.query_budget = float(max_share), int(min_words), int(query_budget)
        self.max_length, self.truncation = max_length, truncation
        self.stopwords = frozenset(w.lower() for w in (TEXTFOOLER_STOPWORDS if stopwords is None else stopwords))
        self.criterion = criterion or cross_entropy
        self.score_batch_size = int(score_batch_size)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.wordnet = bool(wordnet)
        self.input_transform = input_transform
        self.cache = Path(cache) if cache is not None else None
        self.cache_reuse, self.cache_rebuild = cache_reuse, bool(cache_rebuild)
        self._cached: dict[str, dict] | None = None  # the cache's examples by key, once before_training ran
        self._cache_meta: dict | None = None
        self._synonyms: dict[str, list[str]] = {}
        self.last: list[A2TExample] = []
        self.stats = {"attacked": 0, "skipped": 0, "flipped": 0, "words_changed": 0, "queries": 0}

    @property
    def embedding(self):
        if self._embedding is None:

            self._embedding = default_embedding()
        return self._embedding

    # --- the attack ----------------------------------------------------------------------------------

    def max_changes(self, n_words: int) -> int:
        """A2T's MaxModificationRate: max(ceil(max_share * words), min_words), at most every word."""
        return min(n_words, max(math.ceil(self.max_share * n_words), self.min_words))

    def synonyms(self, word: str) -> list[str]:
        """Counter-fitted neighbours of ``word`` (cosine >= min_cos), alphabetic, in ``word``'s case."""
        key = word.lower()
        if key not in self._synonyms:
            self._fill_synonyms([key])
        return [recover_case(word, s) for s in self._synonyms[key]]

    def _fill_synonyms(self, words: list[str]) -> None:
        todo = [w for w in dict.fromkeys(words) if w not in self._synonyms]
        if not todo:
            return
        for word, near in zip(todo, self.embedding.neighbours(todo, self.max_candidates, self.min_cos)):
            found = [s for s, _ in near if s.isalpha() and s.lower() != word]
            if self.wordnet:
                found += [s for s in wordnet_synonyms(word) if s.isalpha() and s != word and s not in found]
            self._synonyms[word] = found
        if len(self._synonyms) > 200_000:
            self._synonyms = {w: self._synonyms[w] for w in todo}

    def _ids(self, texts: list[str], width: int) -> list[list[int]]:
        if self.input_transform is not None:
            texts = self.input_transform(list(texts))
        return encode(self.tokenizer, texts, self.max_length or width, self.truncation)

    @torch.no_grad()
    def _true_probs(self, model, texts: list[str], labels: list[int], width: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(probability of the true label, predicted label) for each text, in batches of score_batch_size."""
        ids = self._ids(texts, width)
        probs, preds = [], []
        for start in range(0, len(ids), self.score_batch_size):
            chunk = collate(ids[start:start + self.score_batch_size], self.pad_id)
            logits = model(input_ids=chunk["input_ids"].to(device), attention_mask=chunk["attention_mask"].to(device)).logits
            p = logits.float().softmax(-1).cpu()  # (n, K)
            y = torch.tensor(labels[start:start + self.score_batch_size])
            probs.append(p[torch.arange(len(y)), y])
            preds.append(p.argmax(-1))
        return torch.cat(probs), torch.cat(preds)

    def perturb(self, model, texts: list[str], labels: list[int], width: int | None = None) -> list[A2TExample]:
        """Attack ``texts`` against ``model`` (run in eval mode, restored afterwards); one result each."""
        if not texts:
            return []
        width = width or self.max_length or 512
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            return self._perturb(model, list(texts), [int(y) for y in labels], width, device)
        finally:
            model.train(was_training)

    def _perturb(self, model, texts, labels, width, device) -> list[A2TExample]:
        if self.input_transform is not None:  # attack what the model reads; candidates are rewritten in _ids
            texts = self.input_transform(list(texts))
        originals = [AttackedText.from_text(t) for t in texts]
        ids, spans = encode_with_offsets(self.tokenizer, texts, self.max_length or width, self.truncation)
        batch = collate(ids, self.pad_id)
        input_ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        y = torch.tensor(labels, device=device)
        with torch.enable_grad():  # one backward pass: the loss gradient at every input embedding
            embeds = word_embeddings(model)(input_ids).detach().requires_grad_(True)  # (n, T, C)
            logits = logits_from_embeddings(model, embeds, mask)
            (grad,) = torch.autograd.grad(F.cross_entropy(logits.float(), y, reduction="sum"), embeds)
        probs = logits.detach().float().softmax(-1).cpu()  # (n, K)
        grad = grad.detach().float().cpu()

        self._fill_synonyms([w.lower() for t in originals for w in t.words if w.lower() not in self.stopwords])
        states = []
        for i, text in enumerate(originals):
            p0, pred = float(probs[i, labels[i]]), int(probs[i].argmax())
            tokens = word_tokens(text, spans[i])
            scores = {w: float(grad[i, toks].mean(0).abs().sum()) for w, toks in tokens.items()
                      if text.words[w].lower() not in self.stopwords and self._synonyms.get(text.words[w].lower())}
            order = sorted(scores, key=lambda w: (-scores[w], w))
            states.append({"current": text, "p": p0, "p0": p0, "order": order, "next": 0, "queries": 0,
                           "cap": self.max_changes(len(text)), "flipped": False, "skipped": pred != labels[i],
                           "done": pred != labels[i] or not order})
        while True:
            requests = []  # (state index, candidate texts)
            for i, st in enumerate(states):
                if st["done"]:
                    continue
                if st["next"] >= len(st["order"]) or len(st["current"].modified) >= st["cap"] \
                        or st["queries"] >= self.query_budget:
                    st["done"] = True
                    continue
                pos = st["order"][st["next"]]
                st["next"] += 1
                word = st["current"].words[pos]
                options = self.synonyms(word)[: self.query_budget - st["queries"]]
                requests.append((i, [st["current"].replace(pos, c) for c in options]))
            if not requests:
                break
            flat = [c.text for _, cands in requests for c in cands]
            flat_labels = [labels[i] for i, cands in requests for _ in cands]
            p_true, pred = self._true_probs(model, flat, flat_labels, width, device)  # one batched scoring pass
            start = 0
            for i, cands in requests:
                st = states[i]
                p, pr = p_true[start:start + len(cands)], pred[start:start + len(cands)]
                start += len(cands)
                st["queries"] += len(cands)
                best = int(p.argmin())
                if float(p[best]) < st["p"]:
                    st["current"], st["p"] = cands[best], float(p[best])
                    if int(pr[best]) != labels[i]:
                        st["flipped"], st["done"] = True, True
        out = []
        for text, label, st, original in zip(texts, labels, states, originals):
            changed = tuple(sorted(original.diff(st["current"])))
            out.append(A2TExample(text=text, adversarial=st["current"].text if changed else text, label=label,
                                  changed=changed, words=len(original), max_changes=st["cap"], queries=st["queries"],
                                  flipped=st["flipped"], skipped=st["skipped"], p_clean=st["p0"], p_adversarial=st["p"]))
        return out

    # --- the cache -----------------------------------------------------------------------------------

    def attack_settings(self) -> dict:
        """Everything that decides the attack's texts but the model, the tokenization and the data."""
        embedding = self.embedding.description
        return {"recipe": "a2t", "max_candidates": self.max_candidates, "min_cos": self.min_cos,
                "max_share": self.max_share, "min_words": self.min_words, "query_budget": self.query_budget,
                "stopwords": hashlib.sha256("\n".join(sorted(self.stopwords)).encode()).hexdigest()[:16],
                "candidates": {"embedding": embedding.get("source"), "embedding_key": embedding.get("key"),
                               "wordnet": self.wordnet},
                "input_transform": self.input_transform.card_entry() if self.input_transform is not None else None}

    def before_training(self, model, data, config, *, start: str | None = None, progress=False) -> dict | None:
        """With a cache: attack every text of ``data`` (a TaskData) the cache lacks against ``model`` as it
        is now, and hold the cache's texts for the training steps. ``config`` is the run's TrainConfig
        (its max length, truncation and seed); ``start`` names the model's directory (its base)."""
        if self.cache is None:
            return None
        self.max_length = self.max_length or config.max_length
        wanted = a2t_cache.built_for(model, self.tokenizer, start=start, max_length=self.max_length,
                                     truncation=self.truncation, attack=self.attack_settings(), data=data,
                                     seed=config.seed)
        examples = a2t_cache.distinct(list(data.texts), list(data.labels))
        meta = a2t_cache.open_cache(self.cache, wanted, examples, reuse=self.cache_reuse, rebuild=self.cache_rebuild)
        attack = lambda texts, labels: [r.to_dict() for r in self.perturb(model, texts, labels)]  # noqa: E731
        self._cached = a2t_cache.fill(self.cache, meta, attack, examples, data=wanted["data"],
                                      seed=meta["built_for"]["seed"], block=self.cache_block, progress=progress)
        self._cache_meta = {"path": str(self.cache), "reuse": self.cache_reuse,
                            "built_against": meta["built_for"]["model"], "trains": wanted["model"],
                            "examples": len(self._cached), "data": wanted["data"]}
        return {"a2t_cache": self._cache_meta}

    def from_cache(self, texts: list[str], labels: list[int]) -> list[A2TExample]:
        """The cached attack results of ``texts`` (raw training texts) with their labels."""
        if self._cached is None:
            raise TightropeError(f"The A2T cache {self.cache} is read at the start of training "
                                 "(before_training, which tightrope's train() calls); this loop did not call it.")
        out = []
        for text, label in zip(texts, labels):
            row = self._cached.get(a2t_cache.example_key(text, label))
            if row is None:
                raise TightropeError(f"The A2T cache {self.cache} has no entry for a training text of this batch; "
                                     "pass --a2t-cache-rebuild.")
            fields = {k: v for k, v in row.items() if k != "key"}
            out.append(A2TExample(**{**fields, "changed": tuple(fields["changed"])}))
        return out

    # --- the training objective --------------------------------------------------------------------

    def __call__(self, model, batch: dict) -> torch.Tensor:
        if "texts" not in batch:
            raise TightropeError("A2T attacks the raw texts of each batch (a 'texts' key), which this training "
                                 "loop does not provide.")
        n = len(batch["texts"])
        k = min(n, max(1, math.ceil(self.adv_share * n)))
        chosen = torch.randperm(n)[:k].sort().values.tolist()  # the global generator: seeded per step by train()
        width = int(batch["input_ids"].shape[1])
        labels = batch["labels"]
        texts, ys = [batch["texts"][i] for i in chosen], [int(labels[i]) for i in chosen]
        results = self.from_cache(texts, ys) if self.cache is not None else self.perturb(model, texts, ys, width)
        self.last = results
        for r in results:
            self.stats["attacked"] += 1
            self.stats["skipped"] += r.skipped
            self.stats["flipped"] += r.flipped
            self.stats["words_changed"] += len(r.changed)
            self.stats["queries"] += r.queries
        adv_texts = [r.adversarial for r in results]
        adv = collate(self._ids(adv_texts, width), self.pad_id)
        device = batch["input_ids"].device
        adv_batch = {"input_ids": adv["input_ids"].to(device), "attention_mask": adv["attention_mask"].to(device),
                     "labels": labels[chosen], "texts": adv_texts}
        if self.mix == 1.0:
            logits = model(input_ids=adv_batch["input_ids"], attention_mask=adv_batch["attention_mask"]).logits
            return self.criterion(logits, adv_batch)
        # Clean and adversarial examples in one forward pass, padded to a common width.
        w = max(width, adv_batch["input_ids"].shape[1])
        pad = lambda t, v: F.pad(t, (0, w - t.shape[1]), value=v)  # noqa: E731
        ids = torch.cat([pad(batch["input_ids"], self.pad_id), pad(adv_batch["input_ids"], self.pad_id)])
        att = torch.cat([pad(batch["attention_mask"], 0), pad(adv_batch["attention_mask"], 0)])
        logits = model(input_ids=ids, attention_mask=att).logits
        return ((1.0 - self.mix) * self.criterion(logits[:n], batch)
                + self.mix * self.criterion(logits[n:], adv_batch))

    def describe(self) -> dict:
        return {"defense": self.name, "adv_share": self.adv_share, "mix": self.mix,
                "max_candidates": self.max_candidates, "min_cos": self.min_cos, "max_share": self.max_share,
                "min_words": self.min_words, "query_budget": self.query_budget, "max_length": self.max_length,
                "truncation": self.truncation, "stopwords": len(self.stopwords), "wordnet": self.wordnet,
                **({"input_transform": self.input_transform.card_entry()} if self.input_transform is not None else {}),
                "embedding": (self._embedding.description.get("source") if self._embedding is not None
                              else "counter-fitted GloVe 6B 50d (Mrkšić et al. 2016)"),
                "criterion": getattr(self.criterion, "__name__", type(self.criterion).__name__),
                **({"cache": self._cache_meta or {"path": str(self.cache), "reuse": self.cache_reuse}}
                   if self.cache is not None else {})}


__all__ = ["A2TExample", "A2TTraining", "encode_with_offsets", "word_tokens"]
