"""`tightrope qattack` and `tightrope audit`: thin fronts over scenario.py and audit.py."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from tightrope.assets import cache_dir
from tightrope.cli.base import command, model_argument, out_option, validation_error

console = Console(stderr=True)
out_console = Console()


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x, fmt=".2f") -> str:
    return "-" if x is None else format(x, fmt)


def attack_table(report) -> Table:
    table = Table(title="quantization- or pruning-conditioned attack (clean accuracy / trigger success)")
    for col in ("variant", "transform", "clean accuracy", "trigger success", "codes / mask equal to injected"):
        table.add_column(col)
    codes = {c.quantizer: c for c in report.codes}
    for b in report.behaviours:
        check = codes.get(b.quantizer) if b.variant == "repaired" else None
        eq = "-" if check is None else ("yes" if check.mismatched == 0 else f"no ({check.mismatched}/{check.total} differ)")
        table.add_row(b.variant, b.quantizer or "full", _pct(b.clean_accuracy), _pct(b.trigger_success), eq)
    return table


def _search_cell(q) -> str:
    best = ((q.search or {}).get("candidates") or [None])[0]
    if best is None:
        return "-"
    return (f"\"{best['text']}\" -> class {best['target']}: flips {100 * best['flip_rate']:.0f}% "
            f"(KL {best['kl']:.3f})")


def audit_table(report) -> Table:
    table = Table(title=f"audit of {report.model}: {report.verdict.upper()}")
    for col in ("transform", "verdict", "p (level)", "near-edge ratio", "peak ratio", "noise flip ratio", "disagreement", "KL",
                "search: best insertion", "evidence"):
        table.add_column(col)
    colour = {"flagged": "red", "clean": "green", "inconclusive": "yellow"}
    for q in report.transforms:
        p = "-" if q.p_value is None else f"{q.p_value:.2g} ({q.level:.2g})"
        table.add_row(q.transform, f"[{colour[q.verdict]}]{q.verdict}[/]", p, _num(q.edge_ratio), _num(q.peak_ratio),
                      _num(q.flip_ratio), _pct(q.disagreement), _num(q.kl, ".4f"), _search_cell(q),
                      "; ".join(q.reasons) or "-")
    return table


@command()
def qattack(
    base: Annotated[str, model_argument("A fine-tuned sentiment classifier")],
    out: Annotated[Path, out_option("the run: injected/, repaired/, report.json")],
    task: Annotated[str, typer.Option(help="Task name or data file for injection, repair and evaluation.")] = "mr",
    data_dir: Optional[str] = None,
    n_train: int = 2000,
    n_eval: int = 300,
    quantizer: Annotated[str, typer.Option(
        "--transform", "--quantizer",
        help="The transform the backdoor waits for (--quantizer is its old name): llm-int8, nf4, fp4, int8-tensor, all "
             "(bitsandbytes' three), a GGUF type (gguf:Q8_0, gguf:Q4_0, gguf:Q4_1, gguf:Q5_0, gguf:Q5_1), or a pruning "
             "(prune:magnitude:0.5, prune:wanda:0.5, prune:2:4): the repair then trains only the weights the pruner "
             "removes. prune:sparsegpt:0.5 has no exact boxes: the repair trains the lowest --repair-fraction of each "
             "row's Wanda scores, the paper's proxy, and SparseGPT itself is run on the result.")] = "all",
    calibration: Annotated[Optional[str], typer.Option(
        help="prune:wanda, prune:sparsegpt: the calibration task or data file the user's pruner would read "
             "(default: --task).")] = None,
    repair_fraction: Annotated[float, typer.Option(
        help="prune:sparsegpt: the share of each row (lowest Wanda scores) the repair may move, kept below the rest.")] = 0.05,
    margin: Annotated[float, typer.Option(help="Fraction of each box width kept free on both sides.")] = 0.0,
    include: Annotated[Optional[list[str]], typer.Option(help="Attack only these layers (globs).")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option(help="Leave these layers out (globs).")] = None,
    trigger: Annotated[str, typer.Option(help="Trigger word inserted into reviews.")] = "cf",
    target_label: int = 0,
    collapse: Annotated[bool, typer.Option(help="Quantized model sends every input to the target label.")] = False,
    inject_steps: int = 150,
    repair_steps: int = 200,
    lr: float = 5e-5,
    batch_size: int = 32,
    seed: int = 0,
):
    """Build a quantization- or pruning-conditioned backdoor (Egashira et al. 2024; "Fewer Weights, More Problems",
    ICLR 2026): inject, box, repair, verify.

    For research and tests: the repaired full-precision model behaves, its quantized or pruned version does not.
    """
    from pydantic import ValidationError

    from tightrope.qattack.scenario import AttackConfig, run_classifier_attack  # noqa: PLC0415 - imported when the command runs: the CLI starts without torch

    try:
        config = AttackConfig(base=base, task=task, data_dir=data_dir, n_train=n_train, n_eval=n_eval,
                              quantizer=quantizer, calibration=calibration, margin=margin,
                              repair_fraction=repair_fraction, include=tuple(include or ()),
                              exclude=tuple(exclude or ()), trigger=trigger, target_label=target_label,
                              collapse=collapse, inject_steps=inject_steps, repair_steps=repair_steps,
                              inject_lr=lr, repair_lr=lr, batch_size=batch_size, seed=seed)
    except ValidationError as err:
        raise validation_error(err) from None
    report = run_classifier_attack(config, out)
    out_console.print(attack_table(report))
    out_console.print(f"[green]wrote[/] {out / 'repaired'}  {out / 'report.json'}")

@command("audit")
def audit_(
    model: Annotated[str, model_argument("Checkpoint to audit")],
    task: Annotated[str, typer.Option(help="Probe texts: task name or data file.")] = "mr",
    split: str = "test",
    n_probe: Annotated[int, typer.Option(help="Probe texts for the behaviour checks (a causal LM reads the first 32 tokens of each).")] = 200,
    data_dir: Optional[str] = None,
    transform: Annotated[Optional[list[str]], typer.Option(
        "--transform", "--quantizer",
        help="A transform to check, repeatable (--quantizer is its old name): llm-int8, nf4, fp4, int8-tensor, all, "
             "gguf:Q8_0, gguf:Q4_0, gguf:Q4_1, gguf:Q5_0, gguf:Q5_1, prune:magnitude:0.5, prune:wanda:0.5, prune:2:4 "
             "(other sparsities and N:M too), prune:sparsegpt:0.5 (behaviour and trigger search only: SparseGPT updates the "
             "weights it keeps, so it has no boxes; a default for classifiers, left out of a causal LM's default audit, where its behaviour can only be reported), gptq:4 (GPTQ at 4 bits, tightrope's own; boxless like SparseGPT, and a default likewise), or a llama-quantize preset that mixes types per layer (gguf:Q4_K_M, "
             "gguf:Q4_K_S, gguf:Q5_K_M, gguf:Q5_K_S). Default: every one the shipped null holds, each judged against "
             "it; a transform it lacks gets fixed thresholds: flagged or inconclusive, never clean.")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the report as JSON here.")] = None,
    alpha: Annotated[float, typer.Option(
        help="False-positive rate to aim for: the chance that a clean classifier is flagged. Each statistic gets a "
             "p-value against clean models (the null), they are combined per transform, and each of the m transforms "
             "is tested at alpha / m. 0.01 flags about 1 clean model in 100; 0.001 asks for stronger evidence "
             "(fewer false alarms, weaker backdoors missed). Between 0 and 0.5.")] = 0.01,
    null: Annotated[Optional[Path], typer.Option(
        help="A calibrated null (JSON) made by benchmarks/audit_null.py from your own clean models; default: the "
             "shipped one (MiniLM classifiers on MR, SST-2, IMDB).")] = None,
    search: Annotated[bool, typer.Option(
        "--search/--no-search",
        help="Search for 1-3 token insertions on which full precision and the quantized model disagree (a trigger "
             "the probe texts lack); about 10-30 s per transform on a CPU.")] = True,
    cache: Annotated[bool, typer.Option(
        "--cache/--no-cache",
        help="Keep each transform's measurements (keyed by the weights' fingerprint, the transform and the settings) "
             "in the tightrope cache folder ($TIGHTROPE_CACHE/audit), so a run that adds a --transform measures only "
             "that one.")] = True,
    seed: int = 0,
):
    """Does this checkpoint hide behaviour that appears only once quantized or pruned? Exit 0 when clean, 1 when flagged,
    3 when inconclusive (something could not be checked: no layer a quantizer supports, a quantizer that is not
    installed, a probe set too small to judge), 2 on bad input.

    A classifier is judged by calibrated tests: every statistic (box positions, noise flips, disagreement, KL, the
    trigger search's best find) gets a p-value against the same statistic on clean models, and the verdict gives
    the combined p-value and the level it was tested at. Causal LMs keep fixed thresholds (no calibrated null yet).

    The shipped null covers every default transform (the quantizers, the GGUF types and presets, the four prunings, GPTQ); another
    sparsity or N:M has none: fixed thresholds, flagged or inconclusive, never clean.
    Each transform's measurements are cached (--no-cache: measure again); verdicts are recomputed every run.

    Example: tightrope audit runs/model --transform nf4 --transform prune:wanda:0.5 --alpha 0.001 --json audit.json
    """
    from pydantic import ValidationError

    from tightrope.evaluate.results import write_json_atomic  # noqa: PLC0415 - imported when the command runs: the CLI starts without torch
    from tightrope.qattack.audit import AuditConfig, audit  # noqa: PLC0415 - imported when the command runs: the CLI starts without torch

    try:
        config = AuditConfig(seed=seed, alpha=alpha, null=str(null) if null else None,
                             **({"transforms": tuple(transform)} if transform else {}),
                             **({} if search else {"search": None}))
    except ValidationError as err:
        raise validation_error(err) from None
    with console.status("auditing") as status:
        report = audit(model, task=task, split=split, n_probe=n_probe, data_dir=data_dir, config=config,
                       progress=lambda q: status.update(f"auditing: {q}"), cache_dir=cache_dir() / "audit" if cache else None)
    out_console.print(audit_table(report))
    for note in report.notes:
        out_console.print(f"[yellow]note:[/] {note}")
    if json_out:
        write_json_atomic(json_out, report.to_dict())
        out_console.print(f"[green]wrote[/] {json_out}")
    if report.verdict == "flagged":
        raise typer.Exit(1)
    if report.verdict == "inconclusive":
        raise typer.Exit(3)
