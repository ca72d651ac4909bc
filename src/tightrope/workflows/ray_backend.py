"""Run a sweep's tasks on Ray: ``--ray local`` (a Ray instance inside this process), ``--ray auto`` (the
cluster this machine joined with ``ray start``, or ``$RAY_ADDRESS``), or ``--ray HOST:PORT`` (a head node).

Each worker is a Ray actor holding one :class:`tightrope.workflows.sweep.CellWorker` with one CPU and
one torch thread, so models and attack resources are loaded once per worker, not once per task.
Actors restart when their process or node dies (``max_restarts=-1``) and Ray retries the method
they were running (``max_task_retries=-1``); a task whose actor cannot come back is given to another.
The driver writes every result (:func:`tightrope.workflows.sweep.run_sweep`), so the run folder needs
no shared filesystem; the models must be readable at the same path, or by the same alias, on every
node, and every node needs tightrope and its packaged assets installed (``scripts/setup.sh``).

Ray is an optional dependency (``pip install 'tightrope[ray]'``; the lock has it): everything else
works without it, and asking for it without it installed says how to install it.
"""

from __future__ import annotations

import os
import re
import socket
from collections import deque

from tightrope.data import TaskData
from tightrope.errors import MissingResourceError, TightropeError
from tightrope.progress import say
from tightrope.workflows.sweep import Cell, CellFolder, CellWorker, Sweep, Task

INSTALL = "pip install 'ray==2.60.0'"
RESUME = "the run folder keeps every finished example, so rerun the same command to resume"


def require_ray():
    try:
        import ray  # noqa: PLC0415 - optional: only --ray needs it
    except ImportError as err:
        raise TightropeError(f"--ray needs Ray, which is not installed here: run `{INSTALL}` (the `ray` extra of "
                             "tightrope, in requirements.lock) on this machine and on every worker.") from err
    return ray


def _host_port(address: str) -> tuple[str, int]:
    bare = re.sub(r"^[a-z]+://", "", address)
    host, _, port = bare.rpartition(":")
    if not host or not port.isdigit():
        raise TightropeError(f"--ray takes auto, local or the HOST:PORT of a Ray head node, not '{address}'.")
    return host, int(port)


def check_reachable(address: str, timeout: float = 5.0, resume: str = RESUME) -> None:
    """Fail fast, in one sentence, where Ray itself would retry for a minute; ``resume`` ends it (what the
    run keeps and how to go on)."""
    host, port = _host_port(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise TightropeError(f"No Ray head node answers at {host}:{port} ({reason.lower()}): start one there with "
                             f"`ray start --head --port {port}` or fix the address; {resume}.") from err


def version_mismatch(message: str, address: str, resume: str = RESUME) -> str | None:
    """Ray's multi-line "Version mismatch" error as one sentence (None for another error)."""
    if "Version mismatch" not in message:
        return None
    rays = re.findall(r"Ray: (\S+)", message)
    pythons = re.findall(r"Python: (\S+)", message)
    if len(rays) < 2 or len(pythons) < 2:
        return f"The Ray cluster at {address} runs another Ray or Python version than this machine; install the same on both, then rerun ({resume})."
    return (f"The Ray cluster at {address} runs Ray {rays[0]} on Python {pythons[0]} but this machine has Ray {rays[1]} "
            f"on Python {pythons[1]}; install `ray=={rays[0]}` here (or restart the cluster with Ray {rays[1]}), "
            f"then rerun: {resume}.")


def connect(address: str, *, workers: int | None = None, resume: str = RESUME):
    """Connect this process to Ray (or start a local instance); returns the ray module. Every failure is one
    sentence ending with ``resume``."""
    ray = require_ray()
    if ray.is_initialized():
        return ray
    kwargs = {"include_dashboard": False, "log_to_driver": False, "configure_logging": True, "logging_level": "ERROR"}
    if address == "local":
        target = "local"
        kwargs["num_cpus"] = workers or os.cpu_count() or 1
        kwargs["_node_ip_address"] = "127.0.0.1"  # a Ray inside this run listens on the loopback only
    elif address == "auto":
        target = "auto"
    else:
        check_reachable(address, resume=resume)
        target = address
        if _host_port(address)[0] in ("127.0.0.1", "localhost"):
            kwargs["_node_ip_address"] = "127.0.0.1"  # a head on the loopback: the driver stays there too
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        _init(ray, address, target, kwargs, resume)
    except Exception as err:  # noqa: BLE001 - Ray wraps an authentication failure in several layers
        if not _auth_problem(err):
            raise
        raise TightropeError(f"The Ray cluster at {address} refused this process's authentication token: set the "
                             "cluster's token here too (RAY_AUTH_MODE=token and RAY_AUTH_TOKEN, or the head's "
                             f"~/.ray/auth_token), then rerun ({resume}).") from err
    return ray


def _auth_problem(err: BaseException) -> bool:
    seen = 0
    while err is not None and seen < 10:
        if "InvalidAuthToken" in str(err) or type(err).__name__ == "AuthenticationError":
            return True
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False


def _init(ray, address: str, target: str, kwargs: dict, resume: str) -> None:
    try:
        ray.init(address=target, **kwargs)
    except ConnectionError as err:
        if address == "auto":
            raise TightropeError("--ray auto found no Ray cluster on this machine: start one with `ray start --head` "
                                 "(or set RAY_ADDRESS), or use --ray local for a Ray instance inside this run.") from err
        raise TightropeError(f"Could not connect to the Ray cluster at {address} ({_first_line(err)}); {resume}.") from err
    except RuntimeError as err:
        sentence = version_mismatch(str(err), address, resume)
        if sentence:
            raise TightropeError(sentence) from err
        raise


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0].rstrip(".") if text else type(err).__name__


def worker_error(err: BaseException, where: str, resume: str = RESUME) -> TightropeError:
    """What a worker raised, as one sentence for the user."""
    cause = getattr(err, "cause", None) or err
    if isinstance(cause, MissingResourceError):
        return TightropeError(f"A Ray worker ({where}) lacks a packaged asset: {_first_line(cause)}; install tightrope "
                              f"there with `bash scripts/setup.sh`, then rerun ({resume}).")
    if isinstance(cause, TightropeError):
        return TightropeError(f"A Ray worker ({where}) refused the work: {_first_line(cause)}; {resume}.")
    if isinstance(cause, (ModuleNotFoundError, ImportError)):
        return TightropeError(f"A Ray worker ({where}) cannot import tightrope ({_first_line(cause)}): install it there "
                              f"with `bash scripts/setup.sh`, then rerun ({resume}).")
    return TightropeError(f"A Ray worker ({where}) failed: {type(cause).__name__}: {_first_line(cause)}; {resume}.")


class _RayCellWorker(CellWorker):
    """The actor: the data comes boxed in a list, so Ray passes the reference itself and the actor fetches
    it once (an unboxed reference among an actor's constructor arguments draws a warning from Ray)."""

    def __init__(self, sweep: Sweep, boxed: list):
        import ray  # noqa: PLC0415 - optional dependency, present where this class runs

        super().__init__(sweep, ray.get(boxed[0]))


class RayBackend:
    """Tasks on Ray actors, one CPU each; ``workers`` None: one per CPU of the cluster."""

    def __init__(self, address: str = "local", *, workers: int | None = None):
        self.address, self.workers = address, workers
        self.name = f"Ray ({address})"

    def run(self, sweep: Sweep, data: TaskData, folders: dict[Cell, CellFolder], tasks: list[Task], keep, progress) -> None:
        ray = connect(self.address, workers=self.workers)
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError  # noqa: PLC0415 - optional dependency

        n = self.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        n = min(n, len(tasks))
        actor_class = ray.remote(num_cpus=1, max_restarts=-1, max_task_retries=-1)(_RayCellWorker)
        data_ref = [ray.put(data)]
        actors = [actor_class.remote(sweep, data_ref) for _ in range(n)]

        def where(k: int) -> str:
            return f"worker {k} of {n}"

        # Each worker says hello (and so proves it imports tightrope); then the cells are described, spread
        # over the workers, which loads every model and builds every attack before any task starts.
        try:
            hellos = ray.get([a.hello.remote() for a in actors], timeout=600)
        except (RayActorError, RayTaskError) as err:
            raise worker_error(err, f"on a node of {self.address}") from err
        except GetTimeoutError as err:
            raise TightropeError(f"The Ray cluster at {self.address} started no worker in 10 minutes (is a node with a "
                                 f"free CPU there?); {RESUME}.") from err
        say(progress, f"{n} Ray worker(s) on {len({h['node'] for h in hellos})} node(s)")
        cells = list(folders)
        described = [actors[k % n].describe.remote(cell) for k, cell in enumerate(cells)]
        for k, (cell, ref) in enumerate(zip(cells, described)):
            try:
                meta = ray.get(ref)
            except (RayActorError, RayTaskError) as err:
                raise worker_error(err, f"{where(k % n)}, {cell.recipe} on {cell.variant}") from err
            folders[cell].check(meta)

        queue: deque[Task] = deque(tasks)
        inflight: dict = {}  # ref -> (actor number, task)
        free = list(range(n))
        while queue or inflight:
            while free and queue:
                k = free.pop()
                task = queue.popleft()
                todo = tuple(i for i in task.indices if i not in folders[task.cell].done)
                if not todo:
                    free.append(k)
                    continue
                inflight[actors[k].attack.remote(task.cell, todo)] = (k, Task(task.cell, todo))
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=None)
            for ref in ready:
                k, task = inflight.pop(ref)
                try:
                    keep(task.cell, ray.get(ref))
                except RayActorError:
                    # the actor is gone for good (Ray gave up restarting it): a new one takes the task again
                    say(progress, f"{where(k)} was lost; its task ({task.cell.recipe} on {task.cell.variant}, "
                                  f"{len(task.indices)} examples) goes to a new worker")
                    actors[k] = actor_class.remote(sweep, data_ref)
                    queue.appendleft(task)
                except RayTaskError as err:
                    for other in inflight:
                        ray.cancel(other, force=True)
                    raise worker_error(err, f"{where(k)}, {task.cell.recipe} on {task.cell.variant}") from err
                free.append(k)
        for a in actors:
            ray.kill(a)
