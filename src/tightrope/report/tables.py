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
                "" if r.nonzero_parameters in (None, r.parameters) else f" ({r.nonzero_parameters / 1e6:.2f}M nz)"),
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
