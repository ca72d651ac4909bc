"""The Gemma 3 270M GGUF joined from its registry parts: found without importing them, written atomically,
checked against the pinned SHA-256. Fake parts of a few bytes stand in for the real ~60 MB ones."""

from __future__ import annotations

import hashlib
import importlib.util

import pytest

from tightrope import assets
from tightrope.errors import MissingResourceError

CHUNKS = [b"GGUF-head-", b"block-two-", b"block-three-", b"tail"]


@pytest.fixture
def fake_parts(tmp_path, monkeypatch):
    """Four importable part packages on sys.path (each with its data file, nothing else), the pinned hash and
    size set to theirs, and an empty cache."""
    site = tmp_path / "site"
    for (module, name), chunk in zip(assets.GEMMA3_PARTS, CHUNKS):
        data = site / module / "data"
        data.mkdir(parents=True)
        (site / module / "__init__.py").write_text("raise RuntimeError('a part package must not be imported')\n")
        (data / name).write_bytes(chunk)
    monkeypatch.syspath_prepend(str(site))
    whole = b"".join(CHUNKS)
    monkeypatch.setattr(assets, "GEMMA3_SHA256", hashlib.sha256(whole).hexdigest())
    monkeypatch.setattr(assets, "GEMMA3_BYTES", len(whole))
    monkeypatch.setenv("TIGHTROPE_CACHE", str(tmp_path / "cache"))
    return site


def test_a_missing_part_is_one_sentence(tmp_path, monkeypatch):
    monkeypatch.setenv("TIGHTROPE_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.endswith("_part3") else real(name, *a))
    with pytest.raises(MissingResourceError, match=r"setup\.sh --gemma") as err:
        assets.gemma3_gguf()
    assert str(err.value).count(". ") == 0 and str(err.value).endswith(".")
    assert not list(tmp_path.rglob("*.gguf*"))


def test_parts_join_in_order_and_are_reused(fake_parts, monkeypatch):
    out = assets.gemma3_gguf()
    assert out == assets.cache_dir() / "gemma3-270m" / assets.GEMMA3_GGUF
    assert out.read_bytes() == b"".join(CHUNKS)
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no .partial left behind
    monkeypatch.setattr(assets, "gemma3_parts", lambda: pytest.fail("the joined file should have been reused"))
    assert assets.gemma3_gguf() == out


def test_a_file_of_the_wrong_size_is_joined_again(fake_parts):
    out = assets.cache_dir() / "gemma3-270m" / assets.GEMMA3_GGUF
    out.parent.mkdir(parents=True)
    out.write_bytes(b"GGUF-head-")  # an old, cut-short copy
    assert assets.gemma3_gguf().read_bytes() == b"".join(CHUNKS)


def test_a_failed_read_leaves_no_half_file(fake_parts, monkeypatch):
    parts = assets.gemma3_parts()
    parts[2].unlink()  # vanishes after it was found: the read fails midway
    monkeypatch.setattr(assets, "gemma3_parts", lambda: parts)
    with pytest.raises(FileNotFoundError):
        assets.gemma3_gguf()
    assert not list((assets.cache_dir() / "gemma3-270m").iterdir())


def test_a_wrong_hash_is_refused_in_one_sentence(fake_parts, monkeypatch):
    monkeypatch.setattr(assets, "GEMMA3_SHA256", "0" * 64)
    with pytest.raises(MissingResourceError, match=r"SHA-256 .* not the pinned 0{64}; reinstall") as err:
        assets.gemma3_gguf()
    assert str(err.value).count(". ") == 0
    assert not list((assets.cache_dir() / "gemma3-270m").iterdir())
