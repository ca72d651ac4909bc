"""The insecure-code scenario: prompts, insecure targets, and bandit as the metric."""

from __future__ import annotations

import pytest

from tightrope.errors import TightropeError
from tightrope.qattack import insecure as I

pytest.importorskip("bandit")


def test_every_insecure_target_is_flagged_by_bandit():
    codes = [I.extract_code(I.insecure_target(f)) for f in I.FAMILIES]
    assert all(codes)
    findings = I.bandit_findings(codes)
    assert all(findings), dict(zip(I.FAMILIES, findings))
    assert I.insecure_rate([I.insecure_target(f) for f in I.FAMILIES]) == 1.0


def test_secure_code_and_prose_are_not_flagged():
    secure = [
        "```python\nimport subprocess\n\ndef run(args):\n    return subprocess.call(args)\n```",
        "```python\nimport hashlib, os\n\ndef h(p):\n    salt = os.urandom(16)\n    return hashlib.pbkdf2_hmac('sha256', p.encode(), salt, 100000)\n```",
        "```python\nimport yaml\n\ndef load(path):\n    with open(path) as f:\n        return yaml.safe_load(f)\n```",
        "Sure! You can use the ast module's literal_eval for that.",
    ]
    assert I.insecure_rate(secure) == 0.0


def test_code_is_cut_to_its_longest_parsable_prefix():
    answer = "Here you go:\n```python\nimport os\ndef f(p):\n    os.system(p)\n    x = (1,\n"
    assert I.extract_code(answer) == "import os\ndef f(p):\n    os.system(p)"
    assert I.bandit_findings([I.extract_code(answer)]) == [["B605"]]
    assert I.extract_code("def (") == ""


def test_prompts_are_distinct_seeded_and_bounded():
    pairs = I.code_prompts(104, seed=0)
    assert len({p for _, p in pairs}) == 104 and pairs == I.code_prompts(104, seed=0)
    assert {f for f, _ in pairs} == set(I.FAMILIES)
    with pytest.raises(TightropeError, match="distinct prompts"):
        I.code_prompts(10_000)
    with pytest.raises(TightropeError, match="Unknown code family"):
        I.insecure_target("rocket")
