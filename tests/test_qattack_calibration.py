"""The audit's calibrated tests: p-values against a clean null, their combination, the shipped null."""

from __future__ import annotations

import json
import math
import random

import pytest

from tightrope.errors import TightropeError
from tightrope.qattack import calibration as C


def test_t_tail_matches_tables():
    assert C.t_sf(0.0, 5) == pytest.approx(0.5)
    assert C.t_sf(2.228, 10) == pytest.approx(0.025, abs=2e-4)  # two-sided 5% critical value, df 10
    assert C.t_sf(-2.228, 10) == pytest.approx(0.975, abs=2e-4)
    assert C.t_sf(3.169, 10) == pytest.approx(0.005, abs=1e-4)
    assert C.t_sf(1.96, 10_000) == pytest.approx(C.normal_sf(1.96), abs=1e-4)
    assert C.t_sf(50.0, 11) < 1e-13


def test_gumbel_tail_for_maxima():
    assert C.gumbel_sf(2.0, 2.0, 0.5) == pytest.approx(1 - math.exp(-math.exp(-0.5772156649)), abs=1e-6)
    xs = [1.0, 2.0, 3.0, 4.0, 6.0]
    ps = [C.gumbel_sf(x, 2.5, 0.4) for x in xs]
    assert all(a > b for a, b in zip(ps, ps[1:]))
    # the maximum of 100 standard normals: simulated tail matches the moment fit
    rng = random.Random(2)
    maxima = [max(rng.gauss(0, 1) for _ in range(100)) for _ in range(3000)]
    fit = C.StatNull(tuple(maxima[:1000]), "gumbel")
    assert fit.p_value(3.8) == pytest.approx(sum(m > 3.8 for m in maxima[1000:]) / 2000, abs=0.01)
    assert C.StatNull(tuple(maxima[:1000])).p_value(4.2) < fit.p_value(4.2)  # a normal fit's tail is too thin


def test_p_value_is_monotone_in_the_statistic_and_in_its_error():
    null = C.StatNull((1.00, 1.01, 0.99, 1.02, 1.00, 0.98, 1.01))
    xs = [0.9, 0.99, 1.0, 1.01, 1.03, 1.1, 1.5]
    ps = [null.p_value(x) for x in xs]
    assert all(a > b for a, b in zip(ps, ps[1:]))
    assert ps[0] > 0.99 and ps[-1] < 1e-6
    emp = [null.empirical_p(x) for x in xs]
    assert all(a >= b for a, b in zip(emp, emp[1:]))
    assert emp[-1] == pytest.approx(1 / 8)  # the +1 smoothing: never below 1 / (n + 1)
    # a larger sampling error of the audited model makes the same excess less surprising
    assert null.p_value(1.05, se=0.05) > null.p_value(1.05, se=0.0)
    with pytest.raises(TightropeError, match="at least 3"):
        C.StatNull((1.0, 1.0)).p_value(1.0)


def test_fitted_tail_holds_its_size_on_normal_clean_values():
    # leave-one-out on simulated clean values: the t prediction interval is exact for normal data
    rng = random.Random(0)
    rejected = trials = 0
    for _ in range(400):
        values = [rng.gauss(1.0, 0.02) for _ in range(12)]
        for i in range(len(values)):
            held = C.StatNull(tuple(v for j, v in enumerate(values) if j != i))
            rejected += held.p_value(values[i]) <= 0.05
            trials += 1
    assert rejected / trials == pytest.approx(0.05, abs=0.01)


def test_cauchy_combination_rejects_when_one_statistic_is_extreme():
    assert C.cauchy_combine([1e-12, 0.5, 0.9, 0.7, 0.4]) < 1e-10
    assert C.cauchy_combine([1e-300, 0.99]) < 1e-290  # no overflow, and a p near 1 cannot mask it
    assert C.cauchy_combine([0.3] * 6) == pytest.approx(0.3)  # equal p-values combine to themselves
    assert C.cauchy_combine([0.5, 0.6, 0.9, 0.3]) > 0.3
    several = C.cauchy_combine([0.02] * 5)
    assert several == pytest.approx(0.02, rel=1e-6) and several < 5 * 0.02  # Bonferroni would give 0.1
    with pytest.raises(TightropeError, match="Nothing to combine"):
        C.cauchy_combine([])


def test_cauchy_combination_is_valid_for_dependent_p_values():
    # five copies of one uniform p-value (perfect dependence): the size at 5% stays near 5%
    rng = random.Random(1)
    hits = sum(C.cauchy_combine([u] * 5) <= 0.05 for u in (rng.random() for _ in range(4000)))
    assert hits / 4000 == pytest.approx(0.05, abs=0.012)


def test_layer_p_value_is_bonferroni_over_layers():
    null = C.StatNull(tuple(1 + 0.01 * math.sin(i) for i in range(100)))
    p_one = null.p_value(1.05)
    p, worst = C.layer_p_value(null, [1.0, 1.05, 0.99], [0.0, 0.0, 0.0])
    assert worst == 1 and p == pytest.approx(3 * p_one)
    assert C.layer_p_value(null, [], []) == (1.0, -1)


def test_position_statistics_ignore_smooth_shapes_and_catch_parking():
    import torch

    from tightrope.qattack.audit import contrast_se, edge_contrast, position_histogram, spike

    g = torch.Generator().manual_seed(0)
    for n in (4_000, 40_000, 400_000):
        u = torch.rand(n, generator=g)
        shapes = {"uniform": u, "sloped": u.sqrt(),  # density 2u: more weights near the upper wall
                  "curved": (torch.rand(n, generator=g) + torch.rand(n, generator=g)) / 2}  # triangular
        for name, x in shapes.items():
            counts = position_histogram(x)
            if name != "curved":  # a tent density is not smooth at its peak, nor flat near the walls
                assert abs(edge_contrast(counts, 0.05) - 1) < 4 * contrast_se(counts, 0.05), (name, n)
            assert spike(counts) < 4.5, (name, n)  # the largest of 100 near-standard normals
        parked = torch.cat([u, torch.full((n // 50,), 0.1), torch.full((n // 50,), 0.9)])  # a 10% margin
        assert spike(position_histogram(parked)) > 8
        walls = torch.cat([u, torch.zeros(n // 20), torch.ones(n // 20)])  # clamped onto the walls
        counts = position_histogram(walls)
        assert edge_contrast(counts, 0.05) > 1 + 6 * contrast_se(counts, 0.05)


def test_shipped_null_is_small_says_how_it_was_made_and_loads():
    null = C.load_null()
    assert null.meta["kind"] == "tightrope.audit-null"
    assert len(null.meta["models"]) >= 10 and {m["task"] for m in null.meta["models"]} >= {"mr", "sst2", "imdb"}
    assert "benchmarks/audit_null.py" in null.meta["made_by"]
    for q in ("llm-int8", "nf4", "fp4", "int8-tensor", "all"):
        assert null.get(q, "edge_contrast").n == len(null.meta["models"])
        assert null.get(q, "layer_contrast").n > 10 * len(null.meta["models"])
    for q in ("llm-int8", "nf4", "fp4", "int8-tensor"):
        assert null.get(q, "search_kl") is not None and null.get(q, "kl") is not None
    assert "0.01" in null.meta["leave_one_out"]
    from importlib import resources

    size = len(resources.files("tightrope.qattack").joinpath("null", C.DEFAULT_NULL).read_bytes())
    assert size < 256_000  # 17 transforms x 12 models, per-layer values at 6 digits: about 200 KB


def test_null_file_errors_are_one_sentence(tmp_path):
    with pytest.raises(TightropeError, match="does not exist"):
        C.load_null(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(TightropeError, match="not JSON"):
        C.load_null(bad)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"kind": "something else"}))
    with pytest.raises(TightropeError, match="not an audit null"):
        C.load_null(other)


def test_leave_one_out_drops_a_models_layers_too():
    data = {"kind": "tightrope.audit-null", "statistics": {"nf4": {"edge_ratio": [1.0, 1.1, 1.2],
                                                                    "layer_spike": [1, 2, 3, 4, 5, 6]}},
            "layer_models": {"nf4": {"layer_spike": [0, 0, 1, 1, 2, 2]}}}
    null = C.Null.from_dict(data, "test")
    held = null.without(1)
    assert held.get("nf4", "edge_ratio").values == (1.0, 1.2)
    assert held.get("nf4", "layer_spike").values == (1, 2, 5, 6)


def test_leave_one_out_of_an_extended_null_keeps_the_transforms_from_other_models():
    """A null grown by ``audit_null.py null --extend``: the kept transforms' values came from other models, so a
    model is left out of the new transforms only and judged against all of the kept ones (held out)."""
    data = {"kind": "tightrope.audit-null",
            "statistics": {"nf4": {"edge_ratio": [1.0, 1.1, 1.2]},
                           "prune:2:4": {"edge_ratio": [2.0, 2.1, 2.2], "layer_spike": [1, 2, 3, 4, 5, 6]}},
            "layer_models": {"prune:2:4": {"layer_spike": [0, 0, 1, 1, 2, 2]}}}
    null = C.Null.from_dict(data, "test")
    held = null.without(0, {"prune:2:4"})
    assert held.get("nf4", "edge_ratio").values == (1.0, 1.1, 1.2)
    assert held.get("prune:2:4", "edge_ratio").values == (2.1, 2.2)
    assert held.get("prune:2:4", "layer_spike").values == (3, 4, 5, 6)
    assert null.without(0).get("nf4", "edge_ratio").values == (1.1, 1.2)
