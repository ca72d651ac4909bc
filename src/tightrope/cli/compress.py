"""``tightrope compress``: prune and / or quantize a model directory and write it back with its summary.

Specs are ``name`` or ``name:key=value,key=value``: ``--quantize nf4``, ``--quantize
gptq:bits=4,group_size=128``, ``--quantize affine:bits=4,granularity=group``, ``--prune
magnitude:sparsity=0.3``. Steps run in the order given (prunes first, then the quantization).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from tightrope.cli.base import command, model_argument, out_option


def summary_table(summaries):
    from rich.table import Table  # noqa: PLC0415

    table = Table(title="compression")
    for col in ("method", "modules", "bits/weight", "simulated", "parameters", "non-zero", "stored MB"):
        table.add_column(col, justify="right" if col not in ("method",) else "left")
    for s in summaries:
        table.add_row(s.method, str(len(s.modules)), f"{s.bits:.2f}" if s.bits is not None else "-",
                      "yes" if s.simulated else "no", f"{s.parameters:,}", f"{s.nonzero_parameters:,}",
                      f"{s.stored_bytes / 1e6:.1f}" if s.stored_bytes is not None else "-")
    return table


@command()
def compress(
    model: Annotated[str, model_argument("The fine-tuned classifier to compress")],
    out: Annotated[Path, out_option("the compressed model")],
    quantize: Annotated[Optional[str], typer.Option(help="int8 (fastest backend), int8-torch, int8-ort, llm-int8, nf4, "
                                                    "nf4-dq, fp4, fp4-dq, affine:bits=4,granularity=group, gptq:bits=4.")] = None,
    prune: Annotated[Optional[list[str]], typer.Option(help="magnitude:sparsity=0.3, wanda:..., sparsegpt:sparsity=0.5 (or n=2,m=4), 2:4, structured:heads=0.3,ffn=0.3; repeatable.")] = None,
    include: Annotated[Optional[list[str]], typer.Option(help="Module name globs to compress (default: encoder Linears).")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option(help="Module name globs to leave alone.")] = None,
    calibration: Annotated[Optional[str], typer.Option(help="Task or data file for calibration (GPTQ, Wanda, SparseGPT).")] = None,
    recover_steps: Annotated[int, typer.Option(min=0, help="After pruning, fine-tune this many steps (batch 16, "
                                               "sparsity held) before quantizing; 200 brought 30% structured MiniLM "
                                               "on IMDB from 0.790 back to 0.868.")] = 0,
    recover_task: Annotated[Optional[str], typer.Option(help="Task or data file whose train split the recovery "
                                                       "uses (default: the task the model was trained on).")] = None,
    recover_teacher: Annotated[Optional[str], typer.Option(help="Distil the recovery from this teacher: 'auto' (the "
                                                          "model being compressed, before pruning, frozen) or a model "
                                                          "with the same tokenizer and labels; loss a*CE + (1-a)*KD.")] = None,
    recover_a: Annotated[Optional[float], typer.Option(min=0.0, max=1.0, help="Weight a of cross-entropy in the "
                                                       "distilled recovery's a*CE + (1-a)*KD (default 0.5).")] = None,
    recover_temperature: Annotated[Optional[float], typer.Option(min=0.0, help="Temperature T of the distilled "
                                                                 "recovery's KD term (default 2).")] = None,
    recover_max_length: Annotated[Optional[int], typer.Option(min=8, help="Tokens per recovery text (default: the "
                                                              "model's max length, at most 128).")] = None,
    recover_lr: Annotated[Optional[float], typer.Option(min=0.0, help="Peak learning rate of the recovery "
                                                        "(default 2e-5, linear decay).")] = None,
    recover_guided: Annotated[Optional[str], typer.Option(help="An audit report (tightrope audit --json) whose trigger "
                                                          "search ran for this pruning: the distilled recovery also "
                                                          "trains on copies of the texts with the search's best "
                                                          "insertions, which removes a pruning-conditioned backdoor "
                                                          "that plain recovery keeps (docs/qattack-results.md).")] = None,
    calibration_guided: Annotated[Optional[str], typer.Option(help="An audit report (tightrope audit --json): a "
                                                              "calibrated pruner (wanda, sparsegpt) reads the "
                                                              "calibration texts plus copies with the trigger search's "
                                                              "best insertions, so SparseGPT rebuilds the unpruned "
                                                              "model's answer to them; no training "
                                                              "(docs/qattack-results.md).")] = None,
):
    """Quantize and / or prune a model and write it back with what each step bought.

    Example: tightrope compress runs/minilm-imdb --prune structured:heads=0.3,ffn=0.3 --recover-steps 200 --quantize int8 --out runs/small

    Distilled recovery: add --recover-teacher auto (the unpruned model teaches, a=0.5, T=2 unless --recover-a / --recover-temperature).

    Against a pruning-conditioned backdoor: tightrope audit MODEL --transform prune:magnitude:0.5 --json audit.json, then
    tightrope compress MODEL --prune magnitude:sparsity=0.5 --recover-steps 100 --recover-teacher auto --recover-guided audit.json --out runs/pruned

    SparseGPT, no training: tightrope compress MODEL --prune sparsegpt:sparsity=0.5,n_calibration=128 --calibration mr --calibration-guided audit.json --out runs/pruned
    """
    from rich.console import Console  # noqa: PLC0415

    from tightrope.workflows.compress import compress_model  # noqa: PLC0415 - torch loads when a command runs

    settings = dict(quantize=quantize, prune=prune, include=tuple(include or ()), exclude=tuple(exclude or ()),
                    calibration=calibration, recover_steps=recover_steps, recover_task=recover_task,
                    recover_teacher=recover_teacher, recover_a=recover_a, recover_temperature=recover_temperature,
                    recover_max_length=recover_max_length, recover_lr=recover_lr)
    if recover_guided is not None or calibration_guided is not None:
        from tightrope.qattack.defense import guided_compress  # noqa: PLC0415 - torch loads when a command runs

        summaries = guided_compress(model, out, recover_guided, calibration_report=calibration_guided, **settings)
    else:
        summaries = compress_model(model, out, **settings)
    console = Console()
    console.print(summary_table(summaries))
    for s in summaries:
        for note in s.notes:
            console.print(f"[dim]{s.method}: {note}[/]")
    console.print(f"[green]wrote[/] {out}")
