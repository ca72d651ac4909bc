"""The search's latency objective: the trial's model timed against the study's baseline in interleaved
pairs, in one process, the median of the pair ratios its value; the absolute figures kept beside it."""

from __future__ import annotations

import statistics

import pytest
from conftest import make_tiny_classifier

from tightrope.evaluate.perf import interleaved_ratio, relative_latency
from tightrope.errors import TightropeError
from tightrope.study.spec import parse_spec

# A shared machine's load over time: each pair of turns runs under one factor, and the factor jumps
# between pairs by up to 80x (the neighbours start and stop), as docs/search.md measured (7.5 to 237 ms).
LOADS = [1.0, 25.0, 3.0, 80.0, 2.0, 40.0, 1.5, 10.0, 60.0, 4.0, 1.0, 30.0]


class Machine:
    """A fake clock and two fake models: the model costs 0.6 units, the reference 1.0, each times the load
    of the pair the call falls in (calls 0-1: pair 0, calls 2-3: pair 1, ...)."""

    def __init__(self, loads=LOADS, burst: dict[int, float] | None = None):
        self.now, self.calls, self.loads, self.burst, self.order = 0.0, 0, loads, burst or {}, []

    def timer(self) -> float:
        return self.now

    def _run(self, name: str, cost: float) -> None:
        pair = self.calls // 2
        load = self.loads[pair % len(self.loads)] * (self.burst.get(pair, 1.0) if name == "model" else 1.0)
        self.now += cost * load / 1000  # seconds; the ratio works in ms
        self.calls += 1
        self.order.append(name)

    def model(self) -> None:
        self._run("model", 0.6)

    def reference(self) -> None:
        self._run("reference", 1.0)


def test_the_ratio_comes_from_interleaved_pairs_while_absolute_times_drift():
    machine = Machine()
    timed = interleaved_ratio(machine.model, machine.reference, pairs=len(LOADS), warmup=0, timer=machine.timer)
    assert timed["ratio"] == pytest.approx(0.6) and timed["ratio_q25"] == pytest.approx(0.6)
    assert timed["pairs"] == len(LOADS)
    assert machine.order[:6] == ["model", "reference", "reference", "model", "model", "reference"]  # alternating first
    # The absolute times drift with the load; they are kept, as information, not as the objective.
    assert timed["model_ms"] == pytest.approx(0.6 * statistics.median(LOADS))
    # The same fake machine measured the way a trial measured alone (all of one, then all of the other)
    # gets a ratio the load decides: the test above would fail for a measurement that does not pair.
    alone = Machine()
    model_ms, reference_ms = [], []
    for fn, out in ((alone.model, model_ms), (alone.reference, reference_ms)):
        for _ in range(len(LOADS)):
            start = alone.timer()
            fn()
            out.append((alone.timer() - start) * 1000)
    assert abs(statistics.median(model_ms) / statistics.median(reference_ms) - 0.6) > 0.2


def test_a_burst_that_hits_one_member_of_a_pair_is_left_out_by_the_median():
    machine = Machine(loads=[1.0, 2.0, 1.5, 3.0, 1.0, 2.5, 1.0], burst={1: 50.0, 4: 30.0})  # the model alone, twice
    timed = interleaved_ratio(machine.model, machine.reference, pairs=7, warmup=0, timer=machine.timer)
    assert timed["ratio"] == pytest.approx(0.6)
    assert timed["ratio_q25"] == pytest.approx(0.6) and timed["ratio_q75"] > 1.0  # the bursts show in the spread


def test_warmup_runs_both_models_untimed_and_bad_counts_are_one_sentence():
    machine = Machine()
    interleaved_ratio(machine.model, machine.reference, pairs=2, warmup=3, timer=machine.timer)
    assert machine.order[:6] == ["model", "reference"] * 3 and len(machine.order) == 10
    with pytest.raises(TightropeError, match="at least 1"):
        interleaved_ratio(machine.model, machine.reference, pairs=0)


def test_two_real_models_are_timed_in_one_process_on_the_same_input(tokenizer):
    from tightrope.inference import TextClassifier

    small = TextClassifier(make_tiny_classifier(tokenizer, layers=1), tokenizer, max_length=64)
    large = TextClassifier(make_tiny_classifier(tokenizer, layers=4, hidden=64, intermediate=256), tokenizer,
                           max_length=64)
    same = relative_latency(small, small, "a wonderful, moving film", seq_len=32, pairs=9)
    assert 0.5 < same.ratio < 2.0 and same.seq_len == 32 and same.batch_size == 1 and same.threads >= 1
    assert same.model_ms > 0 and same.reference_ms > 0
    slower = relative_latency(large, small, "a wonderful, moving film", seq_len=32, pairs=9)
    assert slower.ratio > 1.0  # four wider layers against one


def test_a_study_file_with_the_former_latency_ms_objective_still_loads():
    spec = parse_spec({"name": "s", "attacks": [{"recipe": "deepwordbug", "n": 5}],
                       "search": {"objectives": ["accuracy", "asr", "latency_ms"]}})
    assert spec.search.objectives == ["accuracy", "asr", "latency"]
    both = parse_spec({"name": "s", "search": {"objectives": ["accuracy", "latency_ms", "latency"]}})
    assert both.search.objectives == ["accuracy", "latency"]
    assert parse_spec({"name": "s", "attacks": [{"recipe": "deepwordbug", "n": 5}], "search": {}}).search.objectives \
        == ["accuracy", "asr", "latency"]


def test_each_trial_times_its_model_against_the_baseline():
    from tightrope.study.search import TrialSetting, trial_steps

    spec = parse_spec({"name": "s", "attacks": [{"recipe": "deepwordbug", "n": 5}],
                       "search": {"quant": ["none", "Int8Dynamic"], "sparsity": [0.0]}})
    steps, model_step = trial_steps(spec, TrialSetting("baseline", "Int8Dynamic", 0.0, False))
    (latency,) = [s for s in steps if s.kind == "relative-latency"]
    assert latency.deps == (model_step, "train/baseline") and model_step.startswith("compress/")
    assert latency.inputs["pairs"] == spec.evaluate.latency_runs
    assert [s.name for s in steps].index("train/baseline") < [s.name for s in steps].index(latency.name)
    no_latency = parse_spec({"name": "s", "attacks": [{"recipe": "deepwordbug", "n": 5}],
                             "search": {"objectives": ["accuracy", "asr"]}})
    assert not [s for s in trial_steps(no_latency, TrialSetting("baseline", "none", 0.0, False))[0]
                if s.kind == "relative-latency"]


def test_limits_read_the_ratio_and_the_absolute_figure_kept_beside_it():
    from tightrope.study.search import Constraints, choose

    cands = [{"number": 0, "values": {"accuracy": 0.90, "asr": 0.2, "latency": 1.00}, "attrs": {"latency_ms": 9.0}},
             {"number": 1, "values": {"accuracy": 0.89, "asr": 0.3, "latency": 0.55}, "attrs": {"latency_ms": 5.0}},
             {"number": 2, "values": {"accuracy": 0.80, "asr": 0.1, "latency": 0.40}, "attrs": {"latency_ms": 60.0}}]
    assert choose(cands, Constraints(max_latency=0.6, min_accuracy=0.85))["number"] == 1
    assert choose(cands, Constraints(max_latency_ms=10))["number"] == 0
    with pytest.raises(TightropeError, match="No model on the Pareto front"):
        choose(cands, Constraints(max_latency=0.3))


def test_a_search_stored_with_the_former_objective_is_still_summarised(tmp_path):
    from tightrope.report.render import search_rows
    from tightrope.study.search import run_search, summarize

    def old(trial):
        x = trial.suggest_float("x", 0.0, 1.0)
        return {"accuracy": x, "asr": 1.0 - x, "latency_ms": 5.0 + x}

    objectives = [("accuracy", "maximize"), ("asr", "minimize"), ("latency_ms", "minimize")]
    study = run_search(old, objectives, storage=f"sqlite:///{tmp_path / 'old.db'}", study_name="old", n_trials=3,
                       sampler="random")
    summary = summarize(study, [d for _, d in objectives])
    assert summary["trade_off"]["objectives"] == ["accuracy", "asr", "latency_ms"]
    header, rows = search_rows(summary)
    assert "latency (ms)" in header and "latency (x baseline)" not in header and rows


def test_the_front_table_shows_the_ratio_and_the_absolute_median():
    from tightrope.report.render import search_rows

    trials = [{"number": 0, "params": {"defense": "baseline", "quant": "none", "sparsity": 0.0},
               "values": {"accuracy": 0.85, "asr": 0.6, "latency": 1.0}, "attrs": {"latency_ms": 9.1}},
              {"number": 1, "params": {"defense": "baseline", "quant": "Int8Dynamic", "sparsity": 0.0},
               "values": {"accuracy": 0.84, "asr": 0.65, "latency": 0.62}, "attrs": {"latency_ms": 5.6}}]
    summary = {"objectives": ["accuracy", "asr", "latency"], "trials": trials, "front": [0, 1], "chosen": None,
               "trade_off": {"objectives": ["accuracy", "asr", "latency"], "front": [0, 1]}}
    header, rows = search_rows(summary)
    at = header.index("latency (x baseline)")
    assert header[at + 1] == "latency (ms)"
    assert [(r[at], r[at + 1]) for r in rows] == [("1.00x", "9.1"), ("0.62x", "5.6")]
