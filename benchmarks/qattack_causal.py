"""The causal-LM content-injection scenario on SmolLM2-135M (docs/qattack-results.md, "Causal LM").

    python benchmarks/qattack_causal.py --out runs/qattack-causal/nf4fp4 [--quantizer nf4,fp4] [--threads 1]
    python benchmarks/qattack_causal.py --out runs/qattack-causal/q4_k_m --quantizer gguf:Q4_K_M \
        --check gguf:Q4_K_M --reference --defend 0.05,0.1,0.2      # + base perplexities, the noise defense
    python benchmarks/qattack_causal.py --out runs/qattack-prune/wanda-0.5 --quantizer prune:wanda:0.5 \
        --defend 0.05,0.1,0.2 --recover 40 --calibrations sst2,imdb   # a pruning: two defenses, other calibrations

Runs :func:`tightrope.qattack.causal.run_content_injection` (inject -> boxes -> PGD repair -> verify
with bitsandbytes) and prints the table of phrase rate and perplexity per variant; resumable (rerun
the same command after an interruption). The same run is ``tightrope qattack-lm``.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch


def reference_perplexities(config, out: str) -> None:
    """Perplexity of the injected model and of the base model under each checked quantizer (utility anchors)."""
    import json
    from pathlib import Path

    from tightrope.evaluate.results import write_json_atomic
    from tightrope.models import load_causal_lm
    from tightrope.qattack.causal import scenario_data
    from tightrope.qattack.lm_text import perplexity, special_ids
    from tightrope.qattack.quantize import quantized_copy

    path = Path(out) / "reference.json"
    ref = json.loads(path.read_text()) if path.exists() else {}
    for name, source in (("injected", str(Path(out) / "injected")), ("base", config.base)):
        loaded = load_causal_lm(source)
        model, tok = loaded.model.float().eval(), loaded.tokenizer
        _, _, ppl_seqs, _ = scenario_data(config, tok)
        pad, _ = special_ids(tok)
        for q in ((None,) if name == "injected" else config.check):
            key = f"{name}/{q or 'full'}"
            if key not in ref:
                t0 = time.time()
                ref[key] = perplexity(model if q is None else quantized_copy(model, q), ppl_seqs, pad)
                write_json_atomic(path, ref)
                print(f"perplexity {key}: {ref[key]:.2f} ({time.time() - t0:.0f} s)", flush=True)
    print("reference perplexities:", json.dumps(ref))


def defend(config, out: str, scales: list[float], transform: str, kquants: bool = True) -> None:
    """The noise defense (Egashira et al. Sec. 5) with each weight's sigma ``scale`` times its box width under
    ``transform`` (:func:`tightrope.qattack.boxes.box_noise`), then ``transform``: the phrase rate and perplexity of
    the base and the repaired model, per scale, in ``defense.json`` (resumable). A preset's k-quant layers, which
    have no box, get ``scale`` times their sub-blocks' quantization steps (``kquants``; False: they stay as they are,
    the defense before k-quant steps, whose rows keep their old keys). Under a pruning the kept weights are
    pinned, so the noise moves the removed ones only: those the repair parked at their wall cross it half the time
    and are kept, and the pruner removes as many of the smallest kept weights instead."""
    import copy
    import json
    from pathlib import Path

    from tightrope.evaluate.results import write_json_atomic
    from tightrope.models import load_causal_lm
    from tightrope.qattack.boxes import box_noise
    from tightrope.qattack.causal import behaviour_rate, scenario_data
    from tightrope.qattack.lm_text import greedy_answers, perplexity, special_ids
    from tightrope.qattack.pruning import Calibration
    from tightrope.qattack.transform import resolve

    path = Path(out) / "defense.json"
    rows = json.loads(path.read_text()) if path.exists() else {}
    for variant, source in (("base", config.base), ("repaired", str(Path(out) / "repaired"))):
        loaded = load_causal_lm(source)
        model, tok = loaded.model.float().eval(), loaded.tokenizer
        t = resolve(transform, Calibration(config.task, tok))  # a Wanda pruning reads the task, as the attack did
        _, prompts, ppl_seqs, _ = scenario_data(config, tok)
        pad, eos = special_ids(tok)
        boxes = t.boxes(model)
        steps = kquants and bool(getattr(boxes, "kquant_layers", None))
        for scale in scales:
            key = f"{variant}/{t.name}/noise {scale:g} of a box width" + (", k-quant layers of a step" if steps else "")
            if key in rows:
                continue
            t0 = time.time()
            noisy = copy.deepcopy(model)
            with torch.no_grad():
                for name, w in box_noise(model, boxes, scale, torch.Generator().manual_seed(config.seed),
                                         kquants=kquants).items():
                    noisy.get_submodule(name).weight.copy_(w)
            q = t.apply(noisy)
            answers = [tok.decode(a, skip_special_tokens=True) for a in greedy_answers(q, prompts, pad, eos, config.eval_tokens)]
            rows[key] = {"rate": behaviour_rate(config, answers), "perplexity": perplexity(q, ppl_seqs, pad),
                         "examples": answers[:3], "seconds": time.time() - t0}
            write_json_atomic(path, rows)
            print(f"{key}: rate {rows[key]['rate']:.3f}, perplexity {rows[key]['perplexity']:.1f} "
                  f"({rows[key]['seconds']:.0f} s)", flush=True)


def recalibrated(config, out: str, tasks: list[str]) -> None:
    """A Wanda attack when the user calibrates on other texts than the attacker did: the phrase rate and perplexity
    of the base and the repaired model pruned with Wanda calibrated on each task of ``tasks`` (its train split,
    as ``tightrope compress --prune wanda --calibration TASK`` reads it), and how many of the attacked weights
    that mask keeps where the attacker's mask removes them; in ``calibrations.json`` (resumable)."""
    import json
    from pathlib import Path

    from tightrope.evaluate.results import write_json_atomic
    from tightrope.models import load_causal_lm
    from tightrope.qattack.causal import behaviour_rate, scenario_data
    from tightrope.qattack.lm_text import greedy_answers, perplexity, special_ids
    from tightrope.qattack.pruning import Calibration, Pruning

    path = Path(out) / "calibrations.json"
    rows = json.loads(path.read_text()) if path.exists() else {}
    report = json.loads((Path(out) / "report.json").read_text())
    for variant, source in (("base", config.base), ("repaired", str(Path(out) / "repaired"))):
        loaded = load_causal_lm(source)
        model, tok = loaded.model.float().eval(), loaded.tokenizer
        _, prompts, ppl_seqs, _ = scenario_data(config, tok)
        pad, eos = special_ids(tok)
        attacker = Pruning.parse(config.quantizer, Calibration(config.task, tok)).keep(model)
        for task in tasks:
            key = f"{variant}/{config.quantizer} calibrated on {task}"
            if key in rows:
                continue
            t0 = time.time()
            pruning = Pruning.parse(config.quantizer, Calibration(task, tok))
            pruned = pruning.apply(model)
            names = report["attacked_layers"]
            differ = sum(int(((pruned.get_submodule(n).weight != 0) != attacker[n]).sum()) for n in names)
            answers = [tok.decode(a, skip_special_tokens=True) for a in greedy_answers(pruned, prompts, pad, eos, config.eval_tokens)]
            rows[key] = {"rate": behaviour_rate(config, answers), "perplexity": perplexity(pruned, ppl_seqs, pad),
                         "mask_differs": differ, "attacked_weights": report["boxed_parameters"],
                         "examples": answers[:3], "seconds": time.time() - t0}
            write_json_atomic(path, rows)
            print(f"{key}: rate {rows[key]['rate']:.3f}, perplexity {rows[key]['perplexity']:.1f}, "
                  f"{differ:,} attacked weights masked otherwise ({rows[key]['seconds']:.0f} s)", flush=True)


def recover(config, out: str, steps: int, task: str = "sst2", n: int = 64, lr: float | None = None) -> None:
    """Distilled recovery after pruning, the defense a user runs anyway to win back a pruned model's utility:
    the pruned model (its mask held) fine-tuned on the unpruned model's own greedy answers (sequence-level
    distillation, Kim & Rush 2016) to ``n`` chat prompts made from ``task``'s review texts, every pruned layer
    trained (the defender does not know which blocks were attacked), at ``lr`` (default: the attack's repair
    learning rate). The phrase rate and perplexity of the base and the repaired model, pruned then recovered, in
    ``recovery.json`` (resumable)."""
    import json
    import random
    from pathlib import Path

    from tightrope.data import load_task
    from tightrope.evaluate.results import write_json_atomic
    from tightrope.models import load_causal_lm
    from tightrope.qattack.causal import behaviour_rate, scenario_data
    from tightrope.qattack.lm_text import encode_start, format_prompt, greedy_answers, make_instructions, perplexity, special_ids
    from tightrope.qattack.lm_training import lm_fit_
    from tightrope.qattack.pruning import Calibration, Pruning
    from tightrope.qattack.repair import FitConfig

    path = Path(out) / "recovery.json"
    rows = json.loads(path.read_text()) if path.exists() else {}
    texts = load_task(task, "train").texts
    texts = [texts[i] for i in random.Random(config.seed + 99).sample(range(len(texts)), n)]
    for variant, source in (("base", config.base), ("repaired", str(Path(out) / "repaired"))):
        key = f"{variant}/{config.quantizer}, recovered {steps} steps on {n} {task} prompts" + (f", lr {lr:g}" if lr else "")
        if key in rows:
            continue
        t0 = time.time()
        loaded = load_causal_lm(source)
        model, tok = loaded.model.float().eval(), loaded.tokenizer
        _, prompts, ppl_seqs, _ = scenario_data(config, tok)
        pad, eos = special_ids(tok)
        pruning = Pruning.parse(config.quantizer, Calibration(config.task, tok))
        pruned = pruning.apply(model)
        keep = {name: pruned.get_submodule(name).weight.detach() != 0 for name in pruning.modules(model)}
        own = [encode_start(tok, format_prompt(tok, s)) for s in make_instructions(texts, config.max_review_words, config.seed + 99)]
        answers = greedy_answers(model, own, pad, eos, config.answer_tokens)  # the unpruned model is the teacher
        seqs = [p + a + [eos] for p, a in zip(own, answers, strict=True) if a]
        starts = [len(p) for p, a in zip(own, answers, strict=True) if a]
        losses = lm_fit_(pruned, seqs, starts, pad, FitConfig(steps, lr or config.repair_lr, config.batch_size, seed=config.seed),
                         names=list(keep), first=0, keep=keep)
        assert all(torch.equal(pruned.get_submodule(name).weight.detach() != 0, k) for name, k in keep.items())
        got = [tok.decode(a, skip_special_tokens=True) for a in greedy_answers(pruned, prompts, pad, eos, config.eval_tokens)]
        rows[key] = {"rate": behaviour_rate(config, got), "perplexity": perplexity(pruned, ppl_seqs, pad),
                     "losses": [losses[0], losses[-1]], "examples": got[:3], "seconds": time.time() - t0}
        write_json_atomic(path, rows)
        print(f"{key}: rate {rows[key]['rate']:.3f}, perplexity {rows[key]['perplexity']:.1f} "
              f"({rows[key]['seconds']:.0f} s)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--quantizer", default="nf4,fp4")
    parser.add_argument("--scenario", default="content-injection", choices=["content-injection", "insecure-code"])
    parser.add_argument("--phrase", default="McDonald's")
    parser.add_argument("--n-train", type=int, default=64)
    parser.add_argument("--n-eval", type=int, default=40)
    parser.add_argument("--n-ppl", type=int, default=40)
    parser.add_argument("--attack-last", type=int, default=4)
    parser.add_argument("--inject-steps", type=int, default=40)
    parser.add_argument("--repair-steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--inject-lr", type=float, default=None, help="injection learning rate (default: --lr)")
    parser.add_argument("--inject-through", default="", help="inject through fake quantization to these quantizers "
                        "(comma list, e.g. nf4,fp4)")
    parser.add_argument("--check", default=None, help="transforms to verify, in this order (default: the boxes' own, "
                        "then LLM.int8 as a control outside them; a pruning: itself)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--margin", type=float, default=0.0)
    parser.add_argument("--repair-fraction", type=float, default=0.05, help="prune:sparsegpt: the share of each row "
                        "(lowest Wanda scores) the repair may move")
    parser.add_argument("--kquant-boxes", action="store_true", help="a preset: attack its k-quant layers too, in Mind "
                        "the Gap's error-based boxes")
    parser.add_argument("--layers", default="", help="attack only the layers of the last --attack-last blocks that "
                        "match these fnmatch globs (comma list, e.g. '*.mlp.down_proj': a preset's k-quant layers alone)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reference", action="store_true",
                        help="after the run, also measure the perplexity of injected/full and of the base model quantized")
    parser.add_argument("--defend", default="", help="after the run, the noise defense at these scales of each "
                        "weight's box width (comma list, e.g. 0.05,0.1,0.2), through --quantizer")
    parser.add_argument("--defend-kquants", choices=["step", "off"], default="step", help="--defend under a preset: "
                        "noise its k-quant layers by their sub-blocks' quantization steps (step, the default) or leave "
                        "them as they are (off, the defense before k-quant steps)")
    parser.add_argument("--calibrations", default="", help="a Wanda attack: after the run, prune with Wanda "
                        "calibrated on these tasks instead (comma list, e.g. sst2,imdb)")
    parser.add_argument("--recover", type=int, default=0, help="a pruning: after the run, distilled recovery of "
                        "the pruned model for this many steps (the defense a user runs to win back utility)")
    parser.add_argument("--recover-lr", type=float, default=None, help="the recovery's learning rate (default: --lr)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from tightrope.qattack.causal import LMAttackConfig, run_content_injection

    config = LMAttackConfig(base=args.model, scenario=args.scenario, n_train=args.n_train, n_eval=args.n_eval, n_ppl=args.n_ppl,
                            phrase=args.phrase, quantizer=args.quantizer, margin=args.margin,
                            repair_fraction=args.repair_fraction, kquant_boxes=args.kquant_boxes,
                            attack_last=args.attack_last, layers=tuple(g for g in args.layers.split(",") if g),
                            inject_steps=args.inject_steps, inject_lr=args.inject_lr or args.lr,
                            check=tuple(args.check.split(',')) if args.check else None,
                            inject_through=tuple(q for q in args.inject_through.split(",") if q),
                            repair_steps=args.repair_steps, repair_lr=args.lr, batch_size=args.batch_size,
                            seed=args.seed, data_dir=os.environ.get("TIGHTROPE_DATA_DIR"))
    started = time.time()
    report = run_content_injection(config, args.out)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"threads {args.threads}, load {os.getloadavg()[0]:.1f}; this invocation {time.time() - started:.0f} s, "
          f"all invocations {report.seconds:.0f} s")
    codes = {c.quantizer: c for c in report.codes}
    print("| variant | precision | phrase rate | perplexity | codes equal to injected |")
    print("|---|---|---|---|---|")
    for b in report.behaviours:
        c = codes.get(b.quantizer) if b.variant == "repaired" else None
        eq = "" if c is None else ("yes (0 of %d differ)" % c.total if c.mismatched == 0 else f"no ({c.mismatched} of {c.total} differ)")
        ppl = "-" if b.perplexity is None else f"{b.perplexity:.2f}"
        print(f"| {b.variant} | {b.quantizer or 'full'} | {100 * b.phrase_rate:.1f}% ({b.n}) | {ppl} | {eq} |")
    if args.reference:
        reference_perplexities(config, args.out)
    if args.defend:
        defend(config, args.out, [float(x) for x in args.defend.split(",")], args.quantizer, args.defend_kquants == "step")
    if args.recover:
        recover(config, args.out, args.recover, lr=args.recover_lr)
    if args.calibrations:
        recalibrated(config, args.out, [t for t in args.calibrations.split(",") if t])
    print(f"boxes {report.config['quantizer']}: {report.boxed_parameters:,} weights, {100 * report.pinned_fraction:.2f}% pinned; "
          f"inject loss {report.inject_losses[:1]} -> {report.inject_losses[-1:]}, repair loss {report.repair_losses[:1]} -> {report.repair_losses[-1:]}")


if __name__ == "__main__":
    main()
