"""Fixed-seed attacks against a stored expectation: speed or structure work must not change what an
attack finds (status, adversarial text, queries) unless the change is intended and explained.

The victim is the deterministic bag-of-words model of test_attack_text (exact arithmetic, so the
expectation holds on every CPU); the expectation was computed before the Attack / Attacker split.
"""

from __future__ import annotations

import threading

import pytest

from test_attack_text import BowClassifier, embedding_attack, toy_task
from tightrope.attacks import recipes
from tightrope.attacks.attacker import Attacker, read_results

EXPECTED = {
    "embedding": [
        ["succeeded", "a fine poor with a fine plot", 18, 18], ["failed", "great film and a fine cast", 17, 17],
        ["succeeded", "the poor was fine , really fine", 18, 18], ["failed", "nice acting , decent plot", 15, 15],
        ["failed", "an excellent film", 8, 8], ["failed", "good good fine", 9, 9],
        ["failed", "a bad movie with a poor plot", 19, 19], ["failed", "terrible film and an awful cast", 13, 13],
        ["failed", "the movie was bad , really bad", 14, 14], ["failed", "poor acting , mediocre plot", 13, 13],
        ["failed", "an awful film", 6, 6], ["failed", "bad bad poor", 7, 7],
    ],
    "deepwordbug": [
        ["succeeded", "a ogod movie with a niec plot", 13, 13], ["succeeded", "greta film and a fien cast", 13, 13],
        ["succeeded", "the movie was godo , really ogod", 13, 13], ["succeeded", "niec acting , decnet plot", 13, 13],
        ["succeeded", "an exclelent film", 7, 7], ["succeeded", "gooj godo fnie", 15, 15],
        ["failed", "a bad movie with a poor plot", 21, 21], ["failed", "terrible film and an awful cast", 21, 21],
        ["failed", "the movie was bad , really bad", 20, 20], ["failed", "poor acting , mediocre plot", 21, 21],
        ["failed", "an awful film", 11, 11], ["failed", "bad bad poor", 15, 15],
    ],
}
SEEDS = {"embedding": 5, "deepwordbug": 3}


def _attack(name: str):
    return embedding_attack() if name == "embedding" else recipes.build("deepwordbug", None)


@pytest.mark.parametrize("streams", [1, 3])
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_a_fixed_seed_attack_finds_what_it_found_before(name, streams, tmp_path):
    """One stream, or three examples at once on threads (written as they finish): the same results."""
    report = Attacker(_attack(name), out=tmp_path / name, seed=SEEDS[name], streams=streams).run(BowClassifier(), toy_task(12))
    results = sorted(read_results(tmp_path / name / "results.jsonl"), key=lambda r: r.index)
    got = [[r.status, r.perturbed_text, r.queries, r.model_queries] for r in results]
    assert got == EXPECTED[name]
    assert report.examples == 12 and [r.index for r in results] == list(range(12))


class MeetsAnotherStream(BowClassifier):
    """The same victim, whose first call waits (up to 10 s) until a second call is in flight at once."""

    def __init__(self):
        super().__init__()
        self.meeting = threading.Barrier(2, timeout=10)
        self.met = False

    def logits(self, texts, batch_size=64):
        if not self.met:
            try:
                self.meeting.wait()
                self.met = True
            except threading.BrokenBarrierError:
                pass
        return super().logits(texts, batch_size)


def test_streams_attack_examples_at_the_same_time(tmp_path):
    victim = MeetsAnotherStream()
    Attacker(_attack("deepwordbug"), seed=3, streams=2).run(victim, toy_task(4))
    assert victim.met  # two examples' queries were in flight together

    alone = MeetsAnotherStream()
    alone.meeting = threading.Barrier(2, timeout=0.2)
    Attacker(_attack("deepwordbug"), seed=3, streams=1).run(alone, toy_task(2))
    assert not alone.met  # one stream never has two queries in flight


def test_streams_must_be_positive():
    from tightrope.errors import TightropeError

    with pytest.raises(TightropeError, match="at least 1"):
        Attacker(_attack("deepwordbug"), streams=0)
