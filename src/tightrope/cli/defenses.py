"""CLI front of ``tightrope noise`` (Gaussian weight noise before quantization). Defended training
is ``tightrope train --defense ...`` (cli.py). Thin: options -> configs -> library.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tightrope.cli.base import command, model_argument, out_option


@command()
def noise(
    model: Annotated[str, model_argument("The model to noise")],
    out: Annotated[Path, out_option("the noised model")],
    sigma: Annotated[float, typer.Option(help="Standard deviation (absolute, or in quantization steps).")] = 1e-3,
    relative: Annotated[bool, typer.Option(help="Sigma in units of each layer's quantization step.")] = False,
    scheme: Annotated[str, typer.Option(help="Quantizer whose step a relative sigma uses: llm-int8, int8 (dynamic), int8-tensor, nf4, fp4.")] = "llm-int8",
    seed: int = 0,
):
    """Add Gaussian noise to the weights before quantization (Egashira et al. 2024's defense)."""
    from tightrope import inference, models, workflows  # noqa: PLC0415 - imported when the command runs: the CLI starts without torch
    from tightrope.defenses.noise import add_weight_noise_  # noqa: PLC0415 - imported when the command runs: the CLI starts without torch

    clf = workflows.load(model)
    summary = add_weight_noise_(clf.model, sigma, relative=relative, seed=seed, scheme=scheme)
    card = {**clf.card, "kind": "tightrope.model", "noise": summary.to_dict()}
    card.setdefault("tokenization", {"max_length": clf.max_length, "truncation": clf.truncation})
    models.save_model((clf.model, clf.tokenizer), out, extra={**inference.transform_files(clf), "card.json": card})
    typer.echo(f"wrote {out}: {len(summary.modules)} layers, mean |change| {summary.mean_abs_change:.2e}")

