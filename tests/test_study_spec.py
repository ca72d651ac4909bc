"""The study file: strict schema, errors naming the bad key's path, invalid YAML, planning."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tightrope.errors import TightropeError
from tightrope.study.spec import load_spec, parse_spec

STUDIES = Path(__file__).resolve().parents[1] / "studies"

BASE = {
    "name": "t",
    "data": {"task": "rotten-tomatoes", "max_length": 32},
    "compress": [{"name": "int8", "steps": [{"method": "Int8Dynamic"}]}],
    "attacks": [{"recipe": "textfooler", "n": 5}],
}


def with_(path: str, value):
    data = yaml.safe_load(yaml.safe_dump(BASE))
    *parents, last = path.split(".")
    node = data
    for p in parents:
        node = node[int(p)] if p.isdigit() else node[p]
    node[last] = value
    return data


@pytest.mark.parametrize("path, value, expected", [
    ("data.max_lenght", 64, "data.max_lenght"),
    ("compress.0.steps.0.parms", {}, "compress.0.steps.0.parms"),
    ("attacks.0.n", -1, "attacks.0.n"),
    ("trian", {}, "unknown key 'trian'"),
    ("compress.0.source", "nowhere", "compress.0.source"),
    ("attacks.0.targets", ["int9"], "attacks.0.targets.0"),
    ("report", {"after": "nope"}, "report.after"),
])
def test_bad_key_fails_with_its_path(path, value, expected):
    with pytest.raises(TightropeError) as err:
        parse_spec(with_(path, value), "s.yaml")
    assert expected in str(err.value)
    assert str(err.value).startswith("s.yaml: ")
    assert "\n" not in str(err.value)


def test_unknown_key_lists_the_allowed_ones():
    with pytest.raises(TightropeError, match=r"allowed here: .*max_length"):
        parse_spec(with_("data.max_lenght", 64))


def test_duplicate_model_names_are_refused():
    data = with_("compress", [{"name": "x", "steps": [{"method": "NF4"}]}, {"name": "x", "steps": [{"method": "NF4"}]}])
    with pytest.raises(TightropeError, match="compress.1.name"):
        parse_spec(data)


def test_invalid_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: t\ndata: [unclosed\n")
    with pytest.raises(TightropeError, match=r"not valid YAML at line \d+"):
        load_spec(bad)
    with pytest.raises(TightropeError, match="does not exist"):
        load_spec(tmp_path / "missing.yaml")
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n")
    with pytest.raises(TightropeError, match="YAML mapping"):
        load_spec(scalar)


def test_fingerprint_ignores_report_layout_but_not_settings():
    a = parse_spec(BASE)
    b = parse_spec({**BASE, "report": {"examples": 2}, "description": "other words"})
    c = parse_spec(with_("data.max_length", 64))
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


def test_plan_has_every_step_once_in_dependency_order():
    from tightrope.study.plan import plan_study

    spec = parse_spec(BASE)
    steps, producer = plan_study(spec)
    names = [s.name for s in steps]
    assert names == ["train/baseline", "compress/int8", "evaluate/baseline", "evaluate/int8",
                     "attack/textfooler/baseline", "attack/textfooler/int8"]
    assert producer["int8"] == "compress/int8"
    assert steps[0].inputs["max_length"] == 32


@pytest.mark.parametrize("name", ["quickstart.yaml", "imdb.yaml"])
def test_shipped_studies_are_valid(name):
    spec = load_spec(STUDIES / name)
    assert spec.compress and spec.attacks
