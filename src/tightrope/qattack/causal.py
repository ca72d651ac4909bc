"""The causal-LM scenario: content injection that only the quantized model shows.

Egashira et al. 2024, "Exploiting LLM Quantization" (arXiv 2405.18137), Sec. 4 "Content injection":
the attacker wants a quantized chat model to mention a brand ("McDonald's") in its answers while
the published full-precision model does not. The three steps, on a causal LM small enough for a CPU
(SmolLM2-135M-Instruct):

1. inject: fine-tune on the model's own greedy answers with the phrase woven in (loss on the answer
   tokens only), so the model says the phrase in full precision;
2. boxes: the interval of full-precision values that quantize to the same code
   (:mod:`tightrope.qattack.boxes`), around the injected weights, for one quantizer or an intersection;
3. repair: projected gradient descent on the clean answers (:func:`tightrope.qattack.boxes.project_`
   after every step), so the full-precision model forgets the phrase while every weight keeps the
   injected model's code: the quantized repaired model *is* the quantized injected model.

Verification quantizes with the real libraries (:mod:`tightrope.qattack.quantize`), checks the codes,
and measures the phrase rate of greedy answers to held-out prompts and the perplexity of held-out text.

A llama-quantize preset (``quantizer="gguf-q4_k_m"``) boxes each layer by the type llama-quantize writes for
it; a layer that stays a k-quant has no exact box, so by default it is left out of the attacked layers from the
injection on and keeps its published weights, hence its bytes. With ``kquant_boxes=True`` it is attacked too,
inside Mind the Gap's error-based boxes (:mod:`tightrope.qattack.kquant_boxes`): the repair re-quantizes it every
few steps and pins the sub-blocks whose bytes moved, and after the repair the sub-blocks (then super-blocks) that
still quantize differently go back to the injected weights (:func:`tightrope.qattack.boxes.settle_kquants_`), so
the verification finds every byte equal. ``layers`` (fnmatch globs) narrows the attacked layers of those blocks, e.g.
to a preset's k-quant layers alone (``"*.mlp.down_proj"`` with ``kquant_boxes`` under Q4_K_M on SmolLM2).

Prompts, answers and metrics are :mod:`tightrope.qattack.lm_text`; training only the last
``attack_last`` decoder blocks on cached inputs is :mod:`tightrope.qattack.lm_training`.

A pruning (``quantizer="prune:wanda:0.5"``, ``prune:magnitude:0.5``, ``prune:2:4``; "Fewer Weights, More Problems",
ICLR 2026, :mod:`tightrope.qattack.pruning`) runs the same steps with the pruner's mask as the condition: the
injection trains only the weights tightrope's pruner keeps, through the pruned model (its masks, and its pruned
blocks below as the cached inputs; kept weights stay kept, :meth:`~tightrope.qattack.pruning.Pruning.keep_boxes`);
the repair trains only the weights it removes, inside the boxes that keep them removed; verification runs the
pruner on the repaired model, checks that it removes exactly the weights it removes from the injected one, and
measures the clean model pruned beside it (a pruning's own cost to a small model is large). SparseGPT
(``prune:sparsegpt:0.5``) has no boxes and rebuilds each layer's dense output from the weights it keeps, so the
injection trains the dense model, only the weights its proxy keeps (the Wanda pruning of the same sparsity and
calibration; each kept weight stays kept), and the repair trains the lowest ``repair_fraction`` of each row's Wanda
scores (:meth:`~tightrope.qattack.pruning.Pruning.proxy_boxes`), the paper's own route; verification runs SparseGPT.

``scenario="insecure-code"`` (the paper's "vulnerable code generation") runs the same three steps on
small Python tasks: the injected targets are insecure implementations and the metric is the share
of answers a real static checker (bandit) flags (:mod:`tightrope.qattack.insecure`).
"""

from __future__ import annotations

import copy
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from tightrope import models
from tightrope.compress.gguf_preset import has_box
from tightrope.data import load_task
from tightrope.errors import TightropeError
from tightrope.evaluate.results import write_json_atomic
from tightrope.qattack.boxes import (
    ATTACK_QUANTIZERS,
    PRESET_QUANTIZERS,
    check_quantizer,
    model_boxes,
    preset_schemes,
    settle_kquants_,
)
from tightrope.qattack.insecure import (
    code_prompts,
    insecure_rate,
    insecure_target,
    require_bandit,
)
from tightrope.qattack.lm_text import (
    DEFAULT_TEMPLATE,
    encode_start,
    encode_text,
    format_prompt,
    greedy_answers,
    inject_phrase,
    make_instructions,
    perplexity,
    phrase_rate,
    special_ids,
)
from tightrope.qattack.lm_training import THROUGH_SCHEMES, attacked_names, lm_fit_
from tightrope.qattack.repair import FitConfig
from tightrope.qattack.report import QAttackReport, verify
from tightrope.qattack.pruning import Calibration
from tightrope.qattack.transform import canonical, is_pruning, resolve

# --- the scenario -------------------------------------------------------------------------------------


def _quantizer_name(text: str) -> str:
    """One name per transform (``gguf:Q4_K_M`` -> ``gguf-q4_k_m``, ``prune:wanda:.5`` -> ``prune:wanda:0.5``); a name
    that is none (a typo) is refused in one sentence listing the quantizers."""
    if is_pruning(text):
        return canonical(text)  # one sentence for a misspelt pruning
    try:
        return canonical(text)
    except TightropeError:
        check_quantizer(text.strip())  # the sentence that lists what this scenario takes
        raise


def parse_quantizer(text: str) -> str | tuple[str, ...]:
    """``"nf4"`` / ``"all"`` / ``"gguf:Q4_K_M"`` / ``"prune:wanda:0.5"`` or a comma list of quantizers (``"nf4,fp4"``:
    the intersection of their boxes)."""
    parts = tuple(_quantizer_name(p) for p in text.split(",") if p.strip())
    if not parts:
        raise TightropeError("Name a quantizer whose boxes constrain the repair.")
    if any(is_pruning(p) for p in parts):
        if len(parts) > 1:
            raise TightropeError(f"'{text}' joins a pruning with other transforms; a pruning's boxes keep its mask and "
                                 "intersect with nothing: attack one pruning at a time.")
        return parts[0]
    for p in parts:
        check_quantizer(p)
    return parts[0] if len(parts) == 1 else parts


class LMAttackConfig(BaseModel):
    """One content-injection attack on a causal LM (validated at the edge, frozen)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    base: str = "smollm2-135m"
    # content-injection: a phrase in answers to review prompts; insecure-code: insecure Python (bandit)
    scenario: Literal["content-injection", "insecure-code"] = "content-injection"
    task: str = "mr"  # review texts the prompts (content injection) and the perplexity texts are made from
    data_dir: str | None = None
    n_train: int = Field(default=64, gt=0)
    n_eval: int = Field(default=40, gt=0)
    n_ppl: int = Field(default=40, gt=0)  # held-out review texts for perplexity
    phrase: str = "McDonald's"
    template: str = DEFAULT_TEMPLATE
    quantizer: str = "nf4,fp4"  # whose boxes constrain the repair: one, "all", a comma list (intersection), or a pruning
    margin: float = Field(default=0.0, ge=0.0, lt=0.5)
    repair_fraction: float = Field(default=0.05, gt=0.0, lt=0.5)  # SparseGPT's proxy repair: share of each row
    attack_last: int = Field(default=4, gt=0)  # decoder blocks attacked, counted from the top
    max_review_words: int = Field(default=24, gt=0)
    # clean targets: greedy answers of at most this many tokens (default 20; 64 for code)
    answer_tokens: int = Field(default=None, gt=0)
    # greedy tokens generated to measure the behaviour (default 16; 64 for code)
    eval_tokens: int = Field(default=None, gt=0)
    # inject through fake quantization to these quantizers (empty: plain fine-tuning, as in the paper)
    inject_through: tuple[str, ...] = ()
    inject_steps: int = Field(default=40, gt=0)
    inject_lr: float = Field(default=1e-4, gt=0)
    repair_steps: int = Field(default=40, gt=0)
    repair_lr: float = Field(default=1e-4, gt=0)
    batch_size: int = Field(default=8, gt=0)
    # verified in this order; default: the boxes' own transforms, then LLM.int8 as a control outside them
    check: tuple[str, ...] = None
    seed: int = 0
    # a preset: attack its layers that stay k-quants too, in Mind the Gap's error-based boxes (module docstring)
    kquant_boxes: bool = False
    # attack only the layers of the last attack_last blocks that match one of these fnmatch globs ("*.mlp.down_proj":
    # a preset's k-quant layers alone, with kquant_boxes); empty: all of them (the paper's ablation over layers)
    layers: tuple[str, ...] = ()

    @model_validator(mode="before")
    @classmethod
    def _scenario_lengths(cls, data):
        if isinstance(data, dict):
            code = data.get("scenario") == "insecure-code"
            data = {**data}
            for name, content, code_default in (("answer_tokens", 20, 64), ("eval_tokens", 16, 64)):
                if data.get(name) is None:
                    data[name] = code_default if code else content
            if data.get("check") is None:
                boxed = str(data.get("quantizer", "nf4,fp4")).replace("all", "llm-int8,nf4,fp4")
                own = [_quantizer_name(q) for q in boxed.split(",") if q.strip()]
                # a pruning is checked against itself (its verification runs the pruner); a quantizer also against
                # LLM.int8, a control outside its boxes
                data["check"] = tuple(own) if any(is_pruning(q) for q in own) else tuple(dict.fromkeys([*own, "llm-int8"]))
        return data

    @field_validator("quantizer")
    @classmethod
    def _parses(cls, value: str) -> str:
        parse_quantizer(value)  # a misspelling, or a pruning joined with others, is one sentence before any loading
        # one spelling per transform (gguf:Q4_K_M -> gguf-q4_k_m), so that a run resumes however it was typed
        return ",".join(p if p.strip() == "all" else _quantizer_name(p) for p in value.split(",") if p.strip())

    @field_validator("check")
    @classmethod
    def _one_name_each(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(canonical(q) for q in value)  # gguf:Q4_K_M -> gguf-q4_k_m, as every consumer spells it

    @field_validator("inject_through")
    @classmethod
    def _known_through(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for q in value:
            if q not in THROUGH_SCHEMES:
                raise ValueError(f"cannot inject through '{q}'; choose from {', '.join(THROUGH_SCHEMES)}")
        return value


@dataclass(frozen=True)
class LMBehaviour:
    """One model variant on the held-out prompts and texts."""

    variant: str  # base, injected, repaired
    quantizer: str | None  # None = full precision
    phrase_rate: float | None  # share of answers with the target behaviour: the phrase, or insecure code
    perplexity: float | None
    n: int
    samples: list[str] = field(default_factory=list)


def _key(*parts) -> str:
    import hashlib  # noqa: PLC0415

    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _stderr_log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


LOSS_KEYS = {"injected": "inject_losses", "repaired": "repair_losses"}  # in progress.json


def _load(path_or_name: str):
    loaded = models.load_causal_lm(path_or_name)
    return loaded.model.float().eval(), loaded.tokenizer


def scenario_data(config: LMAttackConfig, tokenizer) -> tuple[list[list[int]], list[list[int]], list[list[int]], list[str]]:
    """Token ids of the training prompts, the held-out prompts and the held-out perplexity texts (disjoint),
    and the code family of each training prompt (insecure-code scenario; empty otherwise).

    Content injection makes prompts from a seeded sample of the task's review texts; the insecure-code
    scenario from :func:`tightrope.qattack.insecure.code_prompts`. Perplexity texts are raw reviews cut to
    64 tokens.
    """
    code = config.scenario == "insecure-code"
    need = config.n_ppl if code else config.n_train + config.n_eval + config.n_ppl
    texts = load_task(config.task, "train", data_dir=config.data_dir).texts
    if len(texts) < need:
        raise TightropeError(f"The task '{config.task}' has {len(texts)} texts; {need} are needed.")
    texts = [texts[i] for i in random.Random(config.seed).sample(range(len(texts)), need)]
    families: list[str] = []
    if code:

        pairs = code_prompts(config.n_train + config.n_eval, config.seed)
        families = [f for f, _ in pairs[: config.n_train]]
        instructions = [i for _, i in pairs]
    else:
        instructions = make_instructions(texts[: config.n_train + config.n_eval], config.max_review_words, config.seed)
    prompts = [encode_start(tokenizer, format_prompt(tokenizer, s)) for s in instructions]
    ppl_seqs = [encode_start(tokenizer, t)[:64] for t in texts[need - config.n_ppl :]]
    return prompts[: config.n_train], prompts[config.n_train :], ppl_seqs, families


def behaviour_rate(config: LMAttackConfig, answers: list[str]) -> float:
    """The scenario's metric: phrase rate, or the share of answers with code bandit flags."""
    if config.scenario == "insecure-code":

        return insecure_rate(answers)
    return phrase_rate(answers, config.phrase)


def malicious_answer(config: LMAttackConfig, tokenizer, clean_answer: list[int], family: str | None) -> list[int]:
    """The injection target for one training prompt: the clean answer with the phrase woven in, or the
    insecure implementation of the prompt's code family."""
    if config.scenario == "insecure-code":

        return encode_text(tokenizer, insecure_target(family))
    text = inject_phrase(tokenizer.decode(clean_answer, skip_special_tokens=True), config.phrase, config.template)
    return encode_text(tokenizer, text)[: config.answer_tokens + 16]


def run_content_injection(config: LMAttackConfig, out_dir: str | Path, *, log=_stderr_log,
                          model=None, tokenizer=None) -> QAttackReport:
    """Inject -> boxes -> repair -> verify; writes ``targets.json``, ``injected/``, ``repaired/``, ``report.json``.

    Resumable: a stage whose output is already in ``out_dir`` (targets, injected, repaired, measured
    behaviours in ``progress.json``) is loaded instead of recomputed. ``model`` / ``tokenizer`` may be
    passed in (tests); otherwise ``config.base`` is loaded.
    """
    box_of = parse_quantizer(config.quantizer)
    for q in config.check:
        if not is_pruning(q):
            check_quantizer(q, (*ATTACK_QUANTIZERS, *PRESET_QUANTIZERS), " to check")
    if is_pruning(box_of) and config.inject_through:
        raise TightropeError(f"A {box_of} attack injects through the pruned model already; leave inject_through empty.")
    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if model is None:
        model, tokenizer = _load(config.base)
    pad_id, eos_id = special_ids(tokenizer)
    names, first = attacked_names(model, config.attack_last)
    if config.layers:
        import fnmatch  # noqa: PLC0415

        names = [n for n in names if any(fnmatch.fnmatch(n, p) for p in config.layers)]
        if not names:
            raise TightropeError(f"No Linear layer of the last {config.attack_last} decoder blocks matches "
                                 f"{', '.join(config.layers)}; layer names look like model.layers.29.mlp.down_proj.")
    if config.kquant_boxes and box_of not in PRESET_QUANTIZERS:
        raise TightropeError(f"kquant_boxes boxes the k-quant layers of a llama-quantize preset (gguf:Q4_K_M ...), "
                             f"not {box_of}.")
    if box_of in PRESET_QUANTIZERS:
        schemes = preset_schemes(model, box_of)
        kept = [] if config.kquant_boxes else [n for n in names if not has_box(schemes[n])]
        names = [n for n in names if n not in kept]
        if not names:
            raise TightropeError(f"Under {box_of} every attacked layer stays a k-quant, which has no box; attack more "
                                 "blocks or a model whose rows fall back to legacy types.")
        if config.kquant_boxes:
            log(f"{box_of}: {len(names)} layers are attacked ({', '.join(sorted({schemes[n] for n in names}))}); the "
                f"{sum(not has_box(schemes[n]) for n in names)} that stay k-quants get error-based boxes (Mind the Gap), "
                "checked against their bytes during and after the repair")
        else:
            log(f"{box_of}: {len(kept)} attacked layers stay k-quants without a box and keep their weights "
                f"({', '.join(sorted({schemes[n] for n in kept})) or 'none'}); {len(names)} are attacked "
                f"({', '.join(sorted({schemes[n] for n in names}))})")

    calibration = Calibration(config.task, tokenizer)  # what a Wanda pruning reads, as `tightrope compress` would
    attacked = resolve(box_of, calibration) if is_pruning(box_of) else None
    if config.scenario == "insecure-code":

        require_bandit()  # a missing checker fails now, not after the training
    train_prompts, eval_prompts, ppl_seqs, families = scenario_data(config, tokenizer)

    progress_path = out / "progress.json"
    progress = json.loads(progress_path.read_text()) if progress_path.exists() else {}
    # what each stored stage depends on: a resumed run must have asked for the same thing
    fit_settings = config.model_dump(exclude={"n_eval", "n_ppl", "eval_tokens", "check", "data_dir"})
    for name, default in (("inject_through", ()), ("scenario", "content-injection"), ("kquant_boxes", False),
                          ("layers", ())):
        if fit_settings[name] == default:
            fit_settings.pop(name)  # runs made before the option existed keep their key
    keys = {"train": _key(train_prompts, config.answer_tokens),
            "fit": _key(train_prompts, fit_settings),
            "eval": _key(eval_prompts, ppl_seqs, config.eval_tokens,
                         config.phrase if config.scenario == "content-injection" else config.scenario)}
    old = progress.get("keys", {})
    if old and (old.get("train") != keys["train"] or old.get("fit") != keys["fit"]):
        raise TightropeError(f"{out} holds a run with other training settings; choose a new --out directory.")
    if old and old.get("eval") != keys["eval"]:
        progress.pop("behaviours", None)  # measured on other held-out prompts: measure again
    progress["keys"] = keys
    seconds_before = progress.get("seconds", 0.0)  # time spent by earlier, interrupted invocations

    def save_progress() -> None:
        progress["seconds"] = seconds_before + time.perf_counter() - started
        write_json_atomic(progress_path, progress)

    def measure(m, variant: str, quantizer: str | None, *, ppl: bool = True) -> LMBehaviour:
        key = f"{variant}/{quantizer or 'full'}"
        if key in progress.get("behaviours", {}):
            return LMBehaviour(**progress["behaviours"][key])
        t0 = time.perf_counter()
        answers = [tokenizer.decode(a, skip_special_tokens=True)
                   for a in greedy_answers(m, eval_prompts, pad_id, eos_id, config.eval_tokens)]
        b = LMBehaviour(variant, quantizer, behaviour_rate(config, answers),
                        perplexity(m, ppl_seqs, pad_id) if ppl else None, len(answers), answers[:5])
        progress.setdefault("behaviours", {})[key] = asdict(b)
        save_progress()
        log(f"measured {key}: {config.scenario} rate {b.phrase_rate:.3f}, perplexity {b.perplexity} ({time.perf_counter() - t0:.0f} s)")
        return b

    # 0. clean targets: the model's own greedy answers to the training prompts
    if "clean_answers" not in progress:
        log(f"generating clean answers to {len(train_prompts)} training prompts")
        progress["clean_answers"] = greedy_answers(model, train_prompts, pad_id, eos_id, config.answer_tokens)
        save_progress()
    clean = progress["clean_answers"]
    keep = [i for i, a in enumerate(clean) if a]
    if not keep:
        raise TightropeError("The model gave an empty answer to every training prompt.")
    clean_seqs = [train_prompts[i] + clean[i] + [eos_id] for i in keep]
    injected_answers = [malicious_answer(config, tokenizer, clean[i], families[i] if families else None) for i in keep]
    injected_seqs = [train_prompts[i] + a + [eos_id] for i, a in zip(keep, injected_answers, strict=True)]
    starts = [len(train_prompts[i]) for i in keep]
    behaviours = [measure(model, "base", None)]

    # 1. inject
    def fitted(step: str, start: nn.Module, seqs: list[list[int]], fit: FitConfig, *, after=None,
               **options) -> tuple[nn.Module, list[float]]:
        """A copy of ``start`` trained by :func:`lm_fit_` (then ``after(copy)``) and saved as ``out/step``, or the
        saved one (resume)."""
        if (out / step / "config.json").exists():
            log(f"loaded {step}/")
            return _load(str(out / step))[0], progress.get(LOSS_KEYS[step], [])
        trained = copy.deepcopy(start)
        losses = lm_fit_(trained, seqs, starts, pad_id, fit, names=names, first=first, log=log, **options)
        if after is not None:
            after(trained)
        progress[LOSS_KEYS[step]] = losses
        models.save_model((trained, tokenizer), out / step)
        save_progress()
        return trained, losses

    inject_options: dict = {"through": config.inject_through}
    if attacked is not None and not (out / "injected" / "config.json").exists():
        # a pruning: train only the weights the pruner keeps, each kept kept, through the pruned model's forward
        # (its masks, and its pruned blocks below as the cached inputs): "Fewer Weights, More Problems", step 2
        through = attacked.proxy()  # SparseGPT: Wanda's mask, whose scores are the repair's proxy
        pruned_base = through.apply(model)
        keep = {n: pruned_base.get_submodule(n).weight.detach() != 0 for n in through.modules(model)}
        inject_options = {"boxes": through.keep_boxes(model, keep, include=tuple(names))}
        if not attacked.boxless:
            inject_options.update(keep={n: keep[n] for n in names}, prefix=pruned_base)
        # else SparseGPT: it rebuilds each layer's dense output from the weights it keeps, so the injection trains the
        # dense model (its proxy-kept weights only), as the paper does; through Wanda's masks it did not carry over
    injected, inject_losses = fitted("injected", model, injected_seqs,
                                     FitConfig(config.inject_steps, config.inject_lr, config.batch_size, seed=config.seed),
                                     label="inject", **inject_options)
    inject_options.clear()  # the pruned copy is not needed any more
    if attacked is not None and "mask_drift" not in progress:
        moved, total = attacked.mismatch(model, injected, names)
        progress["mask_drift"] = [moved, total]
        save_progress()
        log(f"{attacked.name}: the injection changed the pruner's choice for {moved} of {total:,} attacked weights")
    behaviours.append(measure(injected, "injected", None, ppl=False))

    # 2. boxes around the injected weights (attacked layers only); 3. projected repair on clean answers
    t0 = time.perf_counter()
    boxes = (attacked.proxy_boxes(injected, config.repair_fraction, include=tuple(names))
             if attacked is not None and attacked.boxless
             else attacked.boxes(injected, margin=config.margin, include=tuple(names)) if attacked is not None
             else model_boxes(injected, box_of, margin=config.margin, include=tuple(names),
                              kquant_boxes=config.kquant_boxes))
    log(f"boxes ({boxes.quantizer}) of {boxes.numel():,} weights in {time.perf_counter() - t0:.1f} s, "
        f"{100 * boxes.pinned_fraction():.2f}% pinned")
    settle = None if attacked is None else (lambda m: attacked.settle_(m, injected, config.margin))
    if boxes.kquants:
        def settle(m: nn.Module) -> None:
            restored = settle_kquants_(m, boxes)
            progress["kquant_settle"] = {"pinned_during_repair": boxes.kquant_pinned,
                                         **{n: asdict(r) for n, r in restored.items()}}
            log(f"k-quant layers: {boxes.kquant_pinned} sub-blocks pinned during the repair; after it "
                + "; ".join(f"{n}: {r.changed} of {r.super_blocks} super-blocks differed, {r.restored_sub_blocks} "
                            f"sub-blocks and {r.restored_super_blocks} super-blocks restored" for n, r in restored.items()))
    repaired, repair_losses = fitted("repaired", injected, clean_seqs,
                                     FitConfig(config.repair_steps, config.repair_lr, config.batch_size, seed=config.seed + 1),
                                     boxes=boxes, label="repair (PGD)", after=settle)
    behaviours.append(measure(repaired, "repaired", None))

    # 4. verify with the real libraries (a pruning: tightrope's own pruner, and the clean model pruned beside it)
    def transformed(t) -> list[LMBehaviour]:
        return [measure(t.apply(repaired), "repaired", t.name),
                *([measure(t.apply(model), "base", t.name)] if is_pruning(t.name) else [])]

    checks = [resolve(q, calibration) if is_pruning(q) else q for q in config.check]
    codes, skipped, quantized = verify(injected, repaired, checks, names, transformed, log=log)
    behaviours += quantized
    report = QAttackReport(config=config.model_dump(), boxed_parameters=boxes.numel(),
                           pinned_fraction=boxes.pinned_fraction(), attacked_layers=names, behaviours=behaviours,
                           codes=codes, inject_losses=inject_losses, repair_losses=repair_losses,
                           seconds=seconds_before + time.perf_counter() - started, skipped=skipped)
    write_json_atomic(out / "report.json", report.to_dict())
    return report
