"""Attack sweeps on Ray: a head node and a worker node on 127.0.0.1 (separate processes), a worker killed
mid-run and started again, and results equal to a local run, each example once.

Skipped, with the reason, where Ray is not installed (it is in requirements.lock, so CI has it).
"""

from __future__ import annotations

import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import NEGATIVE, POSITIVE
from tightrope.workflows.sweep import Cell, Sweep, plan, run_sweep

ROWS = [("a wonderful moving film", 1), ("a dull boring mess", 0), ("great acting and a superb script", 1),
        ("stupid and tedious", 0), ("i loved every minute of it", 1), ("a waste of time", 0)] * 2


def make_grid(root: Path, tokenizer, rows: list[tuple[str, int]]) -> Sweep:
    """Two tiny BERT variants: a 2 recipes x 2 variants grid."""
    from tests.conftest import make_tiny_classifier
    from tightrope import models

    card = {"format": "torch", "tokenization": {"max_length": 64, "truncation": "head"}}
    paths = {f"v{s}": str(models.save_model((make_tiny_classifier(tokenizer, seed=s), tokenizer), root / f"v{s}",
                                              extra={"card.json": card})) for s in (0, 1)}
    task = root / "toy.jsonl"
    task.write_text("\n".join(json.dumps({"text": t, "label": y}) for t, y in rows))
    cells = tuple(Cell(r, v, p, f"cells/{r}--{v}") for r in ("deepwordbug", "pwws") for v, p in paths.items())
    return Sweep(cells, task=str(task), seed=3)


@pytest.fixture()
def grid(tmp_path, tokenizer):
    """Twelve short sentences: a grid of 48 examples that runs in seconds."""
    return make_grid(tmp_path, tokenizer, ROWS)


@pytest.fixture()
def slow_grid(tmp_path, tokenizer):
    """Twenty-four sentences of four clauses each: PWWS takes about a second per attacked example here, so
    a worker can be killed while it has work."""
    rng = random.Random(0)
    rows = [(" and ".join(rng.sample(POSITIVE if k % 2 else NEGATIVE, 4)), k % 2) for k in range(24)]
    return make_grid(tmp_path, tokenizer, rows)


def rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]


def same_results(a: Path, b: Path) -> bool:
    key = lambda r: r["index"]  # noqa: E731
    return sorted((r | {"seconds": 0} for r in rows(a)), key=key) == sorted((r | {"seconds": 0} for r in rows(b)), key=key)


# --- without Ray ------------------------------------------------------------------------------------------------


def test_the_local_backend_resumes_and_the_plan_counts_what_is_left(grid, tmp_path):
    assert plan(grid, tmp_path / "run", shard_size=5).tasks == 3 * 4  # shards of 5, 5 and 2 per cell
    before = plan(grid, tmp_path / "run", shard_size=4)
    assert before.tasks == 3 * 4 and before.examples == 48 and before.finished == 0
    assert before.wall_seconds(2) < before.wall_seconds(1) <= before.cpu_seconds + 1e-9
    text = "\n".join(before.lines([1, 4]))
    assert "12 tasks" in text and "CPU hours" in text and "on 4 workers" in text

    class Stop(Exception):
        pass

    class Killer:  # a reporter that stops the run after 7 examples, as a kill would
        seen = 0

        def __call__(self, label, total, completed=0):
            return self

        def advance(self, n=1, info=""):
            Killer.seen += n
            if Killer.seen == 7:
                raise Stop

        def close(self):
            pass

        def say(self, text):
            pass

    with pytest.raises(Stop):
        run_sweep(grid, tmp_path / "run", progress=Killer())
    after = plan(grid, tmp_path / "run", shard_size=4)
    assert after.finished == 7 and after.tasks == 11  # example-major: 4 of the first cell, 3 of the second
    reports = run_sweep(grid, tmp_path / "run", progress=False)
    full = run_sweep(grid, tmp_path / "once", progress=False)
    for cell in grid.cells:
        assert same_results(tmp_path / "run" / cell.folder, tmp_path / "once" / cell.folder)
        indices = [r["index"] for r in rows(tmp_path / "run" / cell.folder)]
        assert sorted(indices) == list(range(len(ROWS)))  # nothing lost, nothing twice
        assert reports[cell].examples == len(ROWS) == full[cell].examples
    summary = json.loads((tmp_path / "run" / grid.cells[0].folder / "summary.json").read_text())
    assert summary["examples"] == len(ROWS)


def test_a_folder_of_another_attack_is_refused_before_any_work(grid, tmp_path):
    from dataclasses import replace

    from tightrope.errors import TightropeError

    run_sweep(replace(grid, cells=grid.cells[:1]), tmp_path / "run", progress=False)
    before = (tmp_path / "run" / grid.cells[0].folder / "results.jsonl").read_bytes()
    with pytest.raises(TightropeError, match="different attack"):
        run_sweep(replace(grid, cells=grid.cells[:1], seed=4), tmp_path / "run", progress=False)
    assert (tmp_path / "run" / grid.cells[0].folder / "results.jsonl").read_bytes() == before


def test_ray_missing_is_one_sentence(monkeypatch):
    from tightrope.errors import TightropeError
    from tightrope.workflows import ray_backend

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    with pytest.raises(TightropeError) as err:
        ray_backend.require_ray()
    text = str(err.value)
    assert "pip install" in text and "\n" not in text and text.endswith(".")


def test_attack_with_ray_missing_says_how_to_install_it(grid, monkeypatch):
    from typer.testing import CliRunner

    from tightrope.cli import app

    monkeypatch.setitem(sys.modules, "ray", None)
    cell = grid.cells[0]
    result = CliRunner().invoke(app, ["attack", cell.model, "--recipe", cell.recipe, "--task", grid.task, "--ray", "local"])
    assert result.exit_code == 2 and "pip install" in result.output and "Traceback" not in result.output


def test_worker_errors_are_one_sentence():
    from tightrope.errors import MissingResourceError, TightropeError
    from tightrope.workflows.ray_backend import worker_error

    class Wrapped(Exception):  # what Ray raises in the driver: the worker's exception as .cause
        def __init__(self, cause):
            super().__init__(f"ray::CellWorker.describe()\n  File ...\n{cause}")
            self.cause = cause

    missing = worker_error(Wrapped(MissingResourceError("WordNet 3.0 was not found at /x; run bash scripts/setup.sh.")), "worker 1 of 2")
    refused = worker_error(Wrapped(TightropeError("The task 't' has 3 labels but the model predicts 2.")), "worker 2 of 2")
    crashed = worker_error(Wrapped(ValueError("boom\nmore")), "worker 1 of 2")
    for err, words in ((missing, "lacks a packaged asset: WordNet"), (refused, "3 labels"), (crashed, "ValueError: boom")):
        text = str(err)
        assert words in text and "\n" not in text and "resume" in text and text.endswith(".")


def test_an_unreachable_address_is_one_sentence():
    from tightrope.errors import TightropeError
    from tightrope.workflows import ray_backend

    port = free_port()  # nothing listens there
    with pytest.raises(TightropeError) as err:
        ray_backend.check_reachable(f"127.0.0.1:{port}", timeout=2)
    text = str(err.value)
    assert f"127.0.0.1:{port}" in text and "ray start --head" in text and "\n" not in text and "resume" in text
    with pytest.raises(TightropeError, match="HOST:PORT"):
        ray_backend.check_reachable("nowhere")


def test_a_version_mismatch_is_one_sentence():
    from tightrope.workflows.ray_backend import version_mismatch

    ray_text = ("Version mismatch: The cluster was started with:\n    Ray: 2.60.0\n    Python: 3.11.7\n"
                "This process on node 10.0.0.2 was started with:\n    Ray: 2.59.0\n    Python: 3.11.7\n")
    text = version_mismatch(ray_text, "10.0.0.1:6379")
    assert "Ray 2.60.0" in text and "Ray 2.59.0" in text and "ray==2.60.0" in text and "\n" not in text
    assert version_mismatch("something else", "x:1") is None


# --- on a Ray cluster of two nodes --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Node:
    """One `ray start` and the daemons it leaves behind: it runs as the leader of a new session, so they
    all carry its process group id, its pid, and one killpg ends exactly them."""

    def __init__(self, args: list[str], env: dict):
        ray_cli = str(Path(sys.executable).parent / "ray")
        proc = subprocess.Popen([ray_cli, "start", *args, "--node-ip-address", "127.0.0.1", "--disable-usage-stats"],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.pgid = proc.pid
        output, _ = proc.communicate(timeout=120)
        if proc.returncode != 0:
            self.kill()
            raise RuntimeError(f"ray start {' '.join(args)} failed: {output[-2000:]}")

    def kill(self, sig=signal.SIGKILL) -> None:
        try:
            os.killpg(self.pgid, sig)
        except ProcessLookupError:
            pass


@pytest.fixture()
def cluster(monkeypatch):
    """A head node (1 CPU) and a worker node (1 CPU) on 127.0.0.1, with Ray's token authentication (a
    fresh token, given to the driver too); both stopped in teardown, always."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'ray==2.60.0'; requirements.lock has it)")
    temp = tempfile.mkdtemp(prefix="tr-ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    port = free_port()
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    for key, value in auth.items():
        monkeypatch.setenv(key, value)
    env = {**os.environ, **auth, "RAY_USAGE_STATS_ENABLED": "0", "RAY_health_check_period_ms": "1000",
           "RAY_health_check_failure_threshold": "3"}
    nodes = []
    try:
        nodes.append(Node(["--head", "--port", str(port), "--num-cpus", "1", "--temp-dir", temp,
                           "--include-dashboard=false"], env))
        address = f"127.0.0.1:{port}"
        worker = lambda: Node(["--address", address, "--num-cpus", "1"], env)  # noqa: E731
        nodes.append(worker())
        yield {"address": address, "nodes": nodes, "start_worker": lambda: nodes.append(worker()) or nodes[-1]}
    finally:
        if ray.is_initialized():
            ray.shutdown()
        for node in reversed(nodes):
            node.kill(signal.SIGTERM)
        time.sleep(1)
        for node in reversed(nodes):
            node.kill(signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


ROOT = Path(__file__).resolve().parents[1]


def lines_in(out: Path) -> int:
    return sum(len((f).read_text().splitlines()) for f in out.glob("cells/*/results.jsonl"))


def wait_for(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.mark.slow
def test_a_grid_on_two_nodes_survives_a_killed_worker_and_a_killed_driver(slow_grid, tmp_path, cluster):
    """The grid benchmark drives the cluster from its own process; the worker node is killed (every one
    of its processes, SIGKILL) after a few results and started again, then the driver is killed and
    started again; the folder ends equal to a local run, every example once."""
    grid = slow_grid
    local = tmp_path / "local"
    run_sweep(grid, local, progress=False)
    n = len(Path(grid.task).read_text().splitlines())
    variants = [f"--variant={c.variant}={c.model}" for c in grid.cells[:2]]
    driver = [sys.executable, str(ROOT / "benchmarks" / "attack_grid.py"), "run", "--model", grid.cells[0].model,
              "--variants", "v0,v1", *variants, "--recipes", "deepwordbug,pwws", "--task", grid.task,
              "--n", str(n), "--seed", str(grid.seed), "--shard-size", "2", "--ray", cluster["address"],
              "--out", str(tmp_path / "ray")]
    # the grid picks its examples as a seeded shuffle; the local sweep above took them in order, and a
    # result depends only on (seed, example), so the folders compare example by example
    log = open(tmp_path / "driver.log", "w")
    first = subprocess.Popen(driver, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, env=os.environ.copy())
    try:
        wait_for(lambda: lines_in(tmp_path / "ray") >= 4 or first.poll() is not None, 240, "the first results")
        assert first.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
        cluster["nodes"][1].kill()  # the worker node, mid-run
        killed_at = lines_in(tmp_path / "ray")
        cluster["start_worker"]()
        wait_for(lambda: lines_in(tmp_path / "ray") >= killed_at + 2 or first.poll() is not None, 240, "results after the restart")
        assert first.poll() is None, "the grid finished before the driver could be killed; make it slower"
        first.kill()  # the driver, mid-run
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    second = subprocess.run(driver, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, env=os.environ.copy(), timeout=300)
    log.close()
    output = (tmp_path / "driver.log").read_text()
    assert second.returncode == 0, output[-3000:]
    assert "2 Ray worker(s) on 2 node(s)" in output
    left = [int(m) for m in re.findall(r"(\d+) examples to attack", output)]
    # the second driver resumed the first one's folder (on a quiet machine the first may have written its
    # last results between the check above and the kill: then the second finds nothing left to attack)
    assert len(left) == 2 and 0 <= left[1] < left[0] == 4 * n
    for cell in grid.cells:
        got = rows(tmp_path / "ray" / cell.folder)
        assert sorted(r["index"] for r in got) == list(range(n))  # nothing lost, nothing twice
        assert same_results(tmp_path / "ray" / cell.folder, local / cell.folder)
        summary = json.loads((tmp_path / "ray" / cell.folder / "summary.json").read_text())
        assert summary["examples"] == n
    # a driver with another Ray version than the cluster's: one sentence, nothing written
    other = ("import ray, sys; ray.__version__ = '2.0.0'\n"
             "from tightrope.errors import TightropeError\n"
             "from tightrope.workflows.ray_backend import connect\n"
             "try:\n    connect(sys.argv[1])\nexcept TightropeError as err:\n    print(err)\n")
    mismatch = subprocess.run([sys.executable, "-c", other, cluster["address"]], capture_output=True, text=True,
                              env=os.environ.copy(), timeout=120)
    assert "but this machine has Ray 2.0.0" in mismatch.stdout and mismatch.stdout.count("\n") == 1, mismatch.stdout + mismatch.stderr[-1500:]
    # a driver without the cluster's token: one sentence
    stranger = subprocess.run([sys.executable, "-c", other.replace("ray.__version__ = '2.0.0'", "pass"), cluster["address"]],
                              capture_output=True, text=True, env={**os.environ, "RAY_AUTH_TOKEN": "0" * 64}, timeout=180)
    assert "refused this process's authentication token" in stranger.stdout, stranger.stdout + stranger.stderr[-1500:]


@pytest.mark.slow
def test_attack_on_local_ray_equals_the_default_run(tmp_path, grid):
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'ray==2.60.0'; requirements.lock has it)")
    cell = grid.cells[0]
    base = [sys.executable, "-m", "tightrope.cli", "attack", cell.model, "--recipe", cell.recipe, "--task", grid.task,
            "--seed", str(grid.seed), "--threads", "1", "--show", "0"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    plain = subprocess.run([*base, "--out", str(tmp_path / "plain")], capture_output=True, text=True, env=env, timeout=300)
    assert plain.returncode == 0, plain.stderr[-2000:]
    dry = subprocess.run([*base, "--out", str(tmp_path / "plain"), "--dry-run"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert dry.returncode == 0 and "0 tasks" in dry.stdout, dry.stdout + dry.stderr[-2000:]
    on_ray = subprocess.run([*base, "--out", str(tmp_path / "ray"), "--ray", "local", "--workers", "1"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert on_ray.returncode == 0, on_ray.stderr[-2000:]
    assert same_results(tmp_path / "plain", tmp_path / "ray")
    plain_summary = json.loads((tmp_path / "plain" / "summary.json").read_text())
    ray_summary = json.loads((tmp_path / "ray" / "summary.json").read_text())
    assert plain_summary["succeeded"] == ray_summary["succeeded"] and plain_summary["examples"] == ray_summary["examples"]
    assert json.loads((tmp_path / "plain" / "attack.json").read_text()) == json.loads((tmp_path / "ray" / "attack.json").read_text())


@pytest.mark.slow
def test_a_worker_without_the_packaged_assets_is_one_sentence_and_the_run_stays_resumable(tmp_path, grid):
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'ray==2.60.0'; requirements.lock has it)")
    cell = next(c for c in grid.cells if c.recipe == "pwws")  # PWWS reads WordNet, which the workers lack here
    base = [sys.executable, "-m", "tightrope.cli", "attack", cell.model, "--recipe", "pwws", "--task", grid.task,
            "--seed", str(grid.seed), "--out", str(tmp_path / "run"), "--show", "0", "--ray", "local", "--workers", "1"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "TIGHTROPE_WORDNET_DIR": str(tmp_path / "nowhere"), "TIGHTROPE_CACHE": str(tmp_path / "cache")}
    bad = subprocess.run(base, capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2, bad.stdout + bad.stderr[-2000:]
    message = [line for line in bad.stdout.splitlines() + bad.stderr.splitlines() if "packaged asset" in line]
    assert message and "WordNet" in " ".join(message) and "Traceback" not in bad.stderr
    assert not (tmp_path / "run" / "results.jsonl").exists() or not (tmp_path / "run" / "results.jsonl").read_text()
