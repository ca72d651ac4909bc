"""Rich and Markdown tables of result records."""

from __future__ import annotations

from rich.table import Table

from tightrope.evaluate.results import EvalResult


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.1f}"


def eval_rows(results: list[EvalResult]) -> tuple[list[str], list[list[str]]]:
    header = ["model", "examples", "accuracy", "macro-F1", "latency ms (med / p95)", "thrpt ex/s",
              "stored MB", "params", "peak RSS MB"]
    rows = []
    for r in results:
        lat = r.latency
        rows.append([
            r.model,
            str(r.metrics.examples),
            f"{r.metrics.accuracy:.4f}",
            f"{r.metrics.macro_f1:.4f}",
            "-" if lat is None else f"{lat.median_ms:.1f} / {lat.p95_ms:.1f} (1x{lat.seq_len}, {lat.threads}t)",
            "-" if r.throughput is None else f"{r.throughput.examples_per_s:.1f} ({r.throughput.batch_size}x{r.throughput.seq_len})",
            _mb(r.weight_bytes),
            "-" if r.parameters is None else f"{r.parameters / 1e6:.2f}M" + (
                # a handful of exact zeros in any trained model is not sparsity: show non-zeros past 0.5%
                "" if r.nonzero_parameters is None or r.nonzero_parameters > 0.995 * r.parameters
                else f" ({r.nonzero_parameters / 1e6:.2f}M nz)"),
            _mb(r.peak_rss_bytes),
        ])
    return header, rows


def eval_table(results: list[EvalResult]) -> Table:
    header, rows = eval_rows(results)
    table = Table(title=f"{results[0].task} / {results[0].split}" if results else "evaluation")
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    return table


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# --- study reports: the seed paper's Table I and Table II ----------------------------------------


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _ms(latency: dict | None) -> str:
    return "-" if not latency else f"{latency['median_ms']:.1f} ms"


def _mb_of(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.1f} MB"


def table_one(before: dict, after: dict, asr_before: float | None, asr_after: float | None,
              names: tuple[str, str] = ("before", "after")) -> tuple[list[str], list[list[str]]]:
    """The seed's Table I (metrics before / after optimisation) from two evaluation dicts."""
    header = ["metric", f"before ({names[0]})", f"after ({names[1]})"]
    rows = [
        ["accuracy", _pct(before["metrics"]["accuracy"]), _pct(after["metrics"]["accuracy"])],
        ["macro-F1", _pct(before["metrics"]["macro_f1"]), _pct(after["metrics"]["macro_f1"])],
        ["latency (median, batch 1)", _ms(before.get("latency")), _ms(after.get("latency"))],
        ["peak memory (process RSS)", _mb_of(before.get("peak_rss_bytes")), _mb_of(after.get("peak_rss_bytes"))],
        ["stored weights", _mb_of(before.get("weight_bytes")), _mb_of(after.get("weight_bytes"))],
        ["attack success rate", _pct(asr_before), _pct(asr_after)],
    ]
    return header, rows


def table_two(evals: dict[str, dict], techniques: dict[str, str]) -> tuple[list[str], list[list[str]]]:
    """The seed's Table II (size, inference time, memory per technique), one row per model."""
    header = ["model", "technique", "parameters (non-zero)", "stored", "latency median / p95", "peak memory",
              "accuracy"]
    rows = []
    for name, e in evals.items():
        technique = techniques.get(name, "-")
        params = e.get("parameters")
        nz = e.get("nonzero_parameters")
        size = "-" if params is None else f"{params / 1e6:.1f}M" + ("" if nz in (None, params) else f" ({nz / 1e6:.1f}M)")
        lat = e.get("latency")
        rows.append([name, technique, size, _mb_of(e.get("weight_bytes")),
                     "-" if not lat else f"{lat['median_ms']:.1f} / {lat['p95_ms']:.1f} ms",
                     _mb_of(e.get("peak_rss_bytes")), _pct(e["metrics"]["accuracy"])])
    return header, rows


def robustness_table(evals: dict[str, dict], attacks: dict[str, dict[str, dict]]) -> tuple[list[str], list[list[str]]]:
    """Every model under every attack, on the same examples: clean accuracy and F1 (test subset), latency,
    memory, then per attack its success rate (TextAttack's definition) and, for text attacks, the average
    queries and share of words changed; for embedding attacks, the epsilon it was read at."""
    header = ["model", "accuracy", "macro-F1", "latency", "peak memory"]
    for name, per in attacks.items():
        first = next(iter(per.values()), {})
        if "points" in first:
            header.append(f"{name} ASR (eps={first.get('epsilon')})")
        else:
            header += [f"{name} ASR", f"{name} queries / words changed"]
    models = list(evals) + [m for per in attacks.values() for m in per if m not in evals]
    rows = []
    for model in dict.fromkeys(models):
        e = evals.get(model)
        row = [model, "-" if e is None else _pct(e["metrics"]["accuracy"]),
               "-" if e is None else _pct(e["metrics"]["macro_f1"]), _ms(None if e is None else e.get("latency")),
               _mb_of(None if e is None else e.get("peak_rss_bytes"))]
        for name, per in attacks.items():
            first = next(iter(per.values()), {})
            r = per.get(model)
            asr = None if r is None else r.get("attack_success_rate")
            cell = "-" if r is None else f"{_pct(asr)} ({r.get('succeeded', '?')}/{r.get('succeeded', 0) + r.get('failed', 0)})"
            if "points" in first:
                if r is not None:
                    point = next((p for p in r["points"] if p["epsilon"] == r.get("epsilon")), None)
                    cell = "-" if point is None else f"{_pct(asr)} ({point['succeeded']}/{point['succeeded'] + point['failed']})"
                row.append(cell)
            else:
                row += [cell, "-" if r is None else f"{r.get('average_queries', 0):.0f} / {_pct(r.get('average_perturbed_share'))}"]
        rows.append(row)
    return header, rows


def epsilon_table(attacks: dict[str, dict[str, dict]]) -> tuple[list[str], list[list[str]]] | None:
    """Accuracy under each embedding attack at every epsilon it ran (the curve the seed asks for)."""
    rows, epsilons = [], []
    for name, per in attacks.items():
        for model, r in per.items():
            if "points" not in r:
                continue
            points = sorted(r["points"], key=lambda p: p["epsilon"])
            epsilons = epsilons or [p["epsilon"] for p in points]
            rows.append([f"{name} ({r.get('attack', {}).get('name', '')}, {r.get('attack', {}).get('norm', '')})", model,
                         str(r.get("examples", "-")), _pct(r.get("original_accuracy")),
                         *[_pct(p["accuracy_under_attack"]) for p in points], r.get("gradient_source", "-")])
    if not rows:
        return None
    header = ["attack", "model", "examples", "clean accuracy", *[f"eps={e:g}" for e in epsilons], "gradients from"]
    return header, rows
