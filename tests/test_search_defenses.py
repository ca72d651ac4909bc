"""The search's defense dimension: a grid that measures each setting once, repeated settings answered
without running a step, the strongest attack as the ``asr`` objective, preflight of defense settings,
and the report's trade-off figure. Step kinds are replaced by counting fakes (milliseconds a trial)."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tightrope.errors import TightropeError
from tightrope.study.spec import parse_spec

# Attack success per attack (the fakes below): DeepWordBug is stronger on the baseline, TextFooler on
# the defended model; the defense's epsilon lowers both, pruning raises both.
ATTACKS = [{"recipe": "deepwordbug", "n": 5}, {"recipe": "textfooler", "n": 5}]


@pytest.fixture
def fake_steps(monkeypatch) -> Counter:
    """Fake train / defend / compress / evaluate / attack kinds; returns the count of executions per kind."""
    import tightrope.study.plan  # noqa: F401 - registers the real step kinds first, so the fakes below win
    from tightrope.study import runner

    calls: Counter = Counter()

    def model_step(inputs, deps, ctx):
        calls[ctx.step.kind] += 1
        (ctx.workdir / "model").mkdir()
        parent = deps[ctx.step.deps[0]] if ctx.step.deps else {}
        epsilon = inputs.get("params", {}).get("epsilon", parent.get("epsilon", 0.0))
        sparsity = parent.get("sparsity", 0) + sum(s["params"].get("sparsity", 0) for s in inputs.get("steps", []))
        quant = parent.get("quant", 0) + sum(s["method"] == "Int8Dynamic" for s in inputs.get("steps", []))
        return {"model_dir": ctx.rel(ctx.workdir / "model"), "epsilon": epsilon, "sparsity": sparsity, "quant": quant}

    def evaluate(inputs, deps, ctx):
        calls["evaluate"] += 1
        m = deps[ctx.step.deps[0]]
        return {"metrics": {"accuracy": 0.9 - 0.2 * m["sparsity"] - 0.01 * m["quant"] - m["epsilon"]},
                "latency": {"median_ms": 10 - 5 * m["quant"] - 4 * m["sparsity"]}}

    def relative_latency(inputs, deps, ctx):  # the trial's model against the baseline (10 ms), in pairs
        calls["relative-latency"] += 1
        m = deps[ctx.step.deps[0]]
        ms = 10 - 5 * m["quant"] - 4 * m["sparsity"]
        return {"ratio": ms / 10, "ratio_q25": ms / 10, "ratio_q75": ms / 10, "model_ms": ms, "reference_ms": 10,
                "pairs": 3}

    def attack(inputs, deps, ctx):
        calls["attack"] += 1
        m = deps[ctx.step.deps[0]]
        defended = m["epsilon"] > 0
        base = {"deepwordbug": 0.2 if defended else 0.6, "textfooler": 0.4 if defended else 0.5}[inputs["recipe"]]
        return {"attack_success_rate": round(base - 4 * m["epsilon"] + 0.1 * m["sparsity"], 6)}

    for name, fn in (("train", model_step), ("defend", model_step), ("compress", model_step),
                     ("evaluate", evaluate), ("relative-latency", relative_latency), ("attack", attack)):
        monkeypatch.setitem(runner.STEP_KINDS, name, runner.StepKind(name, fn))
    return calls


def _spec(**search):
    return parse_spec({"name": "s", "attacks": ATTACKS,
                       "search": {"objectives": ["accuracy", "asr", "latency"], **search}})


def _search(spec, root: Path, name: str = "s", n_trials: int | None = None, sampler: str | None = None):
    from tightrope.study.search import OBJECTIVES, run_search, study_objective

    return run_search(study_objective(spec, root / "run"), [(o, OBJECTIVES[o]) for o in spec.search.objectives],
                      storage=f"sqlite:///{root / 'optuna.db'}", study_name=name,
                      n_trials=n_trials or spec.search.trials, sampler=sampler or spec.search.resolved_sampler(),
                      space=spec.search.space())


GRID = {"trials": 20, "defenses": ["baseline", {"method": "fast", "params": {"epsilon": [0.01, 0.02]}}],
        "quant": ["none", "Int8Dynamic"], "sparsity": [0.0, 0.5]}


def test_grid_measures_each_combination_exactly_once(tmp_path, fake_steps):
    from tightrope.study.search import summarize

    spec = _spec(**GRID)
    assert spec.search.space_size() == 12 and spec.search.resolved_sampler() == "grid"  # 12 <= 20 trials
    study = _search(spec, tmp_path)
    summary = summarize(study, ["maximize", "minimize", "minimize"])
    measured = Counter((t["params"]["defense"], t["params"]["quant"], t["params"]["sparsity"]) for t in summary["trials"])
    expected = set(itertools.product(["baseline", "fast(epsilon=0.01)", "fast(epsilon=0.02)"], ["none", "Int8Dynamic"],
                                     [0.0, 0.5]))
    assert set(measured) == expected and set(measured.values()) == {1}  # every point once, none twice
    assert not summary["duplicates"]
    # each defense setting trains once, however many compressions follow it; 3 defenses x 3 compressions
    assert fake_steps["train"] == 1 and fake_steps["defend"] == 2 and fake_steps["compress"] == 9
    assert fake_steps["evaluate"] == 12 and fake_steps["attack"] == 24
    before = dict(fake_steps)
    again = _search(spec, tmp_path)  # the grid is finished: asking again runs no trial and no step
    assert len(again.trials) == 12 and dict(fake_steps) == before


def test_auto_sampler_is_a_grid_only_when_trials_cover_the_space():
    assert _spec(**{**GRID, "trials": 11}).search.resolved_sampler() == "nsga2"
    assert _spec(**{**GRID, "sparsity": {"low": 0.0, "high": 0.5}}).search.resolved_sampler() == "nsga2"
    assert _spec(**{**GRID, "sampler": "random"}).search.resolved_sampler() == "random"
    with pytest.raises(TightropeError, match="search.sampler: a grid needs a discrete space"):
        _spec(**{**GRID, "sampler": "grid", "sparsity": {"low": 0.0, "high": 0.5}})


def test_a_repeated_setting_executes_no_step(tmp_path, fake_steps):
    import optuna

    from tightrope.study.search import summarize

    spec = _spec(**{**GRID, "sampler": "random"})
    point = {"defense": "fast(epsilon=0.01)", "quant": "Int8Dynamic", "sparsity": 0.5, "structured": False}
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'optuna.db'}", study_name="s",
                                directions=["maximize", "minimize", "minimize"])
    for _ in range(3):
        study.enqueue_trial(point)
    study = _search(spec, tmp_path, n_trials=3)
    trials = study.get_trials()
    assert [t.params for t in trials] == [point] * 3
    assert [t.user_attrs.get("duplicate_of") for t in trials] == [None, 0, 0]  # answered from trial 0
    assert [t.values for t in trials[1:]] == [trials[0].values] * 2
    once = {"train": 1, "defend": 1, "compress": 1, "evaluate": 1, "relative-latency": 1, "attack": 2}
    assert dict(fake_steps) == once
    summary = summarize(study, ["maximize", "minimize", "minimize"])
    assert [t["number"] for t in summary["trials"]] == [0] and summary["duplicates"] == {"1": 0, "2": 0}
    # The runner's step cache on its own: a new search (another store) in the same run folder reuses every step.
    other = tmp_path / "other"
    other.mkdir()
    (other / "run").symlink_to(tmp_path / "run")
    fresh = optuna.create_study(storage=f"sqlite:///{other / 'optuna.db'}", study_name="s",
                                directions=["maximize", "minimize", "minimize"])
    fresh.enqueue_trial(point)
    fresh = _search(spec, other, n_trials=1)
    assert "duplicate_of" not in fresh.trials[0].user_attrs and fresh.trials[0].values == trials[0].values
    assert dict(fake_steps) == once


def test_a_grid_point_drawn_while_another_trial_measures_it_is_pruned_not_counted(tmp_path, fake_steps):
    """Two grid workers that read the store at once can draw one point; the second draw is pruned, so the
    grid still measures every point (it used to count the twin as a point and skip another one)."""
    import optuna
    from optuna.trial import TrialState

    spec = _spec(**GRID)
    point = {"defense": "baseline", "quant": "none", "sparsity": 0.0, "structured": False}
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'optuna.db'}", study_name="s",
                                directions=["maximize", "minimize", "minimize"])
    study.enqueue_trial(point)
    running = study.ask({k: optuna.distributions.CategoricalDistribution(v) for k, v in spec.search.space().items()})
    assert running.params == point  # another worker's trial, still running
    study.enqueue_trial(point)
    study = _search(spec, tmp_path, n_trials=1)
    pruned = [t for t in study.get_trials() if t.state == TrialState.PRUNED]
    assert [t.params for t in pruned] == [point]
    assert sum(t.state == TrialState.COMPLETE for t in study.get_trials()) == 1  # a different point was measured
    assert next(t for t in study.get_trials() if t.state == TrialState.COMPLETE).params != point


def test_a_study_defense_and_the_same_search_setting_train_once(tmp_path, fake_steps):
    spec = parse_spec({"name": "s", "attacks": ATTACKS,
                       "defenses": [{"name": "hardened", "method": "fast", "params": {"epsilon": 0.01}}],
                       "search": {"defenses": ["hardened", {"method": "fast", "params": {"epsilon": 0.01}}],
                                  "quant": ["none"], "sparsity": [0.0], "trials": 2}})
    study = _search(spec, tmp_path)
    assert sorted(t.params["defense"] for t in study.trials) == ["fast", "hardened"]
    assert fake_steps["defend"] == 1  # a step's key is its settings, not its name


def test_asr_is_the_strongest_attack_and_each_is_recorded(tmp_path, fake_steps):
    from tightrope.study.search import strongest

    assert strongest({"a": 0.2, "b": None, "c": 0.7}) == ("c", 0.7)
    assert strongest({"a": None}) == ("a", 0.0)  # no attackable example: nothing succeeded
    spec = _spec(**{**GRID, "defenses": ["baseline", {"method": "fast", "params": {"epsilon": 0.01}}],
                    "quant": ["none"], "sparsity": [0.0]})
    study = _search(spec, tmp_path)
    by_defense = {t.user_attrs["defense"]: t for t in study.trials}
    base, fast = by_defense["baseline"], by_defense["fast"]
    assert base.user_attrs["asr_by_attack"] == {"deepwordbug": 0.6, "textfooler": 0.5}
    assert base.values[1] == 0.6 and base.user_attrs["strongest_attack"] == "deepwordbug"
    assert fast.user_attrs["asr_by_attack"] == {"deepwordbug": 0.16, "textfooler": 0.36}
    assert fast.values[1] == 0.36 and fast.user_attrs["strongest_attack"] == "textfooler"
    # search.attack restricts the objective to the attacks it names (and runs only those)
    spec = _spec(**{**GRID, "defenses": ["baseline"], "quant": ["none"], "sparsity": [0.0], "attack": "textfooler"})
    calls = fake_steps["attack"]
    (tmp_path / "one").mkdir()
    study = _search(spec, tmp_path / "one")
    assert study.trials[0].values[1] == 0.5 and study.trials[0].user_attrs["asr_by_attack"] == {"textfooler": 0.5}
    assert fake_steps["attack"] == calls + 1


BAD = {"name": "s", "data": {"task": "rotten-tomatoes"}, "attacks": ATTACKS,
       "search": {"defenses": ["baseline", {"method": "a2t", "params": {"query_budget": [50, 100], "qurey_budget": 9}}]}}


def test_a_misspelt_defense_setting_fails_preflight_in_one_sentence(tmp_path, fake_steps):
    from tightrope.study.search import preflight_search, search_study

    spec = parse_spec(BAD)
    out = tmp_path / "run"
    with pytest.raises(TightropeError) as err:
        search_study(spec, out)
    message = str(err.value)
    assert message.startswith("search.defenses.1 (a2t(query_budget=50)): ") and "qurey_budget" in message
    assert "\n" not in message and message.endswith(".")
    assert not out.exists() and not fake_steps  # before any work
    # a setting the chosen defense would ignore is refused the same way
    wrong = parse_spec({**BAD, "search": {"defenses": [{"method": "a2t", "params": {"epsilon": 0.01}}]}})
    with pytest.raises(TightropeError, match=r"^search\.defenses\.0 \(a2t\): The a2t defense does not use --epsilon"):
        preflight_search(wrong)
    # the command line says it in one sentence, exit code 2, before making the run folder
    study = tmp_path / "s.yaml"
    study.write_text(json.dumps(BAD))
    result = CliRunner().invoke(__import__("tightrope.cli", fromlist=["app"]).app,
                                ["search", str(study), "--out", str(out)])
    assert result.exit_code == 2 and "qurey_budget" in " ".join(result.output.split())
    assert not out.exists()


def test_search_defenses_spec_grid_labels_and_former_name():
    spec = parse_spec({"name": "s", "attacks": ATTACKS, "search": {"defenses": [
        "baseline", {"name": "kd", "method": "distill", "params": {"a": [0.5, 0.9]}},
        {"method": "pgd", "params": {"epsilon": 0.01, "distill": {"a": [0.5], "temperature": [1.0, 2.0]}}}]}})
    choices = spec.search.defense_choices()
    assert list(choices) == ["baseline", "kd(a=0.5)", "kd(a=0.9)", "pgd(distill.a=0.5, distill.temperature=1.0)",
                             "pgd(distill.a=0.5, distill.temperature=2.0)"]
    assert choices["pgd(distill.a=0.5, distill.temperature=2.0)"][1] == {
        "epsilon": 0.01, "distill": {"a": 0.5, "temperature": 2.0}}
    old = parse_spec({"name": "s", "defenses": [{"name": "h", "method": "fast"}], "attacks": ATTACKS,
                      "search": {"sources": ["baseline", "h"]}})
    assert old.search.defenses == ["baseline", "h"]  # 'sources' is still read, as the defense dimension
    with pytest.raises(TightropeError, match="sources is the former name of defenses"):
        parse_spec({"name": "s", "attacks": ATTACKS, "search": {"sources": ["baseline"], "defenses": ["baseline"]}})
    with pytest.raises(TightropeError, match=r"search\.defenses\.1: 'nope' is neither baseline nor a defense"):
        parse_spec({"name": "s", "attacks": ATTACKS, "search": {"defenses": ["baseline", "nope"]}})
    with pytest.raises(TightropeError, match=r"search\.defenses\.1: the setting 'fast' appears twice"):
        parse_spec({"name": "s", "attacks": ATTACKS, "search": {"defenses": [{"method": "fast"}, {"method": "fast"}]}})
    with pytest.raises(TightropeError, match=r"search\.defenses\.0\.name: 'baseline' is a model of the study"):
        parse_spec({"name": "s", "attacks": ATTACKS, "search": {"defenses": [{"name": "baseline", "method": "fast"}]}})
    with pytest.raises(TightropeError, match=r"unknown key 'search\.defenses\.0\.parms' \(allowed here: name, method"):
        parse_spec({"name": "s", "attacks": ATTACKS, "search": {"defenses": [{"method": "fast", "parms": {}}]}})
    a, b = (parse_spec({"name": "s", "attacks": ATTACKS, "search": {"defenses": d, "trials": t}})
            for d, t in ((["baseline"], 5), (["baseline", {"method": "fast"}], 5)))
    assert a.fingerprint() == b.fingerprint() and a.search.fingerprint() != b.search.fingerprint()


def test_search_front_table_and_figure_are_written(tmp_path, fake_steps):
    from tightrope.report.render import render_search
    from tightrope.study.runner import write_result
    from tightrope.study.search import Constraints, summarize

    spec = _spec(**GRID)
    study = _search(spec, tmp_path)
    summary = summarize(study, ["maximize", "minimize", "minimize"], Constraints(min_accuracy=0.8))
    assert summary["trade_off"]["front"]
    write_result(tmp_path / "run" / "search" / "search.json", summary)
    out = render_search(tmp_path / "run")
    assert out["figure"] == tmp_path / "run" / "search" / "front.png"
    assert out["figure"].read_bytes()[:4] == b"\x89PNG" and out["figure"].stat().st_size > 10_000
    md = out["markdown"].read_text()
    header = ("| trial | defense | compression | accuracy | strongest ASR | deepwordbug ASR | textfooler ASR "
              "| latency (x baseline) | latency (ms) | chosen |")
    assert header in md
    front = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| trial")]
    assert len(front) >= len(summary["trade_off"]["front"])
    assert any("fast(epsilon=0.02)" in line for line in front) or any("baseline" in line for line in front)
    assert sum("| yes" in line for line in front) == 1  # the chosen model is marked


def test_study_report_draws_the_search_front(tmp_path):
    from tightrope.report.render import render_report

    root = tmp_path
    spec = {"name": "demo", "compress": [], "defenses": [], "attacks": [{"recipe": "deepwordbug", "n": 2}], "report": {}}
    ev = {"metrics": {"accuracy": 0.8, "macro_f1": 0.79}, "latency": {"median_ms": 9.0, "p95_ms": 10.0}}
    d = root / "steps" / "evaluate-0"
    d.mkdir(parents=True)
    (d / "result.json").write_text(json.dumps({"result": ev}))
    (root / "run.json").write_text(json.dumps({"steps": [{"name": "evaluate/baseline", "kind": "evaluate",
                                                          "dir": "steps/evaluate-0"}]}))
    (root / "spec.json").write_text(json.dumps(spec))
    trials = [{"number": i, "params": {"defense": dfn, "quant": q, "sparsity": s, "structured": False},
               "values": {"accuracy": a, "asr": r, "latency_ms": ms},
               "attrs": {"defense": dfn, "asr_by_attack": {"deepwordbug": r}, "strongest_attack": "deepwordbug"}}
              for i, (dfn, q, s, a, r, ms) in enumerate([("baseline", "none", 0.0, 0.85, 0.6, 10),
                                                         ("a2t(query_budget=50)", "Int8Dynamic", 0.0, 0.84, 0.3, 6),
                                                         ("baseline", "NF4", 0.5, 0.70, 0.7, 9)])]
    (root / "search").mkdir()
    (root / "search" / "search.json").write_text(json.dumps({
        "objectives": ["accuracy", "asr", "latency_ms"], "trials": trials, "front": [0, 1], "chosen": {"number": 1},
        "trade_off": {"objectives": ["accuracy", "asr", "latency_ms"], "front": [0, 1]}}))
    out = render_report(root)
    assert (root / "report_files" / "search_front.png").read_bytes()[:4] == b"\x89PNG"
    page = out["html"].read_text()
    assert 'id="search_front"' in page and 'id="pareto_front"' not in page
    md = out["markdown"].read_text()
    row = next(line for line in md.splitlines() if line.startswith("| 1 |"))
    assert "a2t(query_budget=50)" in row and "Int8Dynamic" in row and "30.0%" in row and row.rstrip().endswith("| yes |")
    assert not any(line.startswith("| 2 |") for line in md.splitlines())  # dominated: not in the front's table


@pytest.mark.slow
def test_search_trains_each_defense_setting_then_compresses_it(tmp_path, tokenizer, tiny_task):
    """The real step kinds on a tiny fine-tuned model: two settings of the fast defense beside the baseline,
    with and without int8; PGD (embedding space) and DeepWordBug (text) both attack every trial."""
    from conftest import make_tiny_classifier

    from tightrope.models import save_model
    from tightrope.study.search import search_study

    model = make_tiny_classifier(tokenizer)
    model.config.id2label, model.config.label2id = {0: "negative", 1: "positive"}, {"negative": 0, "positive": 1}
    source = save_model((model, tokenizer), tmp_path / "tiny")
    spec = parse_spec({
        "name": "search", "model": {"source": str(source), "fine_tuned": True},
        "data": {"task": str(tiny_task), "n_eval": 8, "n_test": 16, "max_length": 32},
        "train": {"n_train": 16, "epochs": 1, "batch_size": 8, "lr": 1e-3},
        "attacks": [{"recipe": "pgd", "n": 8, "params": {"epsilons": [0.05], "steps": 2, "batch_size": 4}},
                    {"recipe": "deepwordbug", "n": 4}],
        "evaluate": {"speed": True, "latency_runs": 3, "memory": False},
        "search": {"trials": 6, "defenses": ["baseline", {"method": "fast", "params": {"epsilon": [0.01, 0.05]}}],
                   "quant": ["none", "Int8Dynamic"], "sparsity": [0.0]}})
    study = search_study(spec, tmp_path / "run", progress=False)
    assert len(study.trials) == 6 and all(t.state.name == "COMPLETE" for t in study.trials)
    steps = Counter(json.loads(f.read_text())["kind"] for f in (tmp_path / "run" / "steps").glob("*/result.json"))
    assert steps == {"use-model": 1, "defend": 2, "compress": 3, "evaluate": 6, "attack": 6, "attack-embedding": 6,
                     "relative-latency": 6}
    for t in study.trials:
        assert set(t.user_attrs["asr_by_attack"]) == {"pgd", "deepwordbug"}
        assert t.values[1] == max(v or 0.0 for v in t.user_attrs["asr_by_attack"].values())
        assert Path(t.user_attrs["model_dir"]).is_dir()


STUDIES = Path(__file__).resolve().parents[1] / "studies"


@pytest.mark.parametrize("name", sorted(p.name for p in STUDIES.glob("*.yaml")))
def test_shipped_search_sections_pass_preflight_and_are_grids(name):
    from tightrope.study.search import preflight_search
    from tightrope.study.spec import load_spec

    spec = load_spec(STUDIES / name)
    if spec.search is None:
        pytest.skip(f"{name} has no search section")
    preflight_search(spec)  # every defense setting and quantization method, as the search checks them
    assert spec.search.resolved_sampler() == "grid"  # small enough to measure every setting once


def test_the_search_command_writes_the_front_and_exports_the_choice(tmp_path, fake_steps):
    from tightrope.cli import app

    study = tmp_path / "s.yaml"
    study.write_text(json.dumps({"name": "s", "data": {"task": "rotten-tomatoes"}, "attacks": ATTACKS,
                                 "search": {**GRID, "trials": 12}}))
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["search", str(study), "--out", str(out), "--min-accuracy", "0.8",
                                      "--export", str(tmp_path / "chosen")])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "search" / "search.json").read_text())
    assert len(summary["trials"]) == 12 and summary["trade_off"]["front"]
    assert (out / "search" / "front.png").read_bytes()[:4] == b"\x89PNG"
    assert "| trial | defense | compression |" in (out / "search" / "front.md").read_text()
    card = json.loads((tmp_path / "chosen" / "card.json").read_text())
    assert card["search"]["params"]["defense"] == summary["chosen"]["params"]["defense"]
    assert summary["chosen"]["values"]["accuracy"] >= 0.8
