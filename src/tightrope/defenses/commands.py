"""CLI fronts of the defenses: ``tightrope noise`` (Gaussian weight noise before quantization), and
``tightrope harden``, a deprecated alias of ``tightrope train --defense ...`` (cli.py), which runs
:mod:`tightrope.defenses.run`. Thin: options -> configs -> library.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from tightrope.defenses.run import QUANT_CHOICES, quant_config  # noqa: F401 - kept importable from here


def register(app: typer.Typer, user_errors) -> None:
    @app.command(deprecated=True)
    @user_errors
    def harden(
        out: Annotated[Path, typer.Option("--out", "-o", help="Run directory (see tightrope train --help).")],
        model: Annotated[str, typer.Option(help="Base model: alias, local directory or hub id.")] = "minilm",
        task: Annotated[str, typer.Option(help="Task name or data file.")] = "rotten-tomatoes",
        defense: Annotated[str, typer.Option(help="none, pgd, fast, freelb or a2t.")] = "pgd",
        epsilon: Optional[float] = None,
        steps: Optional[int] = None,
        step_size: Optional[float] = None,
        norm: Optional[str] = None,
        mix: Optional[float] = None,
        teacher: Optional[str] = None,
        alpha: Annotated[Optional[float], typer.Option("--a")] = None,
        temperature: Optional[float] = None,
        order: Optional[str] = None,
        prune_sparsity: Optional[float] = None,
        quantize: Optional[str] = None,
        noise_sigma: Optional[float] = None,
        noise_relative: bool = False,
        data_dir: Optional[str] = None,
        n_train: Optional[int] = None,
        n_eval: int = 500,
        max_length: int = 128,
        batch_size: int = 16,
        epochs: float = 1.0,
        lr: float = 5e-5,
        seed: int = 0,
    ):
        """Deprecated alias of `tightrope train --defense ...` (same options; it forwards there).

        Example: tightrope train --model minilm --task imdb --defense fast --epsilon 0.02 --teacher runs/mpnet-imdb
        --order prune,train,quantize --prune-sparsity 0.3 --quantize int8-dynamic --out runs/hardened
        """
        from rich.console import Console  # noqa: PLC0415

        from tightrope.cli import train  # noqa: PLC0415

        Console(stderr=True).print("[yellow]warning:[/] `tightrope harden` is deprecated; it runs "
                                   "`tightrope train --defense ...`, which takes the same options.")
        train(out=out, model=model, task=task, data_dir=data_dir, n_train=n_train, n_eval=n_eval, eval_split=None,
              max_length=max_length, truncation="head", batch_size=batch_size, epochs=epochs, lr=lr,
              schedule="linear", warmup_ratio=0.06, seed=seed, eval_every=None, patience=None,
              checkpoint_every=50, trust_remote_code=False, defense=defense, epsilon=epsilon, steps=steps,
              step_size=step_size, norm=norm, mix=mix, adv_share=None, query_budget=None, max_candidates=None,
              max_share=None, teacher=teacher, alpha=alpha, temperature=temperature, order=order,
              prune_sparsity=prune_sparsity, quantize=quantize, noise_sigma=noise_sigma, noise_relative=noise_relative)

    @app.command()
    @user_errors
    def noise(
        model: Annotated[str, typer.Argument(help="Model directory, alias or hub id.")],
        out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the noised model.")],
        sigma: Annotated[float, typer.Option(help="Standard deviation (absolute, or in quantization steps).")] = 1e-3,
        relative: Annotated[bool, typer.Option(help="Sigma in units of each layer's quantization step.")] = False,
        scheme: Annotated[str, typer.Option(help="Quantizer whose step a relative sigma uses: int8, int8-dynamic, int8-tensor, nf4, fp4.")] = "int8",
        seed: int = 0,
    ):
        """Add Gaussian noise to the weights before quantization (Egashira et al. 2024's defense)."""
        from tightrope import inference, models  # noqa: PLC0415
        from tightrope.defenses.noise import add_weight_noise_  # noqa: PLC0415

        clf = inference.load(model)
        summary = add_weight_noise_(clf.model, sigma, relative=relative, seed=seed, scheme=scheme)
        card = {**clf.card, "kind": "tightrope.model", "noise": summary.to_dict()}
        card.setdefault("tokenization", {"max_length": clf.max_length, "truncation": clf.truncation})
        models.save_model((clf.model, clf.tokenizer), out, extra={**inference.transform_files(clf), "card.json": card})
        typer.echo(f"wrote {out}: {len(summary.modules)} layers, mean |change| {summary.mean_abs_change:.2e}")


__all__ = ["QUANT_CHOICES", "quant_config", "register"]
