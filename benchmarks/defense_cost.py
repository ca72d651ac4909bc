"""Wall time of fine-tuning under each defense, relative to plain fine-tuning on the same data.

Same model (the packaged MiniLM, a fresh 2-label head, restored before every run), same data (the
first ``--n-train`` IMDB training reviews of a seeded subset, head-truncated to ``--max-length``
tokens), same batches in the same order, same optimizer (AdamW, lr 5e-5), dropout seeded per step
as in ``tightrope.train``. One run is one pass over the data (``n_train / batch`` training steps,
no evaluation). Each round runs every defense once, in turn, so slow drifts of a shared machine hit
all of them alike; the table shows the median over rounds of the wall time and of this process's
CPU time (the steadier figure on a shared machine), each relative to clean fine-tuning.

Defenses: fast (FGSM + random start, Wong et al. 2020), PGD-3 (Madry et al. 2018), FreeLB K=3
(Zhu et al. 2020), A2T (Yoo and Qi 2021: half of each batch attacked by word swaps, clean +
adversarial loss), and fast + KD (a*CE + (1-a)*KD with a MiniLM teacher of the same size).

Run (it raises its own scheduling priority first, as the measurements of this project do):
    python benchmarks/defense_cost.py --n-train 32 --max-length 128 --batch-size 16 --threads 2 --rounds 2 \
        --json runs/defense-cost/cost.json
    python benchmarks/defense_cost.py --markdown runs/defense-cost/cost.json   # the table of docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from tightrope import models
from tightrope.data import load_task
from tightrope.defenses.a2t import A2TTraining
from tightrope.defenses.adversarial import FastAdversarial, FreeLB, PGDTraining
from tightrope.defenses.config import Supervised
from tightrope.defenses.distill import Distillation
from tightrope.encoding import collate, encode
from tightrope.inference import TextClassifier


def raise_priority() -> str:
    """``echo -10 > /proc/self/autogroup``: this process's autogroup gets a larger CPU share."""
    try:
        with open("/proc/self/autogroup", "w") as f:
            f.write("-10")
        with open("/proc/self/autogroup") as f:
            return f.read().strip()
    except OSError as err:
        return f"unchanged ({err.strerror})"


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def markdown(path: str) -> str:
    """The docs table of a saved run: wall and CPU time per pass, each relative to clean fine-tuning."""
    with open(path) as f:
        saved = json.load(f)
    meta = saved["meta"]
    lines = [f"Student {meta.get('model', 'minilm')}, {meta['n_train']} {meta.get('task', 'imdb')} texts x {meta['max_length']} tokens, batch {meta['batch']} "
             f"({meta['steps']} steps), {meta['threads']} torch threads, median of {meta['rounds']} rounds; "
             f"load average {meta['load_start']} at the start, {meta['load_end']} at the end.", "",
             "| defense | wall s | x clean (wall) | CPU s | x clean (CPU) | wall of each round (s) |",
             "|---|---:|---:|---:|---:|---|"]
    for row in saved["rows"]:
        runs = ", ".join(f"{t:.0f}" for t in row["wall_runs"])
        lines.append(f"| {row['defense']} | {row['wall_s']:.0f} | {row['ratio']:.2f} | {row['cpu_s']:.1f} | "
                     f"{row['cpu_ratio']:.2f} | {runs} |")
    stats = meta.get("a2t_stats") or {}
    if stats.get("attacked"):
        lines += ["", f"A2T over all rounds: {stats['attacked']} texts attacked, {stats['flipped']} flipped, "
                      f"{stats['skipped']} already misclassified (not attacked), "
                      f"{stats['words_changed'] / stats['attacked']:.1f} words changed and "
                      f"{stats['queries'] / stats['attacked']:.0f} candidate texts scored per attacked text."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--markdown", default=None, help="print the table of a saved --json run and exit")
    parser.add_argument("--model", default="minilm", help="student to start from (a fine-tuned directory: the "
                        "attack of A2T then has to work for its flips, as in real training)")
    parser.add_argument("--task", default="imdb", help="training data (imdb, or a data file such as MR's carve)")
    parser.add_argument("--n-train", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default=None, help="comma-separated defense keys to run (clean always runs)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.markdown:
        print(markdown(args.markdown))
        return
    priority = raise_priority()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_start = load_average()

    data = load_task(args.task, "train").subset(args.n_train, seed=0)
    labels = list(data.label_names)
    loaded = models.load_classifier(args.model, label_names=labels, require_head=False)
    model, tok = loaded.model, loaded.tokenizer
    initial = copy.deepcopy(model.state_dict())
    ids = encode(tok, data.texts, args.max_length)
    batches = []
    for start in range(0, len(ids), args.batch_size):
        idx = list(range(start, min(start + args.batch_size, len(ids))))
        batch = collate([ids[i] for i in idx], tok.pad_token_id)
        batch["labels"] = torch.tensor([data.labels[i] for i in idx])
        batch["texts"] = [data.texts[i] for i in idx]
        batches.append(batch)
    teacher_model = models.load_classifier("minilm", label_names=labels, require_head=False).model
    teacher = TextClassifier(teacher_model, tok, max_length=args.max_length, label_names=labels)
    kd = Distillation(teacher, a=0.5, temperature=2.0, student_labels=labels)
    a2t = A2TTraining(tok, adv_share=0.5, mix=0.5, max_length=args.max_length)
    a2t.embedding  # noqa: B018 - load the counter-fitted vectors before timing
    from tightrope.defenses.canonical import build as build_encoding

    encoding = build_encoding()  # the canonical defense's input transform (cached table)
    a2t_wn = A2TTraining(tok, adv_share=0.5, mix=0.5, max_length=args.max_length, max_candidates=40, query_budget=80,
                         wordnet=True, input_transform=encoding, embedding=a2t.embedding)

    defenses = {
        "clean": ("clean fine-tuning (cross-entropy)", Supervised()),
        "fast": ("fast: FGSM + random start, eps 0.02 (Wong 2020)", FastAdversarial(epsilon=0.02)),
        "pgd3": ("PGD-3, eps 0.02 (Madry 2018)", PGDTraining(epsilon=0.02, steps=3)),
        "freelb3": ("FreeLB K=3, eps 0.5 (Zhu 2020)", FreeLB(epsilon=0.5, steps=3)),
        "a2t": ("A2T: 50% of batch attacked, budget 100 (Yoo 2021)", a2t),
        "a2t-wn-enc": ("A2T + WordNet candidates, through the synonym encoding: 40 neighbours, budget 80", a2t_wn),
        "fast+kd": ("fast + KD (a 0.5, T 2, MiniLM teacher)", FastAdversarial(epsilon=0.02, criterion=kd)),
    }
    if args.only:
        keep = {"clean", *args.only.split(",")}
        defenses = {k: v for k, v in defenses.items() if k in keep}

    def run(objective) -> tuple[float, float]:
        model.load_state_dict(initial)
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5)
        start, cpu = time.perf_counter(), time.process_time()
        for step, batch in enumerate(batches):
            torch.manual_seed(7919 * step)
            loss = objective(model, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start, time.process_time() - cpu

    print(f"priority {priority}; load average at start {load_start}", flush=True)
    times = {k: [] for k in defenses}
    cpu_times = {k: [] for k in defenses}
    for r in range(args.rounds):
        for key, (name, objective) in defenses.items():
            wall, cpu = run(objective)
            times[key].append(wall)
            cpu_times[key].append(cpu)
            print(f"round {r} {key}: wall {wall:.1f} s, cpu {cpu:.1f} s, load {load_average()}", flush=True)
    load_end = load_average()
    clean, clean_cpu = statistics.median(times["clean"]), statistics.median(cpu_times["clean"])
    steps = len(batches)
    table = Table(title=f"fine-tuning MiniLM on {args.n_train} IMDB reviews x {args.max_length} tokens, batch "
                        f"{args.batch_size} ({steps} steps), {args.threads} threads, median of {args.rounds} rounds")
    for col in ("defense", "wall s", "x clean (wall)", "cpu s", "x clean (cpu)"):
        table.add_column(col)
    rows = []
    for key, (name, _) in defenses.items():
        med, med_cpu = statistics.median(times[key]), statistics.median(cpu_times[key])
        rows.append({"key": key, "defense": name, "wall_s": med, "ratio": med / clean, "cpu_s": med_cpu,
                     "cpu_ratio": med_cpu / clean_cpu, "wall_runs": times[key], "cpu_runs": cpu_times[key]})
        table.add_row(name, f"{med:.1f}", f"{med / clean:.2f}", f"{med_cpu:.1f}", f"{med_cpu / clean_cpu:.2f}")
    Console().print(table)
    a2t_stats = dict(a2t.stats)
    if a2t_stats["attacked"]:
        print(f"a2t: {a2t_stats['attacked']} texts attacked, {a2t_stats['flipped']} flipped, "
              f"{a2t_stats['skipped']} already wrong, {a2t_stats['words_changed'] / a2t_stats['attacked']:.1f} words "
              f"and {a2t_stats['queries'] / a2t_stats['attacked']:.0f} queries per text")
    print(f"load average: start {load_start}, end {load_end}")
    if args.json:
        meta = {"model": args.model, "device": "cpu", "processor": platform.processor(), "cpus": os.cpu_count(), "threads": args.threads,
                "task": args.task, "n_train": args.n_train, "batch": args.batch_size, "max_length": args.max_length, "steps": steps,
                "rounds": args.rounds, "torch": torch.__version__, "priority": priority,
                "load_start": load_start, "load_end": load_end, "a2t_stats": a2t_stats}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
