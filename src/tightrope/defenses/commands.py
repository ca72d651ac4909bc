"""CLI fronts of the defenses: ``tightrope harden`` (train with a defense, in a pipeline order) and
``tightrope noise`` (Gaussian weight noise before quantization). Thin: options -> configs -> library.

``harden`` is meant to merge into ``tightrope train --defense ...``; it lives here so that the
defenses area does not edit cli.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

QUANT_CHOICES = ("int8", "int8-dynamic", "nf4", "fp4")


def quant_config(name: str):
    """A quantization config for a short name (the formats fake quantization reproduces exactly)."""
    from tightrope.compress import quant  # noqa: PLC0415
    from tightrope.errors import TightropeError  # noqa: PLC0415

    table = {"int8": lambda: quant.LLMInt8(), "int8-dynamic": lambda: quant.Int8Dynamic(),
             "nf4": lambda: quant.NF4(), "fp4": lambda: quant.FP4()}
    if name not in table:
        raise TightropeError(f"Unknown quantization '{name}'; choose one of {', '.join(QUANT_CHOICES)}.")
    return table[name]()


def register(app: typer.Typer, user_errors) -> None:
    @app.command()
    @user_errors
    def harden(
        out: Annotated[Path, typer.Option("--out", "-o", help="Run directory (model in OUT/model, record in OUT/harden.json).")],
        model: Annotated[str, typer.Option(help="Base model: alias, local directory or hub id.")] = "minilm",
        task: Annotated[str, typer.Option(help="Task name or data file.")] = "rotten-tomatoes",
        defense: Annotated[str, typer.Option(help="none, pgd (Madry PGD-K), fast (FGSM + random start) or freelb.")] = "pgd",
        epsilon: Annotated[float, typer.Option(help="Radius of the embedding perturbation.")] = 0.02,
        steps: Annotated[int, typer.Option(help="Ascent steps (pgd, freelb).")] = 3,
        step_size: Annotated[Optional[float], typer.Option(help="Ascent step (default: 2.5 eps/steps; fast 1.25 eps).")] = None,
        norm: Annotated[str, typer.Option(help="linf or l2 (per example).")] = "linf",
        mix: Annotated[float, typer.Option(help="Weight of adversarial examples in the loss (1 = adversarial only).")] = 1.0,
        teacher: Annotated[Optional[str], typer.Option(help="Fine-tuned teacher for a*CE + (1-a)*KD (may use its own tokenizer).")] = None,
        alpha: Annotated[float, typer.Option("--a", help="Weight a of cross-entropy against distillation.")] = 0.5,
        temperature: Annotated[float, typer.Option(help="Distillation temperature T.")] = 2.0,
        order: Annotated[str, typer.Option(help="Steps in order, e.g. prune,train,quantize; quantize before train = QAT.")] = "train",
        prune_sparsity: Annotated[Optional[float], typer.Option(help="Magnitude pruning share for the prune step.")] = None,
        quantize: Annotated[Optional[str], typer.Option(help="int8 (LLM.int8), int8-dynamic, nf4 or fp4, for the quantize step.")] = None,
        noise_sigma: Annotated[Optional[float], typer.Option(help="Gaussian weight noise for the noise step.")] = None,
        noise_relative: Annotated[bool, typer.Option(help="Sigma in units of each layer's quantization step.")] = False,
        data_dir: Optional[str] = None,
        n_train: Optional[int] = None,
        n_eval: int = 500,
        max_length: int = 128,
        batch_size: int = 16,
        epochs: float = 1.0,
        lr: float = 5e-5,
        seed: int = 0,
    ):
        """Fine-tune with a defense, woven into pruning and quantization in the order you choose.

        Example: tightrope harden --model minilm --task imdb --defense fast --epsilon 0.02 --teacher runs/mpnet-imdb
        --order prune,train,quantize --prune-sparsity 0.3 --quantize int8-dynamic --out runs/hardened
        """
        import warnings  # noqa: PLC0415

        from pydantic import ValidationError  # noqa: PLC0415
        from rich.console import Console  # noqa: PLC0415

        from tightrope import models  # noqa: PLC0415
        from tightrope.compress.prune import MagnitudePruning  # noqa: PLC0415
        from tightrope.data import load_task  # noqa: PLC0415
        from tightrope.defenses.config import DefenseConfig, build_objective  # noqa: PLC0415
        from tightrope.defenses.pipeline import parse_order, run_pipeline  # noqa: PLC0415
        from tightrope.errors import TightropeError  # noqa: PLC0415
        from tightrope.evaluate.results import write_json_atomic  # noqa: PLC0415
        from tightrope.train import TrainConfig  # noqa: PLC0415

        console = Console(stderr=True)
        steps_in_order = parse_order(order)
        try:
            config = DefenseConfig(kind=defense, epsilon=epsilon, steps=steps, step_size=step_size, norm=norm, mix=mix,
                                   teacher=teacher, a=alpha, temperature=temperature,
                                   fake_quant=None)
            train_config = TrainConfig(model=model, task=task, data_dir=data_dir, n_train=n_train, n_eval=n_eval,
                                       max_length=max_length, batch_size=batch_size, epochs=epochs, lr=lr, seed=seed)
        except ValidationError as err:
            first = err.errors()[0]
            raise TightropeError(f"Invalid value for {'.'.join(map(str, first['loc']))}: {first['msg']}.") from None
        labels = list(load_task(task, "train", data_dir=data_dir).label_names)
        loaded = models.load_classifier(model, label_names=labels, require_head=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            objective = build_objective(config, student_labels=labels, student_tokenizer=loaded.tokenizer)
        for w in caught:
            console.print(f"[yellow]warning:[/] {w.message}")
        noise = {"sigma": noise_sigma, "relative": noise_relative, "seed": seed} if noise_sigma is not None else None
        if noise is not None and noise_relative and quantize:
            from tightrope.defenses.pipeline import scheme_for  # noqa: PLC0415

            noise["scheme"] = scheme_for(quant_config(quantize))
        result = run_pipeline(
            loaded, steps_in_order, out,
            train_config=train_config if "train" in steps_in_order else None,
            objective=objective,
            prune=MagnitudePruning(sparsity=prune_sparsity) if prune_sparsity is not None else None,
            quantize=quant_config(quantize) if quantize else None,
            noise=noise, export=False,
        )
        from tightrope.compress.prune import pruning_card  # noqa: PLC0415

        card = {"kind": "tightrope.model", "created_by": "tightrope harden", "pipeline": result.to_dict(),
                "defense": config.model_dump(), "tokenization": {"max_length": max_length, "truncation": "head"},
                **pruning_card(loaded.model)}
        models.save_model(loaded, out / "model", extra={"card.json": card})
        write_json_atomic(out / "harden.json", result.to_dict())
        typer.echo(f"wrote {out / 'model'} and {out / 'harden.json'}")
        if quantize:
            typer.echo(f"quantize it for shipping with the {quant_config(quantize).method} config "
                       "(the same weights give the same quantized model)")

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
        models.save_model((clf.model, clf.tokenizer), out, extra={"card.json": card})
        typer.echo(f"wrote {out}: {len(summary.modules)} layers, mean |change| {summary.mean_abs_change:.2e}")
