"""Studies and searches on Ray: `tightrope run --ray local` gives a local run's results, step by step;
`tightrope search --ray local` completes its trials through the store, each setting once, and a second
invocation resumes from the store; the dry run counts the steps left; bad addresses are one sentence.

Skipped, with the reason, where Ray is not installed (it is in requirements.lock, so CI has it).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tests.test_study_finetuned import tiny_model_dir  # noqa: F401 - the fixture: a tiny model with the task's labels
from tightrope.cli import app

NEEDS_RAY = "Ray is not installed (pip install 'ray==2.60.0'; requirements.lock has it)"


def study_file(tmp_path: Path, model_dir: Path, task: Path, **extra) -> Path:
    """A study of seconds: the tiny model as the baseline, an int8 variant, both evaluated and attacked."""
    spec = {
        "name": "tiny-ray",
        "model": {"source": str(model_dir), "fine_tuned": True},
        "data": {"task": str(task), "n_eval": 8, "n_test": 8, "max_length": 32},
        "compress": [{"name": "int8", "steps": [{"method": "Int8Dynamic", "params": {"backend": "torch"}}]}],
        "attacks": [{"recipe": "deepwordbug", "n": 4}],
        "evaluate": {"speed": False, "memory": False},
        "report": {"html": False},
        **extra,
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture
def local_ray(monkeypatch):
    """A Ray instance inside the test process (started by the command under test), stopped in teardown."""
    ray = pytest.importorskip("ray", reason=NEEDS_RAY)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    yield ray
    if ray.is_initialized():
        ray.shutdown()


def invoke(*args: str):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


TIMING = ("seconds", "time", "latency", "rss", "throughput", "per_minute", "environment")


def untimed(value):
    """A result without its timings (they differ between any two runs) and its environment (a Ray worker has
    one torch thread)."""
    if isinstance(value, dict):
        return {k: untimed(v) for k, v in value.items() if not any(t in k for t in TIMING)}
    if isinstance(value, list):
        return [untimed(v) for v in value]
    return value


def step_results(run: Path) -> dict[str, dict]:
    manifest = json.loads((run / "run.json").read_text())
    return {s["name"]: untimed(json.loads((run / s["dir"] / "result.json").read_text())["result"])
            for s in manifest["steps"]}


def test_the_dry_run_counts_the_steps_left_and_runs_nothing(tmp_path, tiny_model_dir, tiny_task, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # the dry run needs no Ray
    study = study_file(tmp_path, tiny_model_dir, tiny_task)
    out = invoke("run", study, "--out", tmp_path / "run", "--dry-run", "--workers", "3").output
    assert "6 tasks: 6 of 6 study steps still to run (0 already in the run folder)" in out
    assert "attack deepwordbug, per example: 0.94 s" in out  # the attack dry run's table, short texts
    assert "not estimated" in out and "compress 1" in out and "on 3 workers" in out
    assert not (tmp_path / "run").exists()


def test_the_search_dry_run_prices_every_point_once_and_runs_nothing(tmp_path, tiny_model_dir, tiny_task, monkeypatch):
    import sys

    from tightrope.study.distributed import plan_search
    from tightrope.study.spec import load_spec

    monkeypatch.setitem(sys.modules, "ray", None)  # the dry run needs no Ray
    study = study_file(tmp_path, tiny_model_dir, tiny_task, search=SEARCH)
    spec = load_spec(study)
    plan = plan_search(spec, tmp_path / "run")
    points = spec.search.space_size()
    kinds = [step.kind for step, _ in plan.todo]
    # every point is evaluated and attacked once; the baseline they share appears once
    assert kinds.count("evaluate") == points and kinds.count("attack") == points * len(spec.attacks)
    assert len({step.name for step, _ in plan.todo}) == len(plan.todo)
    out = invoke("search", study, "--out", tmp_path / "run", "--dry-run", "--trials", "1").output
    assert f"the space has {points} points and the search runs 1 trials" in out
    assert f"{len(plan.todo)} tasks" in out and "attack deepwordbug, per example" in out
    assert not (tmp_path / "run").exists()


def test_run_on_local_ray_equals_a_local_run_and_a_rerun_resumes(tmp_path, tiny_model_dir, tiny_task, local_ray,
                                                                 monkeypatch):
    import sys

    study = study_file(tmp_path, tiny_model_dir, tiny_task)
    with monkeypatch.context() as without_ray:
        without_ray.setitem(sys.modules, "ray", None)  # a local run needs no Ray
        invoke("run", study, "--out", tmp_path / "local")
    out = invoke("run", study, "--out", tmp_path / "ray", "--ray", "local", "--workers", "2").output
    assert "6 step(s) to run on Ray (local), 2 at a time" in out and local_ray.is_initialized()
    local, on_ray = step_results(tmp_path / "local"), step_results(tmp_path / "ray")
    assert list(on_ray) == list(local) and len(local) == 6
    assert on_ray == local
    assert (tmp_path / "ray" / "report.md").exists()
    # a step lost half-way (its result.json gone) is the only one run again; the others are read back
    manifest = json.loads((tmp_path / "ray" / "run.json").read_text())
    attack = next(s for s in manifest["steps"] if s["name"] == "attack/deepwordbug/int8")
    kept = {s["name"]: (tmp_path / "ray" / s["dir"] / "result.json").stat().st_mtime_ns for s in manifest["steps"]}
    (tmp_path / "ray" / attack["dir"] / "result.json").unlink()
    dry = invoke("run", study, "--out", tmp_path / "ray", "--dry-run").output
    assert "1 tasks: 1 of 6 study steps still to run (5 already in the run folder): attack 1" in dry
    assert "measured in this run: 4 examples" in dry  # the finished attack step's own seconds per example
    out = invoke("run", study, "--out", tmp_path / "ray", "--ray", "local", "--workers", "2").output
    assert "1 step(s) to run on Ray (local)" in out
    for name, mtime in kept.items():
        again = (tmp_path / "ray" / next(s["dir"] for s in manifest["steps"] if s["name"] == name) / "result.json")
        assert (again.stat().st_mtime_ns == mtime) == (name != attack["name"])
    assert step_results(tmp_path / "ray") == local


SEARCH = {"trials": 4, "quant": ["none", "Int8Dynamic"], "sparsity": [0.0, 0.5], "objectives": ["accuracy", "asr"]}


def test_search_on_local_ray_runs_each_setting_once_and_resumes(tmp_path, tiny_model_dir, tiny_task, local_ray):
    import optuna
    from optuna.trial import TrialState

    study = study_file(tmp_path, tiny_model_dir, tiny_task, search=SEARCH)
    url = f"sqlite:///{tmp_path / 'store.db'}"
    common = ["search", study, "--out", tmp_path / "run", "--storage", url, "--study-name", "s", "--ray", "local",
              "--workers", "2"]
    assert "2 trial(s) to run on Ray (local), 2 at a time" in invoke(*common, "--trials", "2").output
    store = optuna.load_study(study_name="s", storage=url)
    first = {t.number: t for t in store.get_trials(states=(TrialState.COMPLETE,))}
    assert len(first) == 2 and {t.user_attrs["worker"] for t in first.values()} <= {0, 1}
    assert "2 trial(s) to run on Ray" in invoke(*common).output  # the study's 4: two more, the first two kept
    store = optuna.load_study(study_name="s", storage=url)
    trials = store.get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(trials) == len(complete) == 4  # nothing run twice, nothing left running
    assert len({tuple(sorted(t.params.items())) for t in complete}) == 4  # each grid point once
    for number, old in first.items():
        assert store.trials[number].datetime_complete == old.datetime_complete  # not measured again
    summary = json.loads((tmp_path / "run" / "search" / "search.json").read_text())
    assert len(summary["trials"]) == 4 and not summary["duplicates"]
    assert "already holds the 4 trial(s)" in invoke(*common).output  # the grid is finished: nothing to do
    assert len(optuna.load_study(study_name="s", storage=url).get_trials()) == 4


def test_an_unreachable_address_is_one_sentence_for_run_and_search(tmp_path, tiny_model_dir, tiny_task):
    pytest.importorskip("ray", reason=NEEDS_RAY)
    from tests.test_sweep_ray import free_port

    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    study = study_file(tmp_path, tiny_model_dir, tiny_task, search=SEARCH)
    for args, kept in ((["run", study, "--out", tmp_path / "run"], "finished step"),
                       (["search", study, "--out", tmp_path / "search"], "finished trial")):
        result = CliRunner().invoke(app, [str(a) for a in args] + ["--ray", address])
        assert result.exit_code == 2, result.output
        text = " ".join(result.output.split())
        assert f"No Ray head node answers at {address}" in text and kept in text and "Traceback" not in result.output


def test_a_worker_that_does_not_see_the_run_folder_is_one_sentence(tmp_path):
    from tightrope.errors import TightropeError
    from tightrope.study.distributed import check_run_folder

    with pytest.raises(TightropeError) as err:
        check_run_folder(tmp_path / "elsewhere", {"kind": "tightrope.study", "name": "x"})
    text = str(err.value)
    assert "does not see the run folder" in text and "same path" in text and "\n" not in text


def test_a_version_mismatch_names_what_the_run_keeps():
    from tightrope.study.distributed import STEPS_RESUME, TRIALS_RESUME
    from tightrope.workflows.ray_backend import version_mismatch

    ray_text = ("Version mismatch: The cluster was started with:\n    Ray: 2.60.0\n    Python: 3.11.7\n"
                "This process on node 10.0.0.2 was started with:\n    Ray: 2.59.0\n    Python: 3.11.7\n")
    for resume, kept in ((STEPS_RESUME, "finished step"), (TRIALS_RESUME, "finished trial")):
        text = version_mismatch(ray_text, "10.0.0.1:6379", resume)
        assert "ray==2.60.0" in text and kept in text and "\n" not in text


@pytest.mark.slow
def test_run_on_ray_resumes_after_a_killed_worker_and_a_killed_driver(tmp_path, tiny_model_dir):
    """A Ray worker is killed (SIGKILL) in the middle of an attack step, then the driver is killed; the same
    command run again finishes, every step once, with the results of a local run."""
    import os
    import random
    import signal
    import subprocess
    import sys
    import time

    import pandas as pd

    from tests.conftest import NEGATIVE, POSITIVE
    from tightrope.study.plan import run_study
    from tightrope.study.spec import load_spec

    pytest.importorskip("ray", reason=NEEDS_RAY)
    psutil = pytest.importorskip("psutil")
    rng = random.Random(0)
    rows = [(" and ".join(rng.sample(POSITIVE if k % 2 else NEGATIVE, 4)), "positive" if k % 2 else "negative")
            for k in range(40)]  # long enough sentences that PWWS takes a while on each
    task = tmp_path / "long.csv"
    pd.DataFrame(rows, columns=["text", "label"]).to_csv(task, index=False)
    study = study_file(tmp_path, tiny_model_dir, task, attacks=[{"recipe": "pwws", "n": 16}])
    run_study(load_spec(study), tmp_path / "local", progress=False, report=False)
    command = [sys.executable, "-m", "tightrope.cli", "run", str(study), "--out", str(tmp_path / "ray"), "--ray", "local",
               "--workers", "1", "--no-report"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    attacked = lambda: sum(len(f.read_text().splitlines()) for f in (tmp_path / "ray").glob("steps/attack-*/attack/results.jsonl"))  # noqa: E731

    def wait_for(check, what: str) -> None:
        deadline = time.monotonic() + 240
        while not check():
            assert driver.poll() is None, f"the run ended before {what}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.1)

    driver = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: attacked() >= 2, "the first attacked examples")
        workers = [p for p in psutil.Process(driver.pid).children(recursive=True)
                   if any("_step_task" in part for part in p.cmdline())]
        assert workers, "no Ray worker is running a step"
        for worker in workers:
            worker.kill()  # the worker, mid-step: Ray runs its task again
        killed_at = attacked()
        wait_for(lambda: attacked() >= killed_at + 2, "results after the worker's restart")
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver, mid-run, and the Ray it started
        driver.wait(timeout=60)
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert step_results(tmp_path / "ray") == step_results(tmp_path / "local")
    for results in (tmp_path / "ray").glob("steps/attack-*/attack/results.jsonl"):
        indices = [json.loads(line)["index"] for line in results.read_text().splitlines()]
        assert sorted(indices) == list(range(16))  # every example once
