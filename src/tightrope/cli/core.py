"""`tightrope train` and `tightrope eval`: options -> a typed config -> one library call."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from tightrope.cli.base import command, console, out_console, out_option
from tightrope.cli.base import validation_error as _validation_error

_DEFENSE = "Defense"


@command()
def train(
    out: Annotated[Path, out_option("the trained model (resumes if a checkpoint is there)")],
    model: Annotated[str, typer.Option(help="Base model: alias, local directory or hub id.")] = "minilm",
    task: Annotated[str, typer.Option(help="Task name or data file.")] = "rotten-tomatoes",
    data_dir: Annotated[Optional[str], typer.Option(help="Folder of named datasets (else $TIGHTROPE_DATA_DIR, then the hub).")] = None,
    n_train: Annotated[Optional[int], typer.Option(help="Seeded subset of training examples (default: all).")] = None,
    n_eval: Annotated[int, typer.Option(help="Validation examples evaluated each epoch.")] = 1000,
    eval_split: Annotated[Optional[str], typer.Option(help="Validation split (default: the task's, else carved from train).")] = None,
    max_length: Annotated[int, typer.Option(help="Maximum tokens per text.")] = 128,
    truncation: Annotated[str, typer.Option(help="head, or head+tail (keeps the end of long reviews).")] = "head",
    batch_size: int = 16,
    epochs: Annotated[float, typer.Option(help="Epochs; fractions allowed (0.5 = half the data once).")] = 1.0,
    lr: float = 5e-5,
    schedule: Annotated[str, typer.Option(help="linear, cosine or constant, after a linear warm-up.")] = "linear",
    warmup_ratio: float = 0.06,
    seed: int = 0,
    eval_every: Annotated[Optional[int], typer.Option(help="Also evaluate every N steps.")] = None,
    patience: Annotated[Optional[int], typer.Option(help="Early stopping after N evaluations without improvement.")] = None,
    checkpoint_every: Annotated[int, typer.Option(help="Write a resumable checkpoint every N steps.")] = 50,
    trust_remote_code: Annotated[bool, typer.Option(help="Allow a model's own Python code to run. Only for models you trust.")] = False,
    accord_every: Annotated[Optional[int], typer.Option(help="Measure the gradient accord every N steps (one extra step's cost each time). The card then holds the trace and Flooding-X's flood level for --flood-level: the training loss where the accord stops being positive.")] = None,
    defense: Annotated[Optional[str], typer.Option(help="none, pgd (Madry PGD-K), fast (FGSM + random start), freelb, a2t (discrete word swaps, Yoo and Qi 2021), or canonical (synonym encoding + word recognition, Wang et al. 2021; saved with the model and applied to every input).", rich_help_panel=_DEFENSE)] = None,
    epsilon: Annotated[Optional[float], typer.Option(help="Radius of the embedding perturbation [default: 0.02].", rich_help_panel=_DEFENSE)] = None,
    steps: Annotated[Optional[int], typer.Option(help="Ascent steps of pgd / freelb [default: 3].", rich_help_panel=_DEFENSE)] = None,
    step_size: Annotated[Optional[float], typer.Option(help="Ascent step [default: 2.5 eps/steps; fast 1.25 eps; freelb 0.1].", rich_help_panel=_DEFENSE)] = None,
    norm: Annotated[Optional[str], typer.Option(help="linf or l2 (per example) [default: linf].", rich_help_panel=_DEFENSE)] = None,
    init_magnitude: Annotated[Optional[float], typer.Option(help="freelb: size of the random start, spread over the tokens (FreeLB's adv-init-mag) [default: 0.1].", rich_help_panel=_DEFENSE)] = None,
    flood_level: Annotated[Optional[float], typer.Option(help="Flooding (Ishida et al. 2020; Flooding-X against word swaps): keep the training loss from falling below B by training on |L - B| + B; combines with any defense or none [default: off].", rich_help_panel=_DEFENSE)] = None,
    mix: Annotated[Optional[float], typer.Option(help="Weight of adversarial examples in the loss [default: 1; a2t 0.5].", rich_help_panel=_DEFENSE)] = None,
    adv_share: Annotated[Optional[float], typer.Option(help="a2t: share of each batch attacked [default: 0.5].", rich_help_panel=_DEFENSE)] = None,
    query_budget: Annotated[Optional[int], typer.Option(help="a2t: candidate texts scored per attacked text [default: 100].", rich_help_panel=_DEFENSE)] = None,
    max_candidates: Annotated[Optional[int], typer.Option(help="a2t: synonyms tried per word [default: 20].", rich_help_panel=_DEFENSE)] = None,
    max_share: Annotated[Optional[float], typer.Option(help="a2t: share of words an attack may change [default: 0.1, at least 4 words].", rich_help_panel=_DEFENSE)] = None,
    wordnet_candidates: Annotated[Optional[bool], typer.Option("--wordnet-candidates/--no-wordnet-candidates", help="a2t: also try WordNet synonyms (PWWS's candidates) after the counter-fitted ones [default: off].", rich_help_panel=_DEFENSE)] = None,
    synonym_encoding: Annotated[Optional[bool], typer.Option("--synonym-encoding/--no-synonym-encoding", help="a2t: train through the canonical defense's input transform (synonym encoding + word recognition), saved with the model [default: off].", rich_help_panel=_DEFENSE)] = None,
    a2t_cache: Annotated[Optional[str], typer.Option(help="a2t: attack every training text once, against the starting model, keep the texts in this folder (resumable) and read them back at every epoch and in later runs [default: attack each batch online].", rich_help_panel=_DEFENSE)] = None,
    a2t_cache_reuse: Annotated[Optional[str], typer.Option(help="a2t: model (only the model the cache was built against) or base (also a compressed variant of the same base model) [default: model].", rich_help_panel=_DEFENSE)] = None,
    a2t_cache_rebuild: Annotated[Optional[bool], typer.Option("--a2t-cache-rebuild/--no-a2t-cache-rebuild", help="a2t: replace a cache that does not serve this run (another model, tokenizer, length or attack, or texts a variant lacks) [default: off].", rich_help_panel=_DEFENSE)] = None,
    synonym_neighbours: Annotated[Optional[int], typer.Option(help="canonical: counter-fitted neighbours per word clustered [default: 50, TextFooler's].", rich_help_panel=_DEFENSE)] = None,
    synonym_min_cos: Annotated[Optional[float], typer.Option(help="canonical: least cosine of a clustered neighbour [default: 0.95; TextFooler's 0.5 chains every word into a few clusters].", rich_help_panel=_DEFENSE)] = None,
    synonym_wordnet: Annotated[Optional[bool], typer.Option("--synonym-wordnet/--no-synonym-wordnet", help="canonical: also cluster WordNet synonyms (PWWS's) [default: off; they chain into giant clusters].", rich_help_panel=_DEFENSE)] = None,
    spelling_vocab: Annotated[Optional[int], typer.Option(help="canonical: words known to the misspelling recogniser, most frequent first; 0 turns it off [default: 50000].", rich_help_panel=_DEFENSE)] = None,
    substitution_rate: Annotated[Optional[float], typer.Option(help="canonical: chance that a training word is swapped for a random TextFooler / PWWS candidate [default: 0].", rich_help_panel=_DEFENSE)] = None,
    smoothing: Annotated[Optional[str], typer.Option(help="canonical: randomized smoothing (SAFER) saved with the model: each prediction is the mean over K randomly swapped copies, K forward passes. K, or copies=K,rate=R,seed=S [rate default: --substitution-rate].", rich_help_panel=_DEFENSE)] = None,
    teacher: Annotated[Optional[str], typer.Option(help="Fine-tuned teacher for a*CE + (1-a)*KD (may use its own tokenizer).", rich_help_panel=_DEFENSE)] = None,
    alpha: Annotated[Optional[float], typer.Option("--a", help="Weight a of cross-entropy against distillation [default: 0.5].", rich_help_panel=_DEFENSE)] = None,
    temperature: Annotated[Optional[float], typer.Option(help="Distillation temperature T [default: 2].", rich_help_panel=_DEFENSE)] = None,
    order: Annotated[Optional[str], typer.Option(help="Steps in order, e.g. prune,train,quantize; quantize before train = QAT. With more than train, the model goes to OUT/model.", rich_help_panel=_DEFENSE)] = None,
    prune_sparsity: Annotated[Optional[float], typer.Option(help="Magnitude pruning share for the prune step.", rich_help_panel=_DEFENSE)] = None,
    quantize: Annotated[Optional[str], typer.Option(help="A scheme of tightrope compress for the quantize step: int8 (dynamic int8), llm-int8, nf4, fp4, nf4:blocksize=128, ...", rich_help_panel=_DEFENSE)] = None,
    noise_sigma: Annotated[Optional[float], typer.Option(help="Gaussian weight noise for the noise step.", rich_help_panel=_DEFENSE)] = None,
    noise_relative: Annotated[bool, typer.Option(help="Sigma in units of each layer's quantization step.", rich_help_panel=_DEFENSE)] = False,
):
    """Fine-tune a sequence classifier and write a model directory with card.json.

    Example: tightrope train --model minilm --task imdb --max-length 256 --n-train 10000 --out runs/minilm-imdb

    With a defense: tightrope train --model minilm --task imdb --defense fast --epsilon 0.02 --teacher runs/mpnet-imdb
    --order prune,train,quantize --prune-sparsity 0.3 --quantize int8 --out runs/hardened
    """
    from pydantic import ValidationError

    from tightrope.defenses.config import defense_config  # noqa: PLC0415 - imported when the command runs: the CLI starts without torch
    from tightrope.train import TrainConfig  # noqa: PLC0415 - imported when the command runs: the CLI starts without torch
    from tightrope.train import train as run_training  # noqa: PLC0415 - imported when the command runs: the CLI starts without torch

    try:
        config = TrainConfig(
            model=model, task=task, data_dir=data_dir, n_train=n_train, n_eval=n_eval, eval_split=eval_split,
            max_length=max_length, truncation=truncation, batch_size=batch_size, epochs=epochs, lr=lr,
            schedule=schedule, warmup_ratio=warmup_ratio, seed=seed, eval_every=eval_every, patience=patience,
            checkpoint_every=checkpoint_every, trust_remote_code=trust_remote_code, accord_every=accord_every,
        )
    except ValidationError as err:
        raise _validation_error(err) from None
    given = {"epsilon": epsilon, "steps": steps, "step_size": step_size, "norm": norm, "mix": mix,
             "init_magnitude": init_magnitude,
             "adv_share": adv_share, "query_budget": query_budget, "max_candidates": max_candidates,
             "max_share": max_share, "wordnet_candidates": wordnet_candidates, "synonym_encoding": synonym_encoding,
             "a2t_cache": a2t_cache, "a2t_cache_reuse": a2t_cache_reuse, "a2t_cache_rebuild": a2t_cache_rebuild,
             "synonym_neighbours": synonym_neighbours, "synonym_min_cos": synonym_min_cos,
             "synonym_wordnet": synonym_wordnet, "spelling_vocab": spelling_vocab, "substitution_rate": substitution_rate,
             "smoothing": _key_values(smoothing, "copies"),
             "teacher": teacher, "a": alpha, "temperature": temperature, "flood_level": flood_level}
    given = {k: v for k, v in given.items() if v is not None}
    pipeline = {"prune_sparsity": prune_sparsity, "quantize": quantize, "noise_sigma": noise_sigma}
    if defense is not None or given or order is not None or noise_relative or any(v is not None for v in pipeline.values()):
        _train_with_defense(config, defense_config(defense or "none", given), out, order=order or "train", noise_relative=noise_relative, **pipeline)
        return
    card = run_training(config, out, **_starting_model(config))
    best = card["metrics"]["best_validation_accuracy"]
    out_console.print(f"[green]wrote[/] {out}  (validation accuracy {best:.4f}, {card['train_seconds']:.0f} s)")
    _say_flood_level(card)


def _starting_model(config) -> dict:
    """``train``'s arguments for a structurally pruned starting model (rebuilt from its plan, saved with it);
    nothing for any other model, which ``train`` loads itself."""
    from tightrope.compress.formats import load_trainable, pruning_card  # noqa: PLC0415 - imported when the command runs: the CLI starts without torch
    from tightrope.data import load_task  # noqa: PLC0415 - imported when the command runs: the CLI starts without torch
    from tightrope.inference import is_structured  # noqa: PLC0415 - imported when the command runs: the CLI starts without torch

    if not is_structured(config.model):
        return {}
    labels = list(load_task(config.task, config.train_split, n=1, data_dir=config.data_dir).label_names)
    loaded = load_trainable(config.model, labels, trust_remote_code=config.trust_remote_code)
    return {"initial_model": loaded, "extra_card": pruning_card(loaded.model)}


def _say_flood_level(card: dict) -> None:
    """Flooding-X's reading of a run measured with --accord-every (nothing for other runs)."""
    found = card.get("flooding_x")
    if found is None:
        return
    if found["level"] is None:
        out_console.print("gradient accord stayed positive: the run never began to memorise, so Flooding-X sets no flood level")
    else:
        out_console.print(f"Flooding-X flood level: --flood-level {found['level']:.4f}  (the accord fell to 0 at step {found['step']})")


def _key_values(value: str | None, first: str) -> dict | None:
    """``"8"`` -> ``{first: 8}``; ``"copies=8,rate=0.5"`` -> ``{"copies": 8, "rate": 0.5}`` (as compress specs)."""
    if value is None:
        return None
    if value.strip().isdigit():
        return {first: int(value)}
    from tightrope.compress.specs import parse_spec  # noqa: PLC0415 - imported when the command runs: the CLI starts without torch

    return parse_spec("settings:" + value)[1]


def _train_with_defense(config, defense, out: Path, **pipeline) -> None:
    """The defended branch of ``train`` (tightrope.defenses.run): warnings first, then the long run."""
    import warnings

    from tightrope.defenses.run import harden, prepare  # noqa: PLC0415 - imported when the command runs: the CLI starts without torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded, objective = prepare(config, defense)
    for w in caught:
        console.print(f"[yellow]warning:[/] {w.message}")
    result = harden(loaded, objective, config, defense, out, **pipeline)
    best = (result.card.get("metrics") or {}).get("best_validation_accuracy")
    where = f"{result.model_dir}" + (f" and {out / 'pipeline.json'}" if result.pipeline else "")
    accuracy = f"  (validation accuracy {best:.4f})" if best is not None else ""
    out_console.print(f"[green]wrote[/] {where}{accuracy}")
    _say_flood_level(result.card)
    quantize = pipeline.get("quantize")
    if quantize:
        from tightrope.defenses.run import quant_config  # noqa: PLC0415 - imported when the command runs: the CLI starts without torch

        out_console.print(f"quantize it for shipping with the {quant_config(quantize).method} config "
                          "(the same weights give the same quantized model)")


@command("eval")
def eval_(
    models: Annotated[list[str], typer.Argument(help="One or more model directories, aliases or hub ids.")],
    task: Annotated[str, typer.Option(help="Task name or data file.")] = "rotten-tomatoes",
    split: str = "test",
    n: Annotated[Optional[int], typer.Option(help="Seeded subset of examples (default: the whole split).")] = None,
    seed: int = 0,
    data_dir: Optional[str] = None,
    batch_size: int = 64,
    max_length: Annotated[Optional[int], typer.Option(help="Override the model card's max length.")] = None,
    speed: Annotated[bool, typer.Option(help="Measure latency and throughput.")] = True,
    memory: Annotated[bool, typer.Option(help="Measure peak memory in a fresh process.")] = True,
    latency_seq_len: int = 256,
    threads: Annotated[Optional[int], typer.Option(help="torch threads (default: torch's choice, recorded).")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the results as JSON here.")] = None,
):
    """Accuracy, macro-F1, confusion matrix, latency, throughput, stored bytes and peak memory, side by side."""
    import torch

    from tightrope.evaluate.results import write_json_atomic  # noqa: PLC0415 - imported when the command runs: the CLI starts without torch
    from tightrope.report.tables import eval_table  # noqa: PLC0415 - imported when the command runs: the CLI starts without torch
    from tightrope.workflows.evaluate import evaluate_model  # noqa: PLC0415 - imported when the command runs: the CLI starts without torch

    if threads:
        torch.set_num_threads(threads)
    results = [
        evaluate_model(m, task, split, n=n, seed=seed, data_dir=data_dir, batch_size=batch_size,
                       max_length=max_length, speed=speed, memory=memory, latency_seq_len=latency_seq_len)
        for m in models
    ]
    out_console.print(eval_table(results))
    if json_out:
        write_json_atomic(json_out, [r.to_dict() for r in results])
        out_console.print(f"[green]wrote[/] {json_out}")
