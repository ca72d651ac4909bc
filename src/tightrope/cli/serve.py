"""``tightrope export``, ``predict`` and ``serve``: thin fronts that import their library lazily.

``predict`` and ``serve`` import only :mod:`tightrope.serving` (onnxruntime, tokenizers, numpy,
starlette, uvicorn); ``tightrope.cli`` registers only this module when one of them is invoked
(``TORCH_FREE_COMMANDS``), so
torch and transformers are never imported on that path (tests/test_serving.py checks it).
``export`` needs torch: it builds the graph.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from tightrope.cli.base import command, model_argument, out_option


@command()
def export(
    model: Annotated[str, model_argument("A fine-tuned classifier (fp32, pruned, or an int8 ONNX Runtime one)")],
    out: Annotated[Path, out_option("the bundle (replaced whole, never half-written)")],
    embeddings: Annotated[str, typer.Option(help="Word embeddings: int8 (per-row quantized gather), int4 (two codes per byte) or fp32.")] = "int8",
    precision: Annotated[str, typer.Option(help="int8, or fp32 for an unquantized baseline bundle.")] = "int8",
):
    """Write the ONNX Runtime bundle that ships: int8 graph, tokenizer, config.json, card.json.

    The folder loads with optimum's ORTModelForSequenceClassification.from_pretrained(OUT) and with
    `tightrope predict OUT` / `tightrope serve OUT`, which need no torch.

    Example: tightrope export runs/minilm-imdb --out runs/minilm-imdb-bundle
    """
    from tightrope.compress.export import export_bundle  # noqa: PLC0415 - imported when the command runs: the CLI starts without torch

    card = export_bundle(model, out, embeddings=embeddings, precision=precision)
    sizes = card["sizes"]
    files = ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in sizes.items() if k != "total")
    typer.echo(f"wrote {out}: {sizes['total'] / 1e6:.2f} MB ({files})")

@command()
def predict(
    bundle: Annotated[str, typer.Argument(help="A bundle folder written by `tightrope export`.")],
    input: Annotated[Optional[str], typer.Option("--input", "-i", help="JSONL, CSV or text file; - or absent: stdin.")] = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="JSONL file to write; - or absent: stdout.")] = None,
    format: Annotated[Optional[str], typer.Option(help="jsonl, csv or text (default: from the extension; jsonl on stdin).")] = None,
    field: Annotated[str, typer.Option(help="The JSON field or CSV column holding the text.")] = "text",
    batch_size: Annotated[int, typer.Option(min=1, help="Texts per model call (length-bucketed).")] = 32,
    threads: Annotated[Optional[int], typer.Option(min=1, help="ONNX Runtime intra-op threads (default: all cores).")] = None,
):
    """Classify texts with a bundle, torch-free: one JSON line per input, {"label", "probabilities"}.

    Example: tightrope predict runs/bundle --input reviews.jsonl --output predictions.jsonl
    """
    from tightrope.serving.predict import predict_file  # noqa: PLC0415 - onnxruntime (the serve extra) loads when the command runs

    count = predict_file(bundle, input, output, fmt=format, field=field, batch_size=batch_size, threads=threads)
    if output not in (None, "-"):
        typer.echo(f"wrote {count} predictions to {output}", err=True)

@command()
def serve(
    bundle: Annotated[str, typer.Argument(help="A bundle folder written by `tightrope export`.")],
    host: Annotated[str, typer.Option(help="Address to listen on (127.0.0.1: this machine only).")] = "127.0.0.1",
    port: int = 8000,
    max_batch: Annotated[int, typer.Option(min=1, help="Most texts one request may send.")] = 64,
    max_chars: Annotated[int, typer.Option(min=1, help="Most characters one text may have.")] = 50_000,
    batch_size: Annotated[int, typer.Option(min=1, help="Texts per model call within a request.")] = 32,
    concurrency: Annotated[int, typer.Option(min=1, help="Model runs at once (each uses --threads).")] = 1,
    threads: Annotated[Optional[int], typer.Option(min=1, help="ONNX Runtime intra-op threads (default: all cores).")] = None,
):
    """Serve a bundle over HTTP, torch-free: POST /predict {"text": ...} or {"texts": [...]}, GET /health.

    Example: tightrope serve runs/bundle --port 8000
    """
    from tightrope.serving.server import serve as run_server  # noqa: PLC0415 - starlette and uvicorn (the serve extra) load when the command runs

    run_server(bundle, host=host, port=port, threads=threads, max_batch=max_batch, max_chars=max_chars,
               batch_size=batch_size, concurrency=concurrency)
