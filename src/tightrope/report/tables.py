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
