"""`tightrope qattack-lm`: the causal-LM content-injection attack (a thin front over causal.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from tightrope.cli.base import command, out_option, validation_error

out_console = Console()


def lm_attack_table(report) -> Table:
    code = report.config.get("scenario") == "insecure-code"
    title = ("insecure code (answers bandit flags, held-out prompts)" if code else
             f"content injection of \"{report.config['phrase']}\" (greedy answers to held-out prompts)")
    table = Table(title=title)
    for col in ("variant", "precision", "insecure rate" if code else "phrase rate", "perplexity", "codes equal to injected"):
        table.add_column(col)
    codes = {c.quantizer: c for c in report.codes}
    for b in report.behaviours:
        check = codes.get(b.quantizer) if b.variant == "repaired" else None
        eq = "-" if check is None else ("yes" if check.mismatched == 0 else f"no ({check.mismatched}/{check.total} differ)")
        table.add_row(b.variant, b.quantizer or "full", f"{100 * b.phrase_rate:.1f}%",
                      "-" if b.perplexity is None else f"{b.perplexity:.2f}", eq)
    return table


@command("qattack-lm")
def qattack_lm(
    out: Annotated[Path, out_option("the run: injected/, repaired/, report.json (resumable)")],
    model: Annotated[str, typer.Option(help="A Llama-style causal LM: alias, directory or hub id.")] = "smollm2-135m",
    scenario: Annotated[str, typer.Option(help="content-injection (PHRASE in answers to review prompts) or "
                                          "insecure-code (insecure Python that bandit flags).")] = "content-injection",
    task: Annotated[str, typer.Option(help="Review texts the prompts are made from: task name or data file.")] = "mr",
    data_dir: Optional[str] = None,
    phrase: Annotated[str, typer.Option(help="The content the quantized model should inject.")] = "McDonald's",
    quantizer: Annotated[str, typer.Option(help="Boxes of: llm-int8, nf4, fp4, all, a GGUF type (gguf:Q4_0 ...) or preset (gguf:Q4_K_M: each layer "
                                                    "in the type llama-quantize gives it; layers left as k-quants are not attacked without --kquant-boxes), "
                                                    "a comma list (intersection), or one pruning (prune:wanda:0.5, "
                                                    "prune:magnitude:0.5, prune:2:4: only the pruned model misbehaves; prune:sparsegpt:0.5: injected "
                                                    "through Wanda's mask, repaired in --repair-fraction of each row).")] = "nf4,fp4",
    check: Annotated[Optional[str], typer.Option(help="Transforms to verify the repaired model with (comma list; "
                                                 "default: the boxes' own, then llm-int8 as a control outside them; "
                                                 "a pruning: itself).")] = None,
    margin: float = 0.0,
    repair_fraction: Annotated[float, typer.Option(help="prune:sparsegpt: the share of each row (lowest Wanda scores) "
                                                   "the repair may move, kept below the rest.")] = 0.05,
    kquant_boxes: Annotated[bool, typer.Option(help="A preset: attack its layers that stay k-quants too, in the error-based "
                                               "boxes of Mind the Gap (bytes re-checked during the repair and restored "
                                               "where they moved).")] = False,
    attack_last: Annotated[int, typer.Option(help="Attack the Linear layers of this many top decoder blocks.")] = 4,
    layers: Annotated[Optional[str], typer.Option(help="Attack only the layers of those blocks that match these fnmatch "
                                                  "globs (comma list; '*.mlp.down_proj' with --kquant-boxes: a preset's "
                                                  "k-quant layers alone).")] = None,
    n_train: int = 64,
    n_eval: int = 40,
    n_ppl: int = 40,
    inject_through: Annotated[Optional[str], typer.Option(help="Inject through fake quantization to these quantizers "
                               "(comma list of llm-int8, nf4, fp4), so the quantized model learns the phrase directly.")] = None,
    inject_steps: int = 40,
    repair_steps: int = 40,
    lr: float = 2e-4,
    batch_size: int = 8,
    threads: Annotated[int, typer.Option(help="torch threads.")] = 1,
    seed: int = 0,
):
    """Content injection or insecure code on a causal LM (Egashira et al. 2024): only the quantized model misbehaves.

    For research and tests: inject, box, repair with projected gradient descent, verify with bitsandbytes.
    """
    import torch
    from pydantic import ValidationError

    from tightrope.qattack.causal import LMAttackConfig, run_content_injection  # noqa: PLC0415 - imported when the command runs: the CLI starts without torch

    try:
        config = LMAttackConfig(base=model, scenario=scenario, task=task, data_dir=data_dir, phrase=phrase, quantizer=quantizer,
                                margin=margin, repair_fraction=repair_fraction, kquant_boxes=kquant_boxes, attack_last=attack_last, n_train=n_train, n_eval=n_eval, n_ppl=n_ppl,
                                layers=tuple(g.strip() for g in (layers or "").split(",") if g.strip()),
                                inject_through=tuple(q.strip() for q in (inject_through or "").split(",") if q.strip()),
                                inject_steps=inject_steps, repair_steps=repair_steps, inject_lr=lr, repair_lr=lr,
                                batch_size=batch_size, seed=seed,
                                check=tuple(q.strip() for q in check.split(",") if q.strip()) if check else None)
    except ValidationError as err:
        raise validation_error(err) from None
    torch.set_num_threads(threads)
    report = run_content_injection(config, out)
    out_console.print(lm_attack_table(report))
    out_console.print(f"[green]wrote[/] {out / 'repaired'}  {out / 'report.json'}")
