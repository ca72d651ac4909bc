"""One config per defense: the CLI (``tightrope train --defense``) and a study file build the same
DefenseConfig, defaults included, through :func:`tightrope.defenses.config.defense_config`."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from tightrope.cli import app
from tightrope.defenses.config import KINDS, DefenseConfig, build_objective, defense_config
from tightrope.errors import TightropeError
from tightrope.study import steps
from tightrope.study.plan import plan_study, preflight
from tightrope.study.spec import parse_spec

TEACHER = "runs/the-baseline"


class Captured(Exception):
    def __init__(self, defense):
        self.defense = defense


def from_cli(monkeypatch, tmp_path, tiny_model_dir, tiny_task, flags: list[str]) -> DefenseConfig:
    """The DefenseConfig ``tightrope train`` builds from ``flags`` (stopped before any training)."""
    import tightrope.defenses.run as run

    def capture(train_config, defense):
        raise Captured(defense)

    monkeypatch.setattr(run, "prepare", capture)
    result = CliRunner().invoke(app, ["train", "--model", str(tiny_model_dir), "--task", str(tiny_task),
                                      "--out", str(tmp_path / "run"), *flags])
    assert isinstance(result.exception, Captured), result.output
    return result.exception.defense


def from_study(method: str, params: dict) -> DefenseConfig:
    """The DefenseConfig the study runner builds for a defense section (source model = the teacher)."""
    spec = parse_spec({"name": "t", "data": {"task": "rotten-tomatoes", "max_length": 32},
                       "defenses": [{"name": "d", "method": method, "params": params}]})
    (step,) = [s for s in plan_study(spec)[0] if s.name == "defend/d"]
    return steps.defense_of(step.inputs, teacher=TEACHER)


CASES = [  # (CLI flags, study method, study params)
    (["--defense", "none"], "none", {}),
    (["--defense", "pgd"], "pgd", {}),
    (["--defense", "fast"], "fast", {}),
    (["--defense", "freelb"], "freelb", {}),
    (["--defense", "a2t"], "a2t", {}),
    (["--defense", "canonical"], "canonical", {}),
    (["--defense", "freelb", "--epsilon", "0.1", "--steps", "2", "--norm", "l2"], "FreeLB",
     {"epsilon": 0.1, "steps": 2, "norm": "l2"}),
    (["--defense", "fast", "--epsilon", "0.005", "--mix", "0.5", "--teacher", TEACHER, "--a", "0.5"], "fast",
     {"epsilon": 0.005, "mix": 0.5, "distill": {"a": 0.5}}),
    (["--teacher", TEACHER, "--temperature", "3"], "distill", {"temperature": 3}),
    (["--defense", "a2t", "--query-budget", "50", "--adv-share", "0.3"], "a2ttraining", {"query_budget": 50, "adv_share": 0.3}),
    (["--defense", "a2t", "--wordnet-candidates", "--synonym-encoding", "--synonym-min-cos", "0.9"], "a2t",
     {"wordnet_candidates": True, "synonym_encoding": True, "synonym_min_cos": 0.9}),
    (["--defense", "a2t", "--max-candidates", "10", "--max-share", "0.2", "--no-wordnet-candidates"], "a2t",
     {"max_candidates": 10, "max_share": 0.2, "wordnet_candidates": False}),
    (["--defense", "pgd", "--step-size", "0.01", "--mix", "0.7"], "pgd", {"step_size": 0.01, "mix": 0.7}),
    (["--defense", "a2t", "--a2t-cache", "runs/a2t-cache"], "a2t", {"a2t_cache": "runs/a2t-cache"}),
    (["--defense", "a2t", "--a2t-cache", "runs/c", "--a2t-cache-reuse", "base", "--a2t-cache-rebuild"], "a2t",
     {"a2t_cache": "runs/c", "a2t_cache_reuse": "base", "a2t_cache_rebuild": True}),
    (["--defense", "canonical", "--synonym-neighbours", "20", "--synonym-min-cos", "0.9", "--synonym-wordnet",
      "--spelling-vocab", "1000", "--substitution-rate", "0.1"], "canonical",
     {"synonym_neighbours": 20, "synonym_min_cos": 0.9, "synonym_wordnet": True, "spelling_vocab": 1000,
      "substitution_rate": 0.1}),
    (["--defense", "canonical", "--substitution-rate", "0.5", "--smoothing", "copies=8,rate=0.6,seed=3"], "canonical",
     {"substitution_rate": 0.5, "smoothing": {"copies": 8, "rate": 0.6, "seed": 3}}),
    (["--defense", "canonical", "--substitution-rate", "0.5", "--smoothing", "8"], "canonical",
     {"substitution_rate": 0.5, "smoothing": {"copies": 8}}),
    (["--defense", "freelb", "--steps", "10", "--step-size", "0.03", "--epsilon", "10", "--norm", "l2",
      "--init-magnitude", "0.05"], "freelb",  # FreeLB++ (Li et al. 2021)
     {"steps": 10, "step_size": 0.03, "epsilon": 10, "norm": "l2", "init_magnitude": 0.05}),
    (["--flood-level", "0.2"], "none", {"flood_level": 0.2}),
    (["--defense", "pgd", "--flood-level", "0.1"], "pgd", {"flood_level": 0.1}),
]


@pytest.mark.parametrize(("flags", "method", "params"), CASES, ids=lambda c: " ".join(c) if isinstance(c, list) else None)
def test_cli_and_study_build_the_same_defense(monkeypatch, tmp_path, tiny_model_dir, tiny_task, flags, method, params):
    cli = from_cli(monkeypatch, tmp_path, tiny_model_dir, tiny_task, flags)
    assert cli == from_study(method, params)


def test_every_kind_is_covered_and_defaults_are_the_configs():
    assert {defense_config(m, teacher=TEACHER).kind for _, m, _ in CASES} == set(KINDS)
    freelb = from_study("freelb", {})
    assert (freelb.epsilon, freelb.steps, freelb.norm) == (0.02, 3, "linf")  # one set of defaults, both ways


def test_every_defense_option_of_train_is_compared_both_ways():
    """Each DefenseConfig field that ``tightrope train`` has an option for is set, off its default, by a case."""
    import typer

    train = typer.main.get_command(app).commands["train"]
    options = {"a" if p.name == "alpha" else p.name for p in train.params} & set(DefenseConfig.model_fields)
    covered = {k for _, _, params in CASES for k in params} | {"a", "temperature", "teacher"}  # distill's, via --teacher
    assert sorted(options - covered) == []


@pytest.mark.parametrize(("method", "params", "message"), [
    ("pgd", {"epsilom": 0.1}, "epsilom"),
    ("pgd", {"epsilon": -1}, "epsilon"),
    ("shield", {}, "Unknown defense 'shield'"),
    ("pgd", {"query_budget": 5}, "does not use --query-budget"),
    ("a2t", {"synonym_min_cos": 0.9}, "only with --synonym-encoding"),
    ("a2t", {"a2t_cache_reuse": "base"}, "needs --a2t-cache PATH"),
    ("a2t", {"a2t_cache": "runs/c", "a2t_cache_reuse": "any"}, "a2t_cache_reuse"),
    ("pgd", {"a2t_cache": "runs/c"}, "does not use --a2t-cache"),
])
def test_a_misspelt_defense_setting_fails_the_preflight_before_any_work(tmp_path, method, params, message):
    spec = parse_spec({"name": "t", "data": {"task": "rotten-tomatoes", "max_length": 32},
                       "defenses": [{"name": "d", "method": method, "params": params}]})
    with pytest.raises(TightropeError, match=message):
        preflight(spec)


def test_flooding_reverses_the_gradient_below_the_flood_level_and_keeps_the_loss_above_it():
    """Ishida et al. 2020, Eq. (1): |J - b| + b equals J above b; below b, its gradient is -dJ."""
    import torch

    from tightrope.defenses.adversarial import cross_entropy
    from tightrope.defenses.flooding import Flooding, flooded

    logits = torch.tensor([[2.0, -1.0], [0.5, 0.2]], requires_grad=True)
    batch = {"labels": torch.tensor([0, 0])}
    plain = cross_entropy(logits, batch)
    (g_plain,) = torch.autograd.grad(plain, logits)
    low, high = float(plain) / 2, float(plain) * 2  # b below the loss, b above it
    for level, sign in ((low, 1.0), (high, -1.0)):
        loss = Flooding(cross_entropy, level)(logits, batch)
        (g,) = torch.autograd.grad(loss, logits)
        assert torch.allclose(g, sign * g_plain)
        assert float(loss) == pytest.approx(float(plain) if sign > 0 else 2 * level - float(plain))
    assert float(flooded(torch.tensor(0.1), 0.3)) == pytest.approx(0.5)


def test_a_flood_level_reaches_any_defense_and_is_refused_when_not_positive():
    from tightrope.defenses.flooding import Flooding

    objective = build_objective(defense_config("none", {"flood_level": 0.2}))
    assert isinstance(objective.criterion, Flooding) and objective.criterion.level == 0.2
    assert "flooding(b=0.2" in objective.describe()["criterion"]
    pgd = build_objective(defense_config("pgd", {"flood_level": 0.2}))
    assert isinstance(pgd.criterion, Flooding)
    with pytest.raises(TightropeError, match="flood_level"):
        defense_config("none", {"flood_level": 0})
