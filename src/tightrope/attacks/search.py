"""Search methods: greedy substitution by word importance (TextFooler, PWWS, DeepWordBug) and beam search
(HotFlip). Every candidate set for a position goes to the victim in one batched call.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from tightrope.attacks.constraints import (
    CandidateConstraint,
    PreTransformationConstraint,
    SentenceSimilarity,
)
from tightrope.attacks.goal import GoalOutput, UntargetedClassification
from tightrope.attacks.text import AttackedText, Part
from tightrope.attacks.words import Transformation


@dataclass
class SearchState:
    """One example's attack in progress; ``current``/``output`` hold the best text so far (kept on a budget stop)."""

    original: AttackedText
    goal: UntargetedClassification
    transformation: Transformation
    pre: list[PreTransformationConstraint]
    post: list[CandidateConstraint]
    rng: random.Random
    current: AttackedText = None
    output: GoalOutput = None
    rejected: dict[str, int] = field(default_factory=dict)

    def modifiable(self, text: AttackedText) -> list[int]:
        allowed = set(range(len(text)))
        for c in self.pre:
            allowed &= c.allowed(text, self.original)
        return sorted(allowed)

    def neighbours(self, text: AttackedText, index: int) -> list[AttackedText]:
        """Candidate texts at ``index`` that pass every candidate constraint (cheap ones first)."""
        words = list(dict.fromkeys(self.transformation.candidates(text, index, self.rng, label=self.goal.label)))
        cands = [text.replace(index, w) for w in words if w and w != text.words[index]]
        for constraint in self.post:
            if not cands:
                break
            keep = constraint.check(self.original, cands, index)
            self.rejected[constraint.name] = self.rejected.get(constraint.name, 0) + keep.count(False)
            cands = [c for c, k in zip(cands, keep) if k]
        return cands

    def prepare(self, text: AttackedText, indices: list[int]) -> None:
        """The transformation's batched work for ``indices`` of ``text``, for this example's label."""
        self.transformation.prepare(text, indices, label=self.goal.label)

    def similarity(self) -> SentenceSimilarity | None:
        return next((c for c in self.post if isinstance(c, SentenceSimilarity)), None)

    def accept(self, text: AttackedText, output: GoalOutput) -> None:
        self.current, self.output = text, output


class Search(Part):
    name = "search"

    def perform(self, state: SearchState) -> None:
        raise NotImplementedError


def importance_delete(p_orig: torch.Tensor, p_del: torch.Tensor, label: int) -> torch.Tensor:
    """Jin et al. 2020, Eq. 2: I_i = p_y(X) - p_y(X\\w_i), plus p_ybar(X\\w_i) - p_ybar(X) when the
    deletion changes the prediction to ybar. ``p_orig`` (K,), ``p_del`` (W, K) -> (W,)."""
    drop = p_orig[label] - p_del[:, label]
    new = p_del.argmax(-1)
    flipped = new != label
    gain = p_del.gather(1, new[:, None])[:, 0] - p_orig[new]
    return drop + torch.where(flipped, gain, torch.zeros_like(gain))


def pwws_ranking(saliency: torch.Tensor, best_gain: torch.Tensor) -> torch.Tensor:
    """Ren et al. 2019, Eq. 7-8: H(x, x*_i, w_i) = softmax(S(x))_i * Delta P*_i."""
    return torch.softmax(saliency, dim=0) * best_gain


class GreedyWordSwapWIR(Search):
    """Rank words by importance, then substitute in that order, keeping the best candidate at each position
    when it raises the goal score (TextAttack's GreedyWordSwapWIR); stop at the first success, choosing
    among successful candidates the one most similar to the original when a similarity constraint is set.

    ``wir``: ``delete`` (TextFooler: Jin et al. 2020 Eq. 2), ``unk`` (DeepWordBug's replace-1 score: Gao
    et al. 2018 Sec. 3.1, the token replaced by an unknown token), ``weighted-saliency`` (PWWS: Ren et al.
    2019 Eq. 7-8).
    """

    name = "greedy_word_swap_wir"

    def __init__(self, wir: str = "delete", unk_token: str = "[UNK]"):
        if wir not in ("delete", "unk", "weighted-saliency"):
            raise ValueError(f"unknown word-importance method {wir!r}")
        self.wir, self.unk_token = wir, unk_token

    def params(self):
        return {"wir": self.wir, "unk_token": self.unk_token if self.wir != "delete" else None}

    def rank(self, state: SearchState, indices: list[int]) -> list[int]:
        text, label = state.current, state.goal.label
        if not indices:
            return []
        p0 = state.output.probs
        if self.wir == "delete":
            probs = state.goal.probs([text.replace(i, "").text for i in indices])
            scores = importance_delete(p0, probs, label)
        else:
            probs = state.goal.probs([text.replace(i, self.unk_token).text for i in indices])
            scores = p0[label] - probs[:, label]  # saliency S(x, w_i) = P(y|x) - P(y|x with w_i unknown)
            if self.wir == "weighted-saliency":
                state.prepare(text, indices)
                per_index = [state.neighbours(text, i) for i in indices]
                flat = [c.text for cands in per_index for c in cands]
                gains = torch.zeros(len(indices))
                if flat:
                    pf = state.goal.probs(flat)[:, label]
                    k = 0
                    for j, cands in enumerate(per_index):
                        if cands:
                            gains[j] = (p0[label] - pf[k:k + len(cands)]).max()
                            k += len(cands)
                scores = pwws_ranking(scores, gains)
        order = sorted(range(len(indices)), key=lambda j: (-float(scores[j]), indices[j]))
        return [indices[j] for j in order]

    def perform(self, state: SearchState) -> None:
        indices = state.modifiable(state.current)
        order = self.rank(state, indices)
        state.prepare(state.current, order)
        for index in order:
            if index not in state.modifiable(state.current):
                continue
            cands = state.neighbours(state.current, index)
            if not cands:
                continue
            outs = state.goal.evaluate([c.text for c in cands])
            best = max(range(len(cands)), key=lambda j: (outs[j].score, -j))
            if outs[best].score <= state.output.score:
                continue
            if outs[best].succeeded:
                winners = [j for j, o in enumerate(outs) if o.succeeded]
                sim = state.similarity()
                if sim is not None and len(winners) > 1:
                    a = [state.original.window(index, sim.window)] * len(winners)
                    b = [cands[j].window(index, sim.window) for j in winners]
                    sims = sim.similarity(a, b)
                    best = winners[int(sims.argmax())]
                state.accept(cands[best], outs[best])
                return
            state.accept(cands[best], outs[best])


class BeamSearch(Search):
    """Beam search over single substitutions (TextAttack's HotFlip recipe: beam width 10)."""

    name = "beam_search"

    def __init__(self, beam_width: int = 10):
        self.beam_width = beam_width

    def params(self):
        return {"beam_width": self.beam_width}

    def perform(self, state: SearchState) -> None:
        beam = [state.current]
        while True:
            cands: dict[str, AttackedText] = {}
            for text in beam:
                indices = state.modifiable(text)
                state.prepare(text, indices)
                for i in indices:
                    for c in state.neighbours(text, i):
                        cands.setdefault(c.text, c)
            if not cands:
                return
            texts = list(cands)
            outs = state.goal.evaluate(texts)
            order = sorted(range(len(texts)), key=lambda j: -outs[j].score)
            top = order[0]
            if outs[top].score <= state.output.score:
                return  # no candidate improves on the best text so far
            state.accept(cands[texts[top]], outs[top])
            if outs[top].succeeded:
                return
            beam = [cands[texts[j]] for j in order[: self.beam_width]]
