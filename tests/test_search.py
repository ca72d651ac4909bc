"""Multi-objective search: Pareto maths, constrained choice, two workers sharing SQLite / PostgreSQL."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tightrope.errors import TightropeError
from tightrope.study.search import Constraints, choose, dominates, export_choice, pareto_front

MIN2 = ("minimize", "minimize")


def test_dominance_and_front():
    assert dominates([1, 1], [1, 2], MIN2)
    assert not dominates([1, 2], [1, 2], MIN2)  # equal points do not dominate each other
    assert not dominates([0, 3], [1, 2], MIN2)
    assert dominates([0.9, 10], [0.8, 12], ("maximize", "minimize"))
    points = [[1, 5], [2, 2], [3, 3], [5, 1], [2, 2]]
    assert pareto_front(points, MIN2) == [0, 1, 3, 4]


def test_choice_under_constraints_minimizes_asr():
    cands = [{"number": 0, "values": {"accuracy": 0.90, "asr": 0.5, "latency_ms": 40}},
             {"number": 1, "values": {"accuracy": 0.88, "asr": 0.3, "latency_ms": 25}},
             {"number": 2, "values": {"accuracy": 0.80, "asr": 0.1, "latency_ms": 10}}]
    assert choose(cands, Constraints(max_latency_ms=30, min_accuracy=0.87))["number"] == 1
    assert choose(cands, Constraints())["number"] == 2
    assert choose(cands, Constraints(), prefer="accuracy")["number"] == 0
    with pytest.raises(TightropeError, match="No model on the Pareto front meets"):
        choose(cands, Constraints(min_accuracy=0.95))


def test_export_copies_model_and_records_search_in_card(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "card.json").write_text('{"kind": "tightrope.model"}')
    (model / "model.safetensors").write_bytes(b"x")
    chosen = {"number": 3, "params": {"quant": "NF4"}, "values": {"asr": 0.2}, "attrs": {"model_dir": str(model)}}
    out = export_choice(chosen, tmp_path / "export")
    import json

    card = json.loads((out / "card.json").read_text())
    assert card["search"]["trial"] == 3 and card["kind"] == "tightrope.model"
    assert (out / "model.safetensors").exists()
    with pytest.raises(TightropeError, match="already exists"):
        export_choice(chosen, tmp_path / "export")


WORKER = textwrap.dedent("""
    import sys
    from tightrope.study.search import TOY_OBJECTIVES, run_search, toy_objective
    run_search(toy_objective, TOY_OBJECTIVES, storage=sys.argv[1], study_name="toy", n_trials=int(sys.argv[2]),
               worker=int(sys.argv[3]), sampler="nsga2")
""")


def _two_workers(tmp_path: Path, url: str, n_trials: int = 40) -> None:
    import optuna

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    procs = [subprocess.Popen([sys.executable, str(script), url, str(n_trials), str(w)], stderr=subprocess.PIPE, text=True)
             for w in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    from tightrope.study.search import TOY_OBJECTIVES, open_storage, summarize

    study = optuna.load_study(study_name="toy", storage=open_storage(url))
    summary = summarize(study, [d for _, d in TOY_OBJECTIVES])
    trials = summary["trials"]
    assert len(trials) >= n_trials
    assert {t["attrs"]["worker"] for t in trials} == {0, 1}  # both workers did trials
    front = [t for t in trials if t["number"] in summary["front"]]
    assert front
    for p in front:  # no point of the front is dominated by any complete trial
        for q in trials:
            assert not dominates([q["values"]["f1"], q["values"]["f2"]], [p["values"]["f1"], p["values"]["f2"]], MIN2)
    assert {t.number for t in study.best_trials} == set(summary["front"])  # agrees with Optuna


def test_two_workers_share_one_sqlite_store(tmp_path):
    _two_workers(tmp_path, f"sqlite:///{tmp_path / 'search.db'}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _postgres_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for version in sorted(Path("/usr/lib/postgresql").glob("*"), reverse=True):
        if (version / "bin" / name).exists():
            return str(version / "bin" / name)
    return None


@pytest.mark.skipif(_postgres_bin("pg_ctl") is None, reason="PostgreSQL is not installed (Debian: apt-get install postgresql)")
def test_two_workers_share_one_postgresql_store_on_loopback(tmp_path):
    pytest.importorskip("psycopg2", reason="the PostgreSQL driver psycopg2 is not installed")
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="tightrope-pg-"))  # pytest's tmp_path is private to root
    data, sock = base / "pg", base / "sock"
    sock.mkdir()
    prefix = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root: run it as 'nobody'
        runuser = shutil.which("runuser")
        if runuser is None:
            pytest.skip("running as root and no runuser to start PostgreSQL as another user")
        prefix = [runuser, "-u", "nobody", "--"]
        for path in (base, sock):
            shutil.chown(path, "nobody")
    port = _free_port()
    init = subprocess.run([*prefix, _postgres_bin("initdb"), "-D", str(data), "-U", "tightrope", "--auth=trust"],
                          capture_output=True, text=True, timeout=120)
    if init.returncode != 0:
        pytest.skip(f"initdb failed here: {init.stderr.strip()[-300:]}")
    log = base / "pg.log"
    start = subprocess.run([*prefix, _postgres_bin("pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-o",
                            f"-p {port} -k {sock} -c listen_addresses=127.0.0.1", "start"],
                           capture_output=True, text=True, timeout=120)
    if start.returncode != 0:
        pytest.skip(f"PostgreSQL did not start here: {start.stderr.strip()[-300:]}")
    try:
        _two_workers(tmp_path, f"postgresql+psycopg2://tightrope@127.0.0.1:{port}/postgres", n_trials=30)
    finally:
        subprocess.run([*prefix, _postgres_bin("pg_ctl"), "-D", str(data), "-m", "fast", "stop"], capture_output=True,
                       timeout=120)
        shutil.rmtree(base, ignore_errors=True)


def test_study_search_runs_trials_through_cached_steps(tmp_path, monkeypatch):
    """The study's objective with fake step kinds: trials reuse steps, values come from the results."""
    import tightrope.study.plan  # noqa: F401 - registers the real step kinds first, so the fakes below win
    from tightrope.study import runner
    from tightrope.study.search import OBJECTIVES, run_search, study_objective, summarize
    from tightrope.study.spec import parse_spec

    calls: list[str] = []

    def model_step(inputs, deps, ctx):
        calls.append(ctx.step.kind)
        (ctx.workdir / "model").mkdir()
        (ctx.workdir / "model" / "card.json").write_text("{}")
        sparsity = sum(s["params"].get("sparsity", 0) for s in inputs.get("steps", []))
        quant = sum(s["method"] == "Int8Dynamic" for s in inputs.get("steps", []))
        return {"model_dir": ctx.rel(ctx.workdir / "model"), "sparsity": sparsity, "quant": quant}

    def evaluate(inputs, deps, ctx):
        m = deps[ctx.step.deps[0]]
        s, q = m.get("sparsity", 0), m.get("quant", 0)
        return {"metrics": {"accuracy": 0.9 - 0.2 * s - 0.01 * q}, "latency": {"median_ms": 10 - 5 * q - 4 * s}}

    def attack(inputs, deps, ctx):
        return {"attack_success_rate": 0.5 - 0.1 * deps[ctx.step.deps[0]].get("sparsity", 0)}

    def relative_latency(inputs, deps, ctx):
        m, baseline = (deps[name] for name in ctx.step.deps)
        ms = 10 - 5 * m.get("quant", 0) - 4 * m.get("sparsity", 0)
        assert baseline.get("sparsity", 0) == 0 and baseline.get("quant", 0) == 0  # timed against the baseline
        return {"ratio": ms / 10, "ratio_q25": ms / 10, "ratio_q75": ms / 10, "model_ms": ms, "reference_ms": 10,
                "pairs": 3}

    for name, fn in (("train", model_step), ("compress", model_step), ("evaluate", evaluate), ("attack", attack),
                     ("relative-latency", relative_latency)):
        monkeypatch.setitem(runner.STEP_KINDS, name, runner.StepKind(name, fn))
    spec = parse_spec({"name": "s", "attacks": [{"recipe": "deepwordbug", "n": 5}],
                       "search": {"trials": 12, "quant": ["none", "Int8Dynamic"], "sparsity": [0.0, 0.5],
                                  "objectives": ["accuracy", "asr", "latency_ms"], "sampler": "random"}})
    objectives = [(o, OBJECTIVES[o]) for o in spec.search.objectives]
    study = run_search(study_objective(spec, tmp_path / "run"), objectives, storage=f"sqlite:///{tmp_path / 's.db'}",
                       study_name="s", n_trials=12)
    assert calls.count("train") == 1  # the baseline is trained once for all trials
    assert calls.count("compress") <= 3  # three distinct compressed variants at most, each made once
    summary = summarize(study, [d for _, d in objectives], Constraints(min_accuracy=0.85))
    chosen = summary["chosen"]
    assert chosen["values"]["accuracy"] >= 0.85
    assert Path(chosen["attrs"]["model_dir"]).is_dir()
    # 4 distinct settings; the best ASR at accuracy >= 0.85 is sparsity 0 (0.5), either quantization.
    assert chosen["values"]["asr"] == 0.5
