"""Active search for inputs on which a classifier and its quantized copy disagree.

A trigger-conditioned backdoor (Egashira et al. 2024 on a classifier, :mod:`tightrope.qattack.inject`) is
silent on ordinary probe texts: the full-precision and quantized models disagree only once the trigger
is in the text. The audit is not told the trigger, so it looks for one: a differential, gradient-guided
token search, HotFlip (Ebrahimi et al. 2018) for one token and GCG (Zou et al. 2023, "Universal and
Transferable Adversarial Attacks", Alg. 1) for two and three, run on the *difference* between the two
models.

- The quantized model's gradient comes from its differentiable twin: the same network with every
  quantized Linear weight replaced by its reference quantize-dequantize value
  (:func:`tightrope.defenses.fakequant.quantize_dequantize`, bit-exact with bitsandbytes' codes), so
  the gradient with respect to the input is exact for the weight quantization.
- One insertion of ``L`` tokens (1 to 3), right after the first special token, is shared by every
  search text ("universal", as a trigger is). For a target class ``c`` the objective is the mean, over
  search texts that full precision does not put in ``c``, of ``log p_q(c | x') - log p_fp(c | x')``:
  how much more the quantized model believes ``c`` than full precision does. It has a useful gradient
  even where the two models agree (unlike KL, which is flat at zero divergence). One token is searched
  towards every class in turn; longer insertions extend the best one, towards the class it moved most
  (the budget is sized for a shared CPU: about 1,000 short forward passes per quantizer with the defaults).
- Each step: the gradient of the objective with respect to the one-hot of every inserted token gives a
  first-order score for every vocabulary token at every slot; ``batch`` single-slot substitutions are
  drawn from the ``top_k`` of each slot, scored exactly through full precision and the twin, and the
  best kept (GCG). Length ``L + 1`` starts from the best insertion of length ``L``.
- The best insertions are then scored on *held-out* probe texts with the real quantized model (the
  library kernels of :mod:`tightrope.qattack.quantize`): mean ``KL(p_fp || p_q)`` with its standard error,
  the share of texts whose predicted class differs (flip rate), and the share each model puts in the
  target class.

The audit uses the largest held-out KL as a statistic; its null is the same search run on clean models
(:mod:`tightrope.qattack.calibration`), so "the search always finds something" is priced in.
"""

from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from tightrope.defenses.fakequant import QDQ, quantize_dequantize
from tightrope.encoding import collate, predict_logits
from tightrope.qattack.boxes import quantized_linears


class SearchConfig(BaseModel):
    """Budget of the trigger search (the shipped null was made with the defaults)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    lengths: tuple[int, ...] = (1, 2, 3)  # insertion lengths, each started from the best of the previous
    steps: int = Field(default=2, gt=0)  # GCG steps for the first length, once per target class
    longer_steps: int = Field(default=1, gt=0)  # GCG steps per longer length, towards the best class only
    top_k: int = Field(default=32, gt=0)  # candidate tokens per slot, by the gradient's first-order score
    batch: int = Field(default=16, gt=0)  # substitutions scored exactly per step
    n_search: int = Field(default=4, gt=0)  # probe texts the search optimises on, per target class
    n_eval: int = Field(default=32, gt=0)  # held-out probe texts the found insertions are scored on
    max_tokens: int = Field(default=24, ge=8)  # search texts are cut to this many tokens (speed)
    keep: int = Field(default=3, gt=0)  # best insertions reported per quantizer
    seed: int = 0

    def describe(self) -> dict:
        return self.model_dump()


@dataclass(frozen=True)
class Candidate:
    """One inserted token sequence, scored on held-out probe texts with the real quantized model."""

    text: str  # the insertion, decoded
    ids: list[int]
    target: int  # the class the search pushed the quantized model towards
    objective: float  # mean log p_q(target) - log p_fp(target) on the search texts (twin)
    kl: float  # mean KL(p_fp || p_q) on the held-out texts with the insertion
    kl_se: float  # its standard error (per-text standard deviation / sqrt(n))
    flip_rate: float  # share of held-out texts whose predicted class differs
    fp_target: float  # share of held-out texts full precision puts in the target class
    q_target: float  # ... and the quantized model
    clean_flip_rate: float  # flip rate on the same texts without the insertion


@dataclass(frozen=True)
class SearchResult:
    quantizer: str
    candidates: list[Candidate]  # best first (by held-out KL)
    n_eval: int
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def best(self) -> Candidate | None:
        return self.candidates[0] if self.candidates else None


def twin(model, quantizer: str):
    """The differentiable quantized twin: a copy whose quantized Linear weights hold their reference
    quantize-dequantize values (:data:`tightrope.defenses.fakequant.QDQ`)."""
    clone = copy.deepcopy(model).float().eval()
    with torch.no_grad():
        for name, module in quantized_linears(clone).items():
            module.weight.copy_(quantize_dequantize(module.weight, quantizer))
    return clone


def supports(quantizer: str) -> bool:
    return quantizer in QDQ


def insert(seq: list[int], ids: list[int], at: int = 1) -> list[int]:
    return [*seq[:at], *ids, *seq[at:]]


def allowed_tokens(tokenizer, vocab_size: int) -> torch.Tensor:
    """Token ids the search may insert: every vocabulary entry but special and unused (``[unused7]``) ones."""
    special = set(tokenizer.all_special_ids)
    vocab = tokenizer.convert_ids_to_tokens(list(range(vocab_size)))
    keep = [i for i, t in enumerate(vocab) if i not in special and t is not None
            and not (t.startswith("[") and t.endswith("]")) and not (t.startswith("<") and t.endswith(">"))]
    return torch.tensor(keep, dtype=torch.long)


def _log_probs(model, seqs: list[list[int]], pad: int) -> torch.Tensor:
    batch = collate(seqs, pad)
    return F.log_softmax(model(**batch).logits.float(), -1)


@torch.no_grad()
def _objectives(fp, q, texts: list[list[int]], cands: list[list[int]], target: int, pad: int,
                chunk: int = 256) -> torch.Tensor:
    """The search objective of every candidate insertion (exact forward passes)."""
    seqs = [insert(t, c) for c in cands for t in texts]
    out = []
    for s in range(0, len(seqs), chunk):
        part = seqs[s:s + chunk]
        out.append((_log_probs(q, part, pad)[:, target] - _log_probs(fp, part, pad)[:, target]))
    return torch.cat(out).view(len(cands), len(texts)).mean(1)


def _gradient(fp, q, texts: list[list[int]], cand: list[int], target: int, pad: int) -> torch.Tensor:
    """d objective / d one-hot of each inserted token, as (L, vocab) first-order scores."""
    emb = fp.get_input_embeddings().weight  # (V, H), shared by fp and the twin (embeddings are not quantized)
    onehot = torch.zeros(len(cand), emb.shape[0])
    onehot[torch.arange(len(cand)), torch.tensor(cand)] = 1.0
    onehot.requires_grad_(True)
    batch = collate([insert(t, cand) for t in texts], pad)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    inserted = (onehot @ emb)  # (L, H)
    base = fp.get_input_embeddings()(ids).detach()  # (B, T, H)
    embeds = torch.cat([base[:, :1], inserted.unsqueeze(0).expand(len(texts), -1, -1), base[:, 1 + len(cand):]], 1)
    obj = (F.log_softmax(q(inputs_embeds=embeds, attention_mask=mask).logits.float(), -1)[:, target]
           - F.log_softmax(fp(inputs_embeds=embeds, attention_mask=mask).logits.float(), -1)[:, target]).mean()
    (grad,) = torch.autograd.grad(obj, onehot)
    return grad  # (L, V): higher = better substitution


def _gcg(fp, q, texts, target, pad, allowed: torch.Tensor, config: SearchConfig, rng: random.Random,
         start: list[int], steps: int) -> tuple[list[int], float]:
    cur = list(start)
    cur_obj = _objectives(fp, q, texts, [cur], target, pad).item()
    mask = torch.full((fp.get_input_embeddings().weight.shape[0],), float("-inf"))
    mask[allowed] = 0.0
    for _ in range(steps):
        grad = _gradient(fp, q, texts, cur, target, pad) + mask  # (L, V)
        top = grad.topk(min(config.top_k, len(allowed)), dim=1).indices  # (L, k)
        cands, seen = [], {tuple(cur)}
        for _ in range(config.batch * 3):
            if len(cands) >= config.batch:
                break
            slot = rng.randrange(len(cur))
            new = list(cur)
            new[slot] = int(top[slot, rng.randrange(top.shape[1])])
            if tuple(new) not in seen:
                seen.add(tuple(new))
                cands.append(new)
        if not cands:
            break
        objs = _objectives(fp, q, texts, cands, target, pad)
        best = int(objs.argmax())
        if objs[best].item() > cur_obj:
            cur, cur_obj = cands[best], objs[best].item()
    return cur, cur_obj


def _score(fp, quantized, texts: list[list[int]], ids: list[int], pad: int, target: int, fp_clean, q_clean):
    seqs = [insert(t, ids) for t in texts]
    lp = F.log_softmax(predict_logits(fp, seqs, pad), -1)
    lq = F.log_softmax(predict_logits(quantized, seqs, pad), -1)
    per_text = (lp.exp() * (lp - lq)).sum(-1)  # KL(p_fp || p_q) per text
    n = len(texts)
    se = (per_text.std(unbiased=True) / n ** 0.5).item() if n > 1 else float("nan")
    pf, pq = lp.argmax(-1), lq.argmax(-1)
    return (per_text.mean().item(), se, (pf != pq).float().mean().item(), (pf == target).float().mean().item(),
            (pq == target).float().mean().item(), (fp_clean.argmax(-1) != q_clean.argmax(-1)).float().mean().item())


def search(model, quantized, quantizer: str, tokenizer, ids: list[list[int]], pad: int,
           config: SearchConfig = SearchConfig(), fp_logits: torch.Tensor | None = None,
           differentiable=None) -> SearchResult:
    """Search insertions that make ``quantized`` (the real library copy of ``model``) diverge from ``model``.

    ``ids`` are the encoded probe texts (special tokens included); the first ``n_eval`` are held out for
    scoring, the rest feed the search. ``differentiable``: the copy the gradients go through (default: the
    quantizer's :func:`twin`; a pruning passes its pruned copy, which is differentiable as it is). Returns the
    ``keep`` best insertions by held-out KL.
    """
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    fp = model.float().eval()
    q = differentiable if differentiable is not None else twin(model, quantizer)
    for p in [*fp.parameters(), *q.parameters()]:
        p.requires_grad_(False)
    evaluation, pool = ids[:config.n_eval], ids[config.n_eval:]
    notes = []
    if not pool:
        pool = evaluation
        notes.append("The probe set is smaller than the held-out share, so the search used the scoring texts too.")
    fp_pool = fp_logits[config.n_eval:] if fp_logits is not None and len(fp_logits) == len(ids) and pool is not evaluation \
        else predict_logits(fp, pool, pad)
    num_labels = fp_pool.shape[1]
    allowed = allowed_tokens(tokenizer, fp.get_input_embeddings().weight.shape[0])
    found: list[tuple[list[int], int, float]] = []
    was_training = torch.is_grad_enabled()
    with torch.enable_grad():
        runs = {}  # target class -> (search texts, best insertion so far)
        for target in range(num_labels):  # one token towards every class ...
            pick = [i for i in range(len(pool)) if int(fp_pool[i].argmax()) != target][: config.n_search]
            if not pick:
                continue
            texts = [pool[i][: config.max_tokens - 1] + pool[i][-1:] if len(pool[i]) > config.max_tokens else pool[i]
                     for i in pick]
            start = [tokenizer.mask_token_id if tokenizer.mask_token_id is not None else int(allowed[0])] * config.lengths[0]
            cur, obj = _gcg(fp, q, texts, target, pad, allowed, config, rng, start, config.steps)
            found.append((list(cur), target, obj))
            runs[target] = (texts, cur, obj)
        if runs:  # ... then longer insertions towards the class the first round moved most
            target = max(runs, key=lambda t: runs[t][2])
            texts, cur, _ = runs[target]
            for length in config.lengths[1:]:
                start = [*cur, *([tokenizer.mask_token_id or int(allowed[0])] * (length - len(cur)))]
                cur, obj = _gcg(fp, q, texts, target, pad, allowed, config, rng, start, config.longer_steps)
                found.append((list(cur), target, obj))
    torch.set_grad_enabled(was_training)
    fp_clean = predict_logits(fp, evaluation, pad)
    q_clean = predict_logits(quantized, evaluation, pad)
    scored = []
    for cand, target, obj in sorted(found, key=lambda f: -f[2]):
        kl, se, flip, fpt, qt, clean_flip = _score(fp, quantized, evaluation, cand, pad, target, fp_clean, q_clean)
        scored.append(Candidate(tokenizer.decode(cand), cand, target, obj, kl, se, flip, fpt, qt, clean_flip))
    scored.sort(key=lambda c: -c.kl)
    return SearchResult(quantizer, scored[: config.keep], len(evaluation), time.perf_counter() - started, notes)
