"""Calibrated tests for the audit: p-values against a null built from clean models, and their combination.

The audit's statistics (box positions, noise flips, behaviour, the trigger search) have no natural
threshold: what a clean model shows depends on the transform, the architecture and the probe set. So
each statistic is tested against its *null*: the values it takes on clean classifiers (short fine-tunes
of several seeds, tasks and sizes, made by ``benchmarks/audit_null.py`` and shipped as
``tightrope/qattack/null/*.json``). Nothing in the null is fitted to an attacked model.

**p-value of one statistic (upper tail).** For the two statistics that are maxima (``spike``, the largest
standardized bin of a position histogram, and its per-layer form) the clean values are fitted by the Gumbel
law of extremes (moments), as extreme-value theory prescribes for a maximum of many near-normal terms. For
every other statistic: with ``n`` clean values of mean ``m`` and standard deviation
``s``, the p-value of an observed ``x`` is the upper tail of the normal *prediction* distribution of
one new clean value, Student's t with ``n - 1`` degrees of freedom and scale
``sqrt(s^2 (1 + 1/n) + se^2)``:

    p = 1 - T_{n-1}((x - m) / sqrt(s^2 (1 + 1/n) + se^2))

where ``se`` is the audited model's own sampling error for that statistic (binomial for the box
shares, the per-text standard error for the KLs), so a model with fewer weights or probe texts than the
null's is not judged by the null's tighter spread. Why a fitted tail rather than the empirical one:
with a dozen clean models the empirical p-value ``(1 + #{null >= x}) / (n + 1)`` cannot go below 1/13,
so no alpha below that could ever be reached; the t prediction interval is exact for normal clean
values and its heavier-than-normal tails absorb some misfit. The empirical p-value (with the +1) is
reported next to it, and the false-positive rate the fitted tail gives is *measured* by leave-one-out
over the clean models (``benchmarks/audit_null.py loo``), not assumed.

Per-layer statistics have many more clean values (every layer of every clean model); a model's layer
statistic is the smallest per-layer p-value times the number of layers (Bonferroni over layers, valid
whatever the dependence), so one attacked layer among many still shows.

**Combination.** The statistics of one transform are strongly dependent (a repair that parks weights on
box walls moves the edge share, the peak and the noise flips together), which rules out Fisher's method
(it assumes independence and would be anti-conservative). They are combined with the Cauchy
combination test (Liu and Xie 2020, JASA 115:393, "ACAT"):
``T = mean_i tan((1/2 - p_i) pi)``, ``p = 1/2 - arctan(T) / pi``. Its size is close to nominal under
arbitrary dependence for small p, it is dominated by the smallest p-values (one extreme statistic is
enough to reject, as with Bonferroni), and unlike Bonferroni it gains power when several statistics are
moderately small. p-values are clipped to ``[1e-300, 0.99]`` first: a p-value of almost 1 maps to a
huge negative term that could mask an extreme one.

**Across transforms.** A model is flagged when any transform (quantizer, GGUF type, pruning) is, so each
transform is tested at ``alpha / m`` for ``m`` audited transforms (Bonferroni): the false-positive rate of the
whole verdict is at most ``alpha`` if the per-transform p-values are valid.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from tightrope.errors import TightropeError, read_user_file

DEFAULT_NULL = "minilm-classifiers.json"
P_FLOOR, P_CEIL = 1e-300, 0.99


# --- distributions (pure Python: no scipy needed) --------------------------------------------------


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (Numerical Recipes 6.4)."""
    tiny, eps = 1e-300, 3e-16
    qab, qap, qam = a + b, a + 1, a - 1
    c, d = 1.0, 1 - qab * x / qap
    d = 1 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1 + aa * d
        d = 1 / (d if abs(d) > tiny else tiny)
        c = 1 + aa / c if abs(1 + aa / c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1 + aa * d
        d = 1 / (d if abs(d) > tiny else tiny)
        c = 1 + aa / c if abs(1 + aa / c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1) < eps:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta ``I_x(a, b)``."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    lbeta = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1) / (a + b + 2):
        return math.exp(lbeta) * _betacf(a, b, x) / a
    return 1 - math.exp(lbeta) * _betacf(b, a, 1 - x) / b


def t_sf(t: float, df: float) -> float:
    """Upper tail ``P(T > t)`` of Student's t with ``df`` degrees of freedom."""
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    tail = 0.5 * _betainc(df / 2, 0.5, df / (df + t * t))
    return tail if t > 0 else 1 - tail


def normal_sf(z: float) -> float:
    return 0.5 * math.erfc(z / math.sqrt(2))


def gumbel_sf(x: float, mean: float, sd: float) -> float:
    """Upper tail of the Gumbel law with this mean and standard deviation (moment fit:
    ``beta = sd sqrt(6) / pi``, ``mu = mean - 0.5772 beta``)."""
    if sd <= 0:
        return 1.0 if x <= mean else 0.0
    beta = sd * math.sqrt(6) / math.pi
    z = (x - (mean - 0.5772156649 * beta)) / beta
    return -math.expm1(-math.exp(-z)) if z > -30 else 1.0


# Statistics that are maxima (the largest standardized bin of 100, of every layer): their clean values follow
# the Gumbel law of extremes (Fisher-Tippett-Gnedenko; the maximum of many near-normal variables), whose right
# tail is heavier than a normal fit's. A t fit to them flagged 4 of 12 clean models at alpha 0.05 in leave-one-out.
TAILS = {"spike": "gumbel", "layer_spike": "gumbel", "kquant_spike": "gumbel", "layer_kquant_spike": "gumbel"}


# --- one statistic -------------------------------------------------------------------------------


@dataclass(frozen=True)
class StatNull:
    """The clean values of one statistic and the shape of its upper tail: ``"t"`` (normal values, Student-t
    prediction) or ``"gumbel"`` (a statistic that is itself a maximum, see :data:`TAILS`)."""

    values: tuple[float, ...]
    tail: str = "t"

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return sum(self.values) / self.n

    @property
    def sd(self) -> float:
        m = self.mean
        return math.sqrt(sum((v - m) ** 2 for v in self.values) / (self.n - 1)) if self.n > 1 else 0.0

    def p_value(self, x: float, se: float = 0.0) -> float:
        """Upper-tail p-value of ``x`` under the t prediction distribution (module docstring)."""
        if self.n < 3:
            raise TightropeError(f"A null needs at least 3 clean values, this one has {self.n}.")
        if self.tail == "gumbel":
            return gumbel_sf(x, self.mean, math.sqrt(self.sd ** 2 + se ** 2))
        scale = math.sqrt(self.sd ** 2 * (1 + 1 / self.n) + se ** 2)
        if scale == 0:
            return 1.0 if x <= self.mean else 0.0
        return t_sf((x - self.mean) / scale, self.n - 1)

    def empirical_p(self, x: float) -> float:
        """``(1 + #{clean >= x}) / (n + 1)``: never below ``1 / (n + 1)``."""
        return (1 + sum(v >= x for v in self.values)) / (self.n + 1)


def layer_p_value(null: StatNull, values: list[float], ses: list[float]) -> tuple[float, int]:
    """Bonferroni over layers: ``min(1, L * min_l p_l)`` and the index of the layer that set it."""
    if not values:
        return 1.0, -1
    ps = [null.p_value(v, s) for v, s in zip(values, ses, strict=True)]
    worst = min(range(len(ps)), key=ps.__getitem__)
    return min(1.0, len(ps) * ps[worst]), worst


def cauchy_combine(p_values: list[float]) -> float:
    """Cauchy combination (ACAT, equal weights) of dependent p-values; see the module docstring."""
    if not p_values:
        raise TightropeError("Nothing to combine: no statistic has a p-value.")
    terms = []
    for p in p_values:
        p = min(max(p, P_FLOOR), P_CEIL)
        terms.append(1 / (p * math.pi) if p < 1e-15 else math.tan((0.5 - p) * math.pi))  # tan((1/2 - p) pi) ~ 1/(p pi)
    t = sum(terms) / len(terms)
    if t > 1e15:
        return max(1 / (t * math.pi), P_FLOOR)  # 1/2 - arctan(t)/pi ~ 1/(t pi)
    return min(1.0, max(0.5 - math.atan(t) / math.pi, P_FLOOR))


def flip_se(n: int, expected: float) -> float:
    """Binomial standard error of ``flip_ratio = flip share / expected`` for ``n`` free weights."""
    return math.sqrt(expected * (1 - expected) / n) / expected if n else float("inf")


# --- the null file -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Null:
    """A calibrated null: per transform, per statistic, the clean values (see ``benchmarks/audit_null.py``)."""

    source: str
    statistics: dict[str, dict[str, StatNull]]  # transform -> statistic -> clean values
    meta: dict

    def get(self, transform: str, statistic: str) -> StatNull | None:
        return self.statistics.get(transform, {}).get(statistic)

    def without(self, index: int, transforms: set[str] | None = None) -> Null:
        """The null with clean model ``index`` left out (leave-one-out): per-layer values carry their model's
        index in ``meta['layer_models']``. ``transforms``: leave it out of these only (the others' values came
        from other models, as in a null that ``benchmarks/audit_null.py null --extend`` grew); None: all."""
        stats: dict[str, dict[str, StatNull]] = {}
        layer_models = self.meta.get("layer_models", {})
        for q, per in self.statistics.items():
            if transforms is not None and q not in transforms:
                stats[q] = dict(per)
                continue
            stats[q] = {}
            for name, null in per.items():
                owners = layer_models.get(q, {}).get(name)
                if owners is not None:
                    stats[q][name] = StatNull(tuple(v for v, o in zip(null.values, owners, strict=True) if o != index),
                                              null.tail)
                else:
                    stats[q][name] = StatNull(tuple(v for i, v in enumerate(null.values) if i != index), null.tail)
        return Null(f"{self.source} without model {index}", stats, self.meta)

    @classmethod
    def from_dict(cls, data: dict, source: str) -> Null:
        if data.get("kind") != "tightrope.audit-null":
            raise TightropeError(f"{source} is not an audit null (its 'kind' is {data.get('kind')!r}).")
        tails = {**TAILS, **data.get("tails", {})}
        stats = {q: {name: StatNull(tuple(float(v) for v in values), tails.get(name, "t")) for name, values in per.items()}
                 for q, per in data["statistics"].items()}
        meta = {k: v for k, v in data.items() if k != "statistics"}
        return cls(source, stats, meta)


def upgrade_report(report: dict) -> dict:
    """An audit report dict (``AuditReport.to_dict()`` or its JSON) in the current key names, as a copy: a report
    written before the rename from quantizer to transform lists its results under ``quantizers``, names each one
    under ``quantizer`` and keeps the config's transform list under ``quantizers``; the copy says ``transforms`` /
    ``transform`` throughout (where both are present, the new key wins). Every reader of report dicts goes
    through here, so old reports still load."""
    if not isinstance(report, dict) or not ({"transforms", "quantizers"} & set(report)):
        raise TightropeError("This is not an audit report: it has no 'transforms' list (nor the older 'quantizers').")
    out = _renamed(report, "quantizers", "transforms")
    out["transforms"] = [_renamed(entry, "quantizer", "transform") for entry in out["transforms"]]
    if isinstance(out.get("config"), dict):
        out["config"] = _renamed(out["config"], "quantizers", "transforms")
    return out


def _renamed(data: dict, old: str, new: str) -> dict:
    """A shallow copy of ``data`` with key ``old`` renamed ``new`` in place (dropped when ``new`` is there too)."""
    return {(new if k == old else k): v for k, v in data.items() if not (k == old and new in data)}


def null_statistics(reports: list[dict], digits: int = 6) -> tuple[dict, dict]:
    """``(statistics, layer_models)`` of a null from audit reports of clean models (``AuditReport.to_dict()``
    made with ``judge=False``; older reports' ``quantizers`` keys are read too): per transform and statistic, the
    model-level values (one per report) and the per-layer values (one per layer, with the index of its report in
    ``layer_models``)."""
    stats: dict[str, dict[str, list[float]]] = {}
    owners: dict[str, dict[str, list[int]]] = {}

    def keep(x: float) -> float:
        return float(f"{x:.{digits}g}")

    for i, report in enumerate(reports):
        for q in upgrade_report(report)["transforms"]:
            for name, v in q["statistics"].items():
                per = stats.setdefault(q["transform"], {}).setdefault(name, [])
                if "values" in v:
                    per.extend(keep(x) for x in v["values"])
                    owners.setdefault(q["transform"], {}).setdefault(name, []).extend([i] * len(v["values"]))
                else:
                    per.append(keep(v["value"]))
    return stats, owners


def load_null(path: str | Path | None = None) -> Null:
    """The shipped null (``tightrope/qattack/null/minilm-classifiers.json``) or one made by the benchmark."""
    if path is None:
        text = resources.files("tightrope.qattack").joinpath("null", DEFAULT_NULL).read_text()
        return Null.from_dict(json.loads(text), f"tightrope/qattack/null/{DEFAULT_NULL}")
    text = read_user_file(path, "null file")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise TightropeError(f"The null file {path} is not JSON ({err.msg}, line {err.lineno}).") from None
    return Null.from_dict(data, str(path))
