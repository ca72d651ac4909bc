"""Pruning as the condition of an attack: the masks tightrope's own pruners apply, and their boxes.

"Fewer Weights, More Problems" (ICLR 2026) carries the quantization attack of Egashira et al. 2024
(arXiv 2405.18137) over to pruning: inject the malicious behaviour, find the weights the user's pruner
will remove, and repair the benign behaviour with *those weights only*, so that pruning removes the
repair and leaves the injected behaviour. The repair must not change which weights are removed.

A pruner here keeps weight ``w_ij`` of a Linear layer when its score ``s_ij = |w_ij| a_j`` is among the
largest of its comparison group ``G``, with

- ``prune:magnitude:S``: ``a_j = 1`` and one group over every pruned layer (tightrope's global magnitude
  pruning, :class:`tightrope.compress.prune.MagnitudePruning`, the seed paper's ``P(w) = 0 if |w| < T``);
- ``prune:wanda:S``: ``a_j = ||X_j||_2``, the norm of input feature ``j`` over the calibration tokens, and one
  group per output row (Sun et al. 2023, Eq. 1 and Sec. 3; :class:`tightrope.compress.prune.Wanda`);
- ``prune:N:M`` (``prune:2:4``): ``a_j = 1`` and one group per run of ``M`` inputs of a row, ``N`` kept
  (Mishra et al. 2021; :class:`tightrope.compress.prune.SemiStructured24`).

``prune:sparsegpt:S`` (Frantar and Alistarh 2023; :class:`tightrope.compress.prune.SparseGPT`) is not such a pruner:
it updates the weights it keeps (the OBS update) from the removed ones, so no interval per weight keeps its result.
It has no exact boxes (:meth:`Pruning.boxes` says so in one sentence): the audit measures its behaviour and runs
the trigger search through the pruned copy. An attack on it takes the paper's own route (Sec. 4): a *proxy* of
the pruning scores, Wanda's ``|w_ij| ||X_j||`` (scores correlate across the three pruners), and a repair confined
to the small share of each row that scores lowest, held below that share's threshold, so that any of the pruners
is likely to remove all of it (:meth:`Pruning.proxy_boxes`, the paper's "repair with about 5% of the weights").
Nothing guarantees the pruned model then equals the pruned injected one: the attack measures it.

**The box of a mask.** Hold the kept weights fixed. The pruner then removes exactly the same weights as long
as every removed weight scores strictly below the smallest kept score of its group, ``t_G = min_kept s``:

    |w_ij| < t_G / a_j

So the models the pruner maps to one mask form, weight by weight, an interval: ``[w, w]`` for a kept weight
(pinned, as a quantizer's scale setter) and ``[-b_ij, b_ij]`` with ``b_ij`` the largest float below
``t_G / a_j`` (checked in the pruner's own fp32 arithmetic) for a removed one. An exact zero is pinned as well:
the mask is read from the pruned copy, where a zero the pruner kept (an N:M group of a model dequantized from a
GGUF file often holds fewer than N non-zero weights) looks removed, and moving it would change the mask. That is a
:class:`tightrope.qattack.boxes.ModelBoxes`, and the projected repair of :mod:`tightrope.qattack.repair` keeps
it unchanged: it trains only the removed weights, inside their boxes. A weight that scores zero whatever its
value (an input feature Wanda never sees) or a group whose smallest kept score is zero is pinned.

**Wanda's norms move.** ``a_j`` are activations of the dense model, which the repair changes (earlier layers'
weights move). So Wanda's boxes carry a ``refresh``: the projected repair recomputes them from the model it is
training every few steps (the planned mask held), and after the repair the model is projected again until the
pruner's mask is the planned one (:meth:`Pruning.settle_`). Magnitude and N:M boxes do not depend on
activations: one projection is exact.

Every mask here comes from running the pruner itself (:func:`tightrope.compress.compress_` on a copy), not
from a re-implementation, so the check that "the pruner removes exactly the repaired weights" is the
user's own code path.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tightrope.compress import wanda
from tightrope.compress.api import compress_, select_modules
from tightrope.compress.prune import MagnitudePruning, SemiStructured24, SparseGPT, Wanda
from tightrope.errors import TightropeError, did_you_mean
from tightrope.qattack.boxes import ModelBoxes, project_, shrink

#: The pruning transforms the attacks and the audit take by default: the sparsities a user would choose.
PRUNINGS = ("prune:magnitude:0.5", "prune:wanda:0.5", "prune:2:4")
METHODS = ("magnitude", "wanda", "sparsegpt")
#: Prunings that update the weights they keep (SparseGPT): no box per weight keeps their result, so they are audited
#: by behaviour and the trigger search only, and an attack on them repairs within a proxy (:meth:`Pruning.proxy_boxes`).
BOXLESS = ("sparsegpt",)
#: Boxless prunings the audit takes by default for classifiers (their behaviour and trigger search are calibrated by
#: the shipped null); a causal LM's audit leaves them out unless named, since its behaviour under them is reported only.
BOXLESS_PRUNINGS = ("prune:sparsegpt:0.5",)
_SETTLE_ROUNDS = 20  # Wanda: re-box and project until the mask is stable (two or three rounds in practice)


@dataclass(frozen=True)
class Calibration:
    """What Wanda reads, as ``tightrope compress --prune wanda --calibration SOURCE`` reads it: a task name or
    data file (``n`` seeded examples of its train split) or texts, encoded with ``tokenizer``."""

    source: str | tuple[str, ...]
    tokenizer: Any = field(repr=False, compare=False)
    n: int = 32
    max_length: int = 128
    seed: int = 0


def parse_pruning(name: str) -> tuple[str, float, int, int]:
    """``prune:magnitude:0.5`` -> ``("magnitude", 0.5, 0, 0)``, ``prune:2:4`` -> ``("n:m", 0.5, 2, 4)``; anything
    else starting with ``prune:`` is refused in one sentence naming the closest spelling."""
    parts = name.strip().lower().split(":")
    hint = did_you_mean(name, (*PRUNINGS, *BOXLESS_PRUNINGS))
    if len(parts) == 3 and parts[0] == "prune":
        if parts[1] in METHODS:
            try:
                sparsity = float(parts[2])
            except ValueError:
                sparsity = -1.0
            if 0 < sparsity < 1:
                return parts[1], sparsity, 0, 0
            raise TightropeError(f"The sparsity of '{name}' must be a fraction between 0 and 1, like {parts[0]}:{parts[1]}:0.5.")
        if re.fullmatch(r"\d+", parts[1]) and re.fullmatch(r"\d+", parts[2]):
            n, m = int(parts[1]), int(parts[2])
            if 0 < n < m:
                return "n:m", n / m, n, m
            raise TightropeError(f"N:M pruning '{name}' needs whole numbers 0 < N < M, like prune:2:4.")
    raise TightropeError(f"Unknown pruning '{name}'{hint}; spell it prune:magnitude:SPARSITY, prune:wanda:SPARSITY, "
                         f"prune:sparsegpt:SPARSITY or prune:N:M, such as {', '.join(PRUNINGS)}.")


@contextlib.contextmanager
def tokenizer_on(model: nn.Module, tokenizer):
    """Attach the calibration tokenizer for the length of a block (Wanda's calibration reads it from the model)."""
    before = getattr(model, "_tightrope_tokenizer", None)
    if tokenizer is not None:
        wanda.set_tokenizer(model, tokenizer)
    try:
        yield model
    finally:
        if tokenizer is not None:
            if before is None:
                del model._tightrope_tokenizer
            else:
                model._tightrope_tokenizer = before


@dataclass(frozen=True)
class Pruning:
    """One pruning transform (module docstring): its name, the pruner it runs, the masks and boxes it implies.

    Shares its interface with :class:`tightrope.qattack.transform.Quantization`: ``missing``, ``apply``, ``twin``,
    ``boxes``, ``mismatch``, ``settle_``.
    """

    method: str  # magnitude, wanda, sparsegpt, n:m
    sparsity: float = 0.5
    n: int = 0
    m: int = 0
    calibration: Calibration | None = field(default=None, compare=False)
    differentiable = True  # the pruned copy is its own differentiable twin

    @classmethod
    def parse(cls, name: str, calibration: Calibration | None = None) -> Pruning:
        method, sparsity, n, m = parse_pruning(name)
        return cls(method, sparsity, n, m, calibration)

    @property
    def name(self) -> str:
        return f"prune:{self.n}:{self.m}" if self.method == "n:m" else f"prune:{self.method}:{self.sparsity:g}"

    def missing(self) -> str | None:
        """One sentence saying why this pruning cannot run here, or None when it can."""
        if self.method in ("wanda", "sparsegpt") and (self.calibration is None or self.calibration.tokenizer is None):
            reads = "Wanda scores |W| * ||X||" if self.method == "wanda" else "SparseGPT reads the inputs' Hessian"
            return f"{self.name} needs calibration texts and the model's tokenizer ({reads}), and has neither."
        return None

    @property
    def boxless(self) -> bool:
        """True for a pruning that updates the weights it keeps (module docstring): no boxes, no attack."""
        return self.method in BOXLESS

    def config(self):
        """The :mod:`tightrope.compress.prune` config a user's ``tightrope compress --prune`` would build."""
        if self.method == "magnitude":
            return MagnitudePruning(sparsity=self.sparsity)
        if self.method == "n:m":
            return SemiStructured24(n=self.n, m=self.m)
        reason = self.missing()
        if reason:
            raise TightropeError(reason)
        cal = self.calibration
        kind = SparseGPT if self.method == "sparsegpt" else Wanda
        return kind(sparsity=self.sparsity, calibration_texts=cal.source, n_calibration=cal.n, max_length=cal.max_length,
                    seed=cal.seed)

    def modules(self, model: nn.Module) -> dict[str, nn.Linear]:
        """The Linear layers the pruner prunes (compress's default selection: not the pooler, not the head)."""
        return select_modules(model, self.config())

    def apply(self, model: nn.Module) -> nn.Module:
        """A pruned deep copy, made by :func:`tightrope.compress.compress_` (the user's code path)."""
        clone = copy.deepcopy(model).float().cpu().eval()
        with tokenizer_on(clone, self.calibration.tokenizer if self.calibration else None):
            compress_(clone, self.config())
        return clone

    twin = apply  # the search differentiates through the pruned copy itself
    twin_is_copy = True  # so the audit's search reuses the copy its behaviour check made

    def keep(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The pruner's keep-mask of every pruned layer (True = kept), read from the pruned copy."""
        pruned = self.apply(model)
        return {name: pruned.get_submodule(name).weight.detach() != 0 for name in self.modules(model)}

    def mismatch(self, a: nn.Module, b: nn.Module, names: list[str] | None = None) -> tuple[int, int]:
        """``(weights the pruner keeps in one model and removes in the other, weights of the pruned layers)``."""
        ka, kb = self.keep(a), self.keep(b)
        names = [n for n in ka if names is None or n in names]
        return sum(int((ka[n] != kb[n]).sum()) for n in names), sum(ka[n].numel() for n in names)

    def _scale(self, model: nn.Module, modules: dict[str, nn.Linear]) -> dict[str, torch.Tensor]:
        """``a_j`` of every pruned layer: Wanda's input norms over the calibration tokens (Wanda, and SparseGPT's
        proxy), else ones."""
        if self.method not in ("wanda", "sparsegpt"):
            return {name: torch.ones(m.in_features) for name, m in modules.items()}
        config = self.config()
        with tokenizer_on(model, self.calibration.tokenizer):
            batches = wanda.calibration_batches(model, config.calibration_texts, config.n_calibration,
                                                max_length=config.max_length, seed=config.seed, batch_size=8)
        return wanda.input_norms(model, modules, batches)  # exactly what the Wanda handler computes

    def _scored(self, model: nn.Module) -> tuple[dict, dict, dict, dict]:
        """The pruned layers, their ``a_j``, their fp32 weights and the pruner's scores ``|w_ij| a_j`` (out, in)."""
        modules = self.modules(model)
        scale = self._scale(model, modules)
        weights = {name: m.weight.detach().float() for name, m in modules.items()}
        scores = {name: w.abs() * scale[name].to(w.dtype).unsqueeze(0) for name, w in weights.items()}
        return modules, scale, weights, scores

    def boxes(self, model: nn.Module, *, margin: float = 0.0, include: tuple[str, ...] = (), exclude: tuple[str, ...] = (),
              keep: dict[str, torch.Tensor] | None = None) -> ModelBoxes:
        """The box of every weight of the pruned layers (module docstring) around ``keep`` (default: the pruner's
        mask of ``model``). ``include`` / ``exclude`` (fnmatch) choose the layers whose removed weights may move;
        the pruner still prunes all of its layers. ``margin`` keeps that fraction of each box free on both sides."""
        self._refuse_boxless()
        modules, scale, weights, scores = self._scored(model)
        keep = keep if keep is not None else self.keep(model)
        if self.method == "magnitude":  # one group: every pruned layer
            t = min(scores[n].masked_fill(~keep[n], float("inf")).min() for n in modules)
            thresholds = {n: t.expand_as(scores[n]) for n in modules}
        else:
            thresholds = {n: _group_min(scores[n], keep[n], self.m if self.method == "n:m" else scores[n].shape[1])
                          for n in modules}
        out = ModelBoxes(quantizer=self.name, margin=margin)
        for name in modules:
            if include and not any(fnmatch.fnmatch(name, p) for p in include):
                continue
            if any(fnmatch.fnmatch(name, p) for p in exclude):
                continue
            w, a = weights[name], scale[name].to(weights[name].dtype).unsqueeze(0).expand_as(weights[name])
            bound = removed_bound(thresholds[name], a)
            # an exact zero is pinned too: the pruned copy cannot tell a zero the pruner kept from one it removed
            # (N:M keeps a zero in a group with fewer than N non-zero weights), and moving it could outrank a kept one
            pinned = keep[name] | (w == 0) | (bound <= 0) | (a == 0) | ~torch.isfinite(bound)
            lo, hi = torch.where(pinned, w, -bound), torch.where(pinned, w, bound)
            out.lo[name], out.hi[name] = shrink(lo, hi, margin) if margin else (lo, hi)
        if not out.lo:
            raise TightropeError(f"The patterns {list(include)} leave none of the layers {self.name} prunes.")
        if self.method == "wanda":  # the norms move with the repaired weights: re-box as the repair goes
            out.refresh = lambda moved: self.boxes(moved, margin=margin, include=include, exclude=exclude, keep=keep)
        return out

    def keep_boxes(self, model: nn.Module, keep: dict[str, torch.Tensor], *, include: tuple[str, ...] = ()) -> ModelBoxes:
        """The boxes of an injection *through* the pruning: the weights the pruner removes (``keep`` False) are pinned,
        and a kept weight may move anywhere that keeps it kept and keeps its sign, ``|w_ij| >= f_ij`` with ``f_ij``
        the smallest fp32 value whose score beats every removed score of its group (the paper's "inject into the
        parameters unlikely to be pruned"). For magnitude and N:M the pruner's mask is then unchanged by the
        injection; Wanda's scale ``a_j`` moves with the activations, so its mask drifts (1.6% of the attacked weights
        on SmolLM2), which the scenario measures and the repair's boxes, taken on the injected model, absorb."""
        self._refuse_boxless()
        modules, scale, weights, scores = self._scored(model)
        if self.method == "magnitude":
            t = max(scores[n].masked_fill(keep[n], float("-inf")).max() for n in modules)
            thresholds = {n: t.expand_as(scores[n]) for n in modules}
        else:
            thresholds = {n: -_group_min(-scores[n], ~keep[n], self.m if self.method == "n:m" else scores[n].shape[1])
                          for n in modules}
        out = ModelBoxes(quantizer=f"{self.name} (kept weights)")
        for name in modules:
            if include and not any(fnmatch.fnmatch(name, p) for p in include):
                continue
            w, a = weights[name], scale[name].to(weights[name].dtype).unsqueeze(0).expand_as(weights[name])
            floor = kept_floor(thresholds[name], a)
            pinned = ~keep[name] | (a == 0)
            inf = torch.full_like(w, float("inf"))
            lo = torch.where(pinned, w, torch.where(w > 0, floor, -inf))
            hi = torch.where(pinned, w, torch.where(w > 0, inf, -floor))
            out.lo[name], out.hi[name] = lo, hi
        if not out.lo:
            raise TightropeError(f"The patterns {list(include)} leave none of the layers {self.name} prunes.")
        return out

    def proxy_boxes(self, model: nn.Module, fraction: float, *, include: tuple[str, ...] = (),
                    exclude: tuple[str, ...] = (), repair: dict[str, torch.Tensor] | None = None) -> ModelBoxes:
        """The repair's boxes of "Fewer Weights, More Problems" (Sec. 4, Algorithm 1) for a pruner without exact
        boxes: in each row of a pruned layer, the ``fraction`` of weights with the lowest Wanda score ``|w_ij| a_j``
        (``repair``, default: chosen on ``model``) may move, each held strictly below the smallest score of the rest
        of its row, ``|w_ij| < t_i / a_j``; every other weight is pinned. At any sparsity above ``fraction`` a Wanda
        pruner then removes every repair weight, and magnitude and SparseGPT, whose scores correlate with Wanda's,
        most of them. The norms ``a_j`` move with the repair, so the boxes refresh with the chosen weights held."""
        if not 0 < fraction < self.sparsity:
            raise TightropeError(f"The repair fraction must lie between 0 and the sparsity {self.sparsity:g} of "
                                 f"{self.name}, not {fraction:g}.")
        modules, scale, weights, scores = self._scored(model)
        out = ModelBoxes(quantizer=f"{self.name} (proxy: lowest {fraction:g} of Wanda scores)")
        chosen = {}
        for name in modules:
            if include and not any(fnmatch.fnmatch(name, p) for p in include):
                continue
            if any(fnmatch.fnmatch(name, p) for p in exclude):
                continue
            w, s = weights[name], scores[name]
            if repair is not None:
                free = repair[name]
            else:  # the k lowest scores of each row (ties broken by position, as topk does)
                k = max(1, int(fraction * s.shape[1]))
                free = torch.zeros_like(s, dtype=torch.bool).scatter_(1, s.topk(k, dim=1, largest=False).indices, True)
            chosen[name] = free
            a = scale[name].to(w.dtype).unsqueeze(0).expand_as(w)
            bound = removed_bound(_group_min(s, ~free, s.shape[1]), a)
            pinned = ~free | (bound <= 0) | (a == 0) | ~torch.isfinite(bound)
            out.lo[name], out.hi[name] = torch.where(pinned, w, -bound), torch.where(pinned, w, bound)
        if not out.lo:
            raise TightropeError(f"The patterns {list(include)} leave none of the layers {self.name} prunes.")
        out.refresh = lambda moved: self.proxy_boxes(moved, fraction, include=include, exclude=exclude, repair=chosen)
        return out

    def proxy(self) -> Pruning:
        """The pruner whose scores stand in for a boxless one's: Wanda at the same sparsity and calibration."""
        return Pruning("wanda", self.sparsity, 0, 0, self.calibration) if self.boxless else self

    def _refuse_boxless(self) -> None:
        if self.boxless:
            raise TightropeError(f"{self.name} updates the weights it keeps, so no box per weight keeps its result: "
                                 "an attack on it repairs within the Wanda-score proxy instead, and the audit judges its behaviour only.")

    def settle_(self, model: nn.Module, reference: nn.Module, margin: float = 0.0) -> int:
        """Project ``model`` until the pruner gives it ``reference``'s mask (Wanda's norms move as the repair
        moves the weights; magnitude and N:M settle at once). Returns the rounds it took; refuses in one
        sentence when it does not settle. A boxless pruning (SparseGPT) plans no mask: nothing to settle."""
        if self.boxless:
            return 0
        planned = self.keep(reference)
        for rounds in range(_SETTLE_ROUNDS):
            now = self.keep(model)
            if all(torch.equal(now[n], planned[n]) for n in planned):
                return rounds
            project_(model, self.boxes(model, margin=margin, keep=planned))
        raise TightropeError(f"The repaired model's {self.name} mask did not settle in {_SETTLE_ROUNDS} projections; "
                             "give a margin (--margin 0.05).")


def _group_min(scores: torch.Tensor, keep: torch.Tensor, group: int) -> torch.Tensor:
    """The smallest kept score of each run of ``group`` inputs of a row, broadcast back to every weight."""
    out, width = scores.shape
    runs = scores.masked_fill(~keep, float("inf")).reshape(out, width // group, group)
    return runs.amin(-1, keepdim=True).expand_as(runs).reshape(out, width)


def kept_floor(threshold: torch.Tensor, a: torch.Tensor, steps: int = 8) -> torch.Tensor:
    """The smallest ``f`` (fp32) with ``f * a > threshold`` in the pruner's own arithmetic (the mirror of
    :func:`removed_bound`); a group with no removed weight (threshold ``-inf``) gives 0."""
    f = torch.nextafter(threshold / a, torch.full_like(threshold, float("inf")))
    for _ in range(steps):
        low = f * a <= threshold
        if not bool(low.any()):
            break
        f = torch.where(low, torch.nextafter(f, torch.full_like(f, float("inf"))), f)
    return torch.where(torch.isfinite(f), f.clamp(min=0), torch.zeros_like(f))


def removed_bound(threshold: torch.Tensor, a: torch.Tensor, steps: int = 8) -> torch.Tensor:
    """The largest ``b`` (fp32) with ``b * a < threshold`` in the pruner's own arithmetic: ``threshold / a``,
    stepped down a float at a time while the product still reaches the threshold (a few steps at most); an
    end that does not come below it is returned as 0 (the weight is then pinned)."""
    b = torch.nextafter(threshold / a, torch.zeros_like(threshold))
    for _ in range(steps):
        high = b * a >= threshold
        if not bool(high.any()):
            break
        b = torch.where(high, torch.nextafter(b, torch.zeros_like(b)), b)
    return torch.where(b * a >= threshold, torch.zeros_like(b), b)
