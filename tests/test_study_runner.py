"""The study runner: cached steps, atomic results, resume after kill -9, refusing foreign run folders."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tightrope.errors import TightropeError
from tightrope.study.runner import STEP_KINDS, Step, register_step, run_steps

CALLS: list[str] = []


@pytest.fixture(autouse=True)
def fake_kinds():
    @register_step("fake_sum")
    def fake_sum(inputs, deps, ctx):
        CALLS.append(ctx.step.name)
        (ctx.workdir / "artefact.txt").write_text(str(inputs["value"]))
        return {"total": inputs["value"] + sum(d["total"] for d in deps.values())}

    CALLS.clear()
    yield
    STEP_KINDS.pop("fake_sum", None)


def diamond(b_value: int = 2) -> list[Step]:
    return [
        Step("a", "fake_sum", {"value": 1}),
        Step("b", "fake_sum", {"value": b_value}, ("a",)),
        Step("c", "fake_sum", {"value": 3}, ("a",)),
        Step("d", "fake_sum", {"value": 4}, ("b", "c")),
    ]


def test_results_flow_through_dependencies(tmp_path):
    run = run_steps(diamond(), tmp_path / "run", progress=False)
    assert run.result("d")["total"] == 4 + (2 + 1) + (3 + 1)
    assert CALLS == ["a", "b", "c", "d"]
    manifest = json.loads((tmp_path / "run" / "run.json").read_text())
    assert [s["name"] for s in manifest["steps"]] == ["a", "b", "c", "d"]


def test_cached_step_is_not_recomputed(tmp_path):
    run_steps(diamond(), tmp_path, progress=False)
    CALLS.clear()
    again = run_steps(diamond(), tmp_path, progress=False)
    assert CALLS == []
    assert all(r.cached for r in again.records.values())
    # Changing b's input recomputes b and what depends on it, nothing else.
    changed = run_steps(diamond(b_value=5), tmp_path, progress=False)
    assert CALLS == ["b", "d"]
    assert changed.result("d")["total"] == 4 + 6 + 4


def test_unknown_kind_and_bad_order_fail_before_any_work(tmp_path):
    with pytest.raises(TightropeError, match="Unknown step kind 'nope'"):
        run_steps([Step("a", "fake_sum", {"value": 1}), Step("x", "nope", {})], tmp_path, progress=False)
    with pytest.raises(TightropeError, match="depends on"):
        run_steps([Step("b", "fake_sum", {"value": 1}, ("a",)), Step("a", "fake_sum", {"value": 1})], tmp_path,
                  progress=False)
    assert CALLS == []


def test_out_dir_holding_another_study_is_refused(tmp_path):
    run_steps(diamond(), tmp_path, identity={"name": "one", "fingerprint": "1"}, progress=False)
    with pytest.raises(TightropeError, match="holds a different study"):
        run_steps(diamond(), tmp_path, identity={"name": "two", "fingerprint": "2"}, progress=False)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(TightropeError, match="not empty"):
        run_steps(diamond(), other, identity={"name": "one", "fingerprint": "1"}, progress=False)


def test_an_edited_study_takes_its_folder_over_only_with_update(tmp_path):
    run_steps(diamond(), tmp_path, identity={"name": "one", "fingerprint": "1"}, progress=False)
    CALLS.clear()
    with pytest.raises(TightropeError, match="--update"):
        run_steps(diamond(b_value=5), tmp_path, identity={"name": "one", "fingerprint": "2"}, progress=False)
    with pytest.raises(TightropeError, match="holds a different study"):  # another study's name: never
        run_steps(diamond(), tmp_path, identity={"name": "two", "fingerprint": "2"}, progress=False, update=True)
    run_steps(diamond(b_value=5), tmp_path, identity={"name": "one", "fingerprint": "2"}, progress=False, update=True)
    assert CALLS == ["b", "d"]  # only what the edit changed ran again
    run_steps(diamond(b_value=5), tmp_path, identity={"name": "one", "fingerprint": "2"}, progress=False)  # now its own


def test_full_disk_leaves_no_corrupt_result(tmp_path, monkeypatch):
    # the runner writes through tightrope.atomic, which calls os.fsync

    real_fsync = os.fsync
    state = {"writes": 0}

    def failing_fsync(fd):
        state["writes"] += 1
        if state["writes"] == 3:  # the third result written (step c) hits a full disk
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(TightropeError, match="disk is full"):
        run_steps(diamond(), tmp_path, progress=False)
    leftovers = [p for p in tmp_path.rglob("*") if p.name.startswith(".result.json")]
    assert leftovers == []
    for result in tmp_path.rglob("result.json"):
        json.loads(result.read_text())  # every result file present is complete
    assert len(list(tmp_path.rglob("result.json"))) == 2
    monkeypatch.setattr(os, "fsync", real_fsync)
    CALLS.clear()
    run = run_steps(diamond(), tmp_path, progress=False)
    assert CALLS == ["c", "d"]  # a and b were finished and are not redone
    assert run.result("d")["total"] == 11


SCRIPT = textwrap.dedent("""
    import sys, time
    from tightrope.study.runner import Step, register_step, run_steps

    root, log = sys.argv[1], sys.argv[2]

    @register_step("slow_sum")
    def slow_sum(inputs, deps, ctx):
        with open(log, "a") as f:
            f.write(ctx.step.name + "\\n")
        for i in range(3):  # an artefact written in pieces, so kills land half-way through it
            with open(ctx.workdir / "artefact.txt", "a") as f:
                f.write(str(i))
            time.sleep(inputs["sleep"])
        return {"total": inputs["value"] * 10 + sum(d["total"] for d in deps.values())}

    steps = []
    for i in range(8):
        deps = tuple(f"s{j}" for j in range(max(0, i - 2), i))
        steps.append(Step(f"s{i}", "slow_sum", {"value": i, "sleep": 0.07}, deps))
    run_steps(steps, root, identity={"name": "fake", "fingerprint": "f"}, progress=False)
""")


def _finished(root: Path) -> set[str]:
    return {json.loads(p.read_text())["name"] for p in root.glob("steps/*/result.json")}


def _final(root: Path) -> dict[str, dict]:
    return {json.loads(p.read_text())["name"]: json.loads(p.read_text())["result"] for p in root.glob("steps/*/result.json")}


def test_kill_9_at_random_points_then_resume_gives_same_results(tmp_path):
    script = tmp_path / "fake_study.py"
    script.write_text(SCRIPT)
    clean = tmp_path / "clean"
    subprocess.run([sys.executable, str(script), str(clean), str(tmp_path / "clean.log")], check=True, timeout=120)
    expected = _final(clean)
    assert len(expected) == 8

    root, log = tmp_path / "killed", tmp_path / "killed.log"
    rng = random.Random(7)
    kills = 0
    checkpoints: list[tuple[int, set[str]]] = []  # (log lines so far, steps finished) at each kill
    for _ in range(40):
        proc = subprocess.Popen([sys.executable, str(script), str(root), str(log)])
        time.sleep(rng.uniform(0.3, 2.5) if kills < 6 else 0)
        if kills >= 6 or proc.poll() is not None:
            assert proc.wait(timeout=120) == 0
            break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += 1
        before = _finished(root)
        mark = len(log.read_text().splitlines()) if log.exists() else 0
        checkpoints.append((mark, before))
    started = log.read_text().splitlines()
    for mark, done in checkpoints:  # no run after a kill starts a step finished before it
        redone = set(started[mark:]) & done
        assert not redone, f"finished steps {redone} were run again"
    assert kills >= 1
    assert _final(root) == expected
    assert json.loads((root / "run.json").read_text())["steps"][-1]["name"] == "s7"

