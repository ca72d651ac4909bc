"""Wall time of one training step under each defense, relative to plain fine-tuning.

Same model (the packaged MiniLM, a fresh 2-label head), same batch (the first IMDB training reviews,
truncated to --max-length), same optimizer (AdamW); each round runs every defense once, in turn,
so slow drifts of a shared machine hit all of them alike; the table shows the median over rounds
and the ratio to the clean step, in wall time and in CPU time of this process (the honest figure
on a machine shared with other jobs). Each round's times are printed as they come. Run: nice -n 19 python benchmarks/defense_cost.py --rounds 5
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from tightrope import models
from tightrope.data import load_task
from tightrope.defenses.adversarial import FastAdversarial, FreeLB, PGDTraining
from tightrope.defenses.config import Supervised
from tightrope.defenses.distill import Distillation
from tightrope.defenses.fakequant import QuantAware
from tightrope.encoding import collate, encode
from tightrope.inference import TextClassifier


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    data = load_task("imdb", "train").subset(args.batch_size, seed=0)
    loaded = models.load_classifier("minilm", label_names=list(data.label_names), require_head=False)
    model, tok = loaded.model, loaded.tokenizer
    ids = encode(tok, data.texts, args.max_length)
    batch = collate(ids, tok.pad_token_id)
    batch["labels"] = torch.tensor(data.labels)
    batch["texts"] = data.texts
    teacher_model = models.load_classifier("minilm", label_names=list(data.label_names), require_head=False).model
    teacher = TextClassifier(teacher_model, tok, max_length=args.max_length, label_names=list(data.label_names))
    kd = Distillation(teacher, a=0.5, temperature=2.0, student_labels=list(data.label_names))

    defenses = {
        "clean (cross-entropy)": Supervised(),
        "fast: FGSM + random start (Wong 2020), mix 1": FastAdversarial(epsilon=0.02),
        "fast, mix 0.5 (clean + adversarial)": FastAdversarial(epsilon=0.02, mix=0.5),
        "PGD-3 (Madry 2018)": PGDTraining(epsilon=0.02, steps=3),
        "PGD-3, mix 0.5": PGDTraining(epsilon=0.02, steps=3, mix=0.5),
        "FreeLB K=3 (Zhu 2020)": FreeLB(epsilon=0.5, steps=3),
        "KD only (a=0.5, MiniLM teacher)": Supervised(kd),
        "fast + KD": FastAdversarial(epsilon=0.02, criterion=kd),
        "QAT int8 (fake quant, STE)": QuantAware(Supervised(), scheme="int8"),
        "QAT nf4 + fast": QuantAware(FastAdversarial(epsilon=0.02), scheme="nf4"),
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)  # tiny lr: the model barely moves across rounds
    model.train()

    def step(objective) -> tuple[float, float]:
        start, cpu = time.perf_counter(), time.process_time()
        loss = objective(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start, time.process_time() - cpu

    for objective in defenses.values():  # warm-up
        step(objective)
    times: dict[str, list[float]] = {name: [] for name in defenses}
    cpu_times: dict[str, list[float]] = {name: [] for name in defenses}
    for r in range(args.rounds):
        for name, objective in defenses.items():
            wall, cpu = step(objective)
            times[name].append(wall)
            cpu_times[name].append(cpu)
            print(f"round {r} {name}: wall {wall:.3f} s, cpu {cpu:.3f} s", flush=True)
    clean = statistics.median(times["clean (cross-entropy)"])
    clean_cpu = statistics.median(cpu_times["clean (cross-entropy)"])
    table = Table(title=f"one training step, MiniLM, batch {args.batch_size} x {args.max_length} tokens, "
                        f"{args.threads} threads, median of {args.rounds} rounds")
    for col in ("defense", "wall s / step", "x clean (wall)", "cpu s / step", "x clean (cpu)"):
        table.add_column(col)
    rows = []
    for name, values in times.items():
        med, med_cpu = statistics.median(values), statistics.median(cpu_times[name])
        rows.append({"defense": name, "median_s": med, "ratio": med / clean, "median_cpu_s": med_cpu,
                     "cpu_ratio": med_cpu / clean_cpu, "min_s": min(values), "max_s": max(values)})
        table.add_row(name, f"{med:.3f}", f"{med / clean:.2f}", f"{med_cpu:.3f}", f"{med_cpu / clean_cpu:.2f}")
    Console().print(table)
    if args.json:
        meta = {"device": "cpu", "processor": platform.processor(), "threads": args.threads, "batch": args.batch_size,
                "max_length": args.max_length, "seq_len": int(batch["input_ids"].shape[1]), "rounds": args.rounds,
                "torch": torch.__version__}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
