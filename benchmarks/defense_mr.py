"""Defenses on MR (and IMDB), measured adaptively (docs/results.md, issue 20's sections).

Every step reads MR by default; ``--dataset imdb`` runs the same step on IMDB: attacks on TextFooler's IMDB
sample (reviews at the model's own max length, 256 tokens head+tail for tightrope's IMDB models), clean
accuracy on a seeded 1,000 reviews of IMDB's test split.

Steps (each resumable; run from the repository root with $TIGHTROPE_DATA_DIR set):

    python benchmarks/defense_mr.py prepare --out runs/defense-mr
        writes runs/defense-mr/mr-train.jsonl.gz: MR's train split (tightrope's seeded carve) minus every
        sentence of TextFooler's MR attack sample, so that no attacked sentence was trained on
        (90% of the sample lies in MR's train carve otherwise).
    python benchmarks/defense_mr.py coverage --out runs/defense-mr
        how the synonym encoding's settings cluster the vocabulary (largest cluster, share of
        TextFooler's and PWWS's (word, candidate) pairs that share a code) on 300 MR training sentences.
    python benchmarks/defense_mr.py attack --out runs/defense-mr --n 100 MODEL_DIR...
        TextFooler, PWWS and DeepWordBug on a seeded subset of N sentences of TextFooler's MR sample (the
        same sentences for every model: ``load_task("textfooler-mr", "test", n=N, seed=0)``, as
        ``tightrope attack --task textfooler-mr --n N``), each attack querying the loaded model, whose
        TextClassifier applies the model's own input transform: the attack targets the whole defended
        pipeline. The transform's call count is recorded beside each attack (transform.json).
    python benchmarks/defense_mr.py swaps --out runs/defense-mr MODEL_DIR...
        where the successful word swaps fall: for TextFooler and PWWS, the counter-fitted cosine of each
        swapped pair, and the share that the encoding (cosine >= 0.95) could have covered.
    python benchmarks/defense_mr.py attack --temperature fit --recipes pwws --out runs/defense-mr MODEL_DIR...
        the temperature check (Raina et al. 2024): the same attack on the model's logits divided by the
        temperature that minimises the NLL on the attacked sentences' clean texts (folder RECIPE@T); a
        model whose success rate rises there owed its robustness to saturated scores.
    python benchmarks/defense_mr.py pgd --out runs/defense-mr MODEL_DIR...
        PGD on the input embeddings (eps 0.002, L-inf, 5 steps, the seed study's setting) on the same
        sentences, after the model's input transform. A quantized model (ONNX Runtime int8) has no
        input gradients: it is attacked through its differentiable twin, the full-precision model it
        was compressed from (its card's ``source``), fake-quantized with the same int8 scheme.
    python benchmarks/defense_mr.py smooth --out runs/mr --rate 0.6 --copies 8 [--seed S] MODEL_DIR...
        OUT/NAME-sm0.6x8: the model with SAFER's randomized smoothing joined to its input transform (as
        ``tightrope train --defense canonical --smoothing copies=8,rate=0.6`` saves it); attack it with
        the ``attack`` step: every query answers the mean over its 8 copies.
    python benchmarks/defense_mr.py caps --out runs/defense-mr MODEL_DIR...
        each recipe's ASR had it been allowed at most 1 or 2 words, or 10%, 20% or 30% of the words
        (TextDefender's PWWS and TextFooler allow 30%), read off the uncapped runs: exact for these greedy
        searches (``tightrope.attacks.results.capped_status``), so no attack is rerun.
    python benchmarks/defense_mr.py table --out runs/defense-mr MODEL_DIR...
        clean accuracy on MR's test carve (1,066 sentences) and the ASR of each recipe with Wilson 95%
        intervals, as a Markdown table.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import sys
from pathlib import Path

RECIPES = ("textfooler", "pwws", "deepwordbug")


class Dataset:
    """Where a step reads its texts: the attack sample and the clean test set of one task."""

    def __init__(self, name: str, sample: str, test: str, test_n: int | None, unit: str):
        self.name, self.sample, self.test, self.test_n, self.unit = name, sample, test, test_n, unit

    def attacked(self, n: int):
        from tightrope.data import load_task

        return load_task(self.sample, "test", n=n, seed=0)

    def clean(self):
        from tightrope.data import load_task

        return load_task(self.test, "test", n=self.test_n, seed=0) if self.test_n else load_task(self.test, "test")


DATASETS = {"mr": Dataset("MR", "textfooler-mr", "mr", None, "sentences"),
            "imdb": Dataset("IMDB", "textfooler-imdb", "imdb", 1000, "reviews")}
DATASET = DATASETS["mr"]  # set by --dataset


def _norm(text: str) -> str:
    return re.sub(r"[^a-z]", "", text.lower())


def prepare(out: Path) -> Path:
    from tightrope.data import load_task

    train = load_task("mr", "train")
    sample = {_norm(t) for t in load_task("textfooler-mr", "test").texts}
    keep = [(t, y) for t, y in zip(train.texts, train.labels) if _norm(t) not in sample]
    out.mkdir(parents=True, exist_ok=True)
    file = out / "mr-train.jsonl.gz"
    with gzip.open(file, "wt", encoding="utf-8") as f:
        for text, label in keep:
            f.write(json.dumps({"text": text, "label": label}) + "\n")
    print(f"wrote {file}: {len(keep)} of {len(train)} train sentences ({len(train) - len(keep)} in the attack sample dropped)")
    return file


def _label(model: str) -> str:
    return Path(model).name


def attack(models: list[str], out: Path, n: int, recipes_: list[str], threads: int, temperature: str | None = None) -> None:
    import torch

    from tightrope import workflows
    from tightrope.attacks import Attacker, recipes
    from tightrope.evaluate.calibration import fit_temperature, tempered
    from tightrope.evaluate.results import write_json_atomic

    torch.set_num_threads(threads)
    data = DATASET.attacked(n)
    for recipe in recipes_:
        for model in models:
            folder = out / "attacks" / _label(model) / (recipe if temperature is None else f"{recipe}@T")
            if (folder / "summary.json").exists() and json.loads((folder / "summary.json").read_text())["examples"] >= n:
                continue
            victim = workflows.load(model)
            victim.source = victim.source or model
            if temperature is not None:
                t = fit_temperature(victim.logits(data.texts), data.labels) if temperature == "fit" else float(temperature)
                victim = tempered(victim, t)
            transform = victim.input_transform
            before = (transform.calls, transform.texts) if transform is not None else None
            report = Attacker(recipes.build(recipe, victim), out=folder, seed=0).run(victim, data)
            write_json_atomic(folder / "summary.json", report.to_dict())
            if transform is not None:
                write_json_atomic(folder / "transform.json", {"calls": transform.calls - before[0],
                                                              "texts": transform.texts - before[1]})
            print(f"{recipe} on {model}: ASR {report.attack_success_rate:.3f} "
                  f"({report.succeeded}/{report.succeeded + report.failed}), {report.seconds:.0f} s", flush=True)


def pgd(models: list[str], out: Path, n: int, threads: int, epsilon: float = 0.002) -> None:
    import contextlib

    import torch

    from tightrope import workflows
    from tightrope.attacks.embedding import EmbeddingAttack, accuracy_under_attack
    from tightrope.defenses.fakequant import fake_quantized
    from tightrope.evaluate.results import write_json_atomic

    torch.set_num_threads(threads)
    data = DATASET.attacked(n)
    for model in models:
        file = out / "attacks" / _label(model) / "pgd" / "summary.json"
        if file.exists():
            continue
        card = json.loads((Path(model) / "card.json").read_text())
        quantized = [c for c in card.get("compression", []) if c.get("method") == "Int8Dynamic"]
        if quantized:  # the differentiable twin: the model it was compressed from, fake-quantized as int8
            source = card["source"] if Path(card["source"]).exists() else str(Path(model).parent / Path(card["source"]).name)
            target = workflows.load(source)
            target.input_transform = workflows.load(model).input_transform
            guard, gradient_source = fake_quantized(target.model, "int8"), f"twin: {Path(source).name} fake-quantized int8"
        else:
            target, guard, gradient_source = workflows.load(model), contextlib.nullcontext(), "victim"
        with guard:
            report = accuracy_under_attack(target, list(data.texts), list(data.labels), [epsilon],
                                           EmbeddingAttack(epsilon=epsilon, steps=5, seed=0), batch_size=16, progress=False)
        payload = {**report.to_dict(), "gradient_source": gradient_source}
        write_json_atomic(file, payload)
        print(f"pgd on {model}: {json.dumps(payload['points'][0])}", flush=True)


def fgws(model: str, out: Path, deltas: list[int], threads: int, max_drop: float = 0.005) -> None:
    """FGWS joined to ``model``'s input transform, for each delta; keeps the largest delta whose validation
    accuracy (the model's own validation carve, never the attack sample) is within max_drop of the model's."""
    import os
    import shutil

    import torch

    from tightrope import workflows
    from tightrope.defenses.fgws import AttackCandidates, build_fgws
    from tightrope.train import TrainConfig, split_train_eval
    from tightrope.transforms import FILE

    torch.set_num_threads(threads)
    card = json.loads((Path(model) / "card.json").read_text())
    # every training sentence of the task's carve (a model fine-tuned from another on part of it saw the rest)
    config = TrainConfig(**{k: v for k, v in card["config"].items() if k in TrainConfig.model_fields} | {"n_train": None})
    train_data, eval_data = split_train_eval(config)
    clf = workflows.load(model)
    base = clf.input_transform
    accuracy = lambda: sum(int(p == y) for p, y in zip(clf.predict(eval_data.texts), eval_data.labels)) / len(eval_data)  # noqa: E731
    reference = accuracy()
    print(f"{model}: validation accuracy {reference:.4f} on {len(eval_data)} sentences", flush=True)
    chosen, candidates = None, AttackCandidates()
    for delta in sorted(deltas):
        transform = build_fgws(train_data.texts, delta, base, candidates=candidates)
        clf.input_transform = transform
        acc = accuracy()
        changed = sum(a != b for a, b in zip(base(eval_data.texts), transform(eval_data.texts)))
        print(f"delta {delta}: {transform.params['fgws']['replaced_words']:,} words replaced in the table, "
              f"{changed} of {len(eval_data)} validation sentences changed, accuracy {acc:.4f}", flush=True)
        if acc >= reference - max_drop:
            chosen = (delta, transform)
    if chosen is None:
        print("no delta keeps the validation accuracy; nothing written")
        return
    delta, transform = chosen
    dest = out / f"{_label(model)}-fgws{delta}"
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(model, dest, copy_function=os.link, ignore=shutil.ignore_patterns(FILE, "card.json", "checkpoint"))
    (dest / FILE).write_text(json.dumps(transform.to_json()))
    card["input_transform"] = transform.card_entry()
    card["fgws"] = {"delta": delta, "chosen_on": f"validation carve ({len(eval_data)} sentences), drop <= {max_drop}",
                    "validation_accuracy_before": reference}
    (dest / "card.json").write_text(json.dumps(card, indent=1))
    print(f"wrote {dest} (delta {delta})", flush=True)


def latency(models: list[str], out: Path, threads: int, rounds: int = 5, n: int = 256) -> None:
    """Inference time per sentence of every model, side by side in one process: each round times every
    model in turn on the same MR test sentences (batches of 32, input transform included), so that the
    load of a shared machine hits them alike; the median over rounds, relative to the first model."""
    import statistics
    import time

    import torch

    from tightrope import workflows

    torch.set_num_threads(threads)
    texts = DATASET.clean().texts[:n]
    loaded = {m: workflows.load(m) for m in models}
    for clf in loaded.values():
        clf.logits(texts[:32], batch_size=32)  # warm-up (and the transform's memo, as in a long-running server)
    times = {m: [] for m in models}
    for _ in range(rounds):
        for m, clf in loaded.items():
            t0 = time.perf_counter()
            clf.logits(texts, batch_size=32)
            times[m].append(1000 * (time.perf_counter() - t0) / len(texts))
    first = statistics.median(times[models[0]])
    rows = {_label(m): {"ms_per_text": statistics.median(t), "relative": statistics.median(t) / first} for m, t in times.items()}
    file = out / "latency.json"
    file.write_text(json.dumps({"threads": threads, "rounds": rounds, "texts": len(texts), "load": os.getloadavg(), "rows": rows}, indent=1))
    for name, row in rows.items():
        print(f"| `{name}` | {row['ms_per_text']:.2f} | {row['relative']:.2f} |")


def curve(models: list[str], out: Path, figure: Path, recipes_: list[str], threads: int) -> None:
    """The explored curve: clean accuracy (MR test) against each attack's success rate, one point per
    model and attack, the strongest attack of each model joined by a line to its others."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = {"textfooler": "o", "pwws": "s", "deepwordbug": "^", "pgd": "x"}
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for k, model in enumerate(models):
        acc = clean(model, out, threads)["accuracy"]
        color = f"C{k % 10}"
        points = []
        for recipe in (*recipes_, "pgd"):
            file = out / "attacks" / _label(model) / recipe / "summary.json"
            if not file.exists():
                continue
            r = json.loads(file.read_text())
            if recipe == "pgd":
                r = r["points"][0]
            asr = r["succeeded"] / max(1, r["succeeded"] + r["failed"])
            points.append(asr)
            ax.scatter(acc * 100, asr * 100, marker=markers[recipe], color=color, s=60 if recipe != "pgd" else 40)
        if points:
            text_max = max(points[:len(recipes_)]) if len(points) > 1 else points[0]
            ax.vlines(acc * 100, min(points) * 100, max(points) * 100, color=color, alpha=0.3)
            ax.annotate(_label(model), (acc * 100, text_max * 100), textcoords="offset points", xytext=(5, 4), fontsize=8, color=color)
    for recipe, m in markers.items():
        ax.scatter([], [], marker=m, color="grey", label=recipe if recipe != "pgd" else "PGD eps 0.002")
    ax.set_xlabel(f"clean accuracy on {DATASET.name} test (%)")
    ax.set_ylabel(f"attack success rate on TextFooler's {DATASET.name} sample (%)")
    ax.set_title(f"Defenses explored on {DATASET.name}: every attack queries the whole defended pipeline")
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(alpha=0.3)
    figure.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(figure, dpi=120)
    print(f"wrote {figure}")


def smooth(model: str, out: Path, rate: float, copies: int, seed: int) -> None:
    """``model`` with SAFER's randomized smoothing joined to its input transform
    (:func:`tightrope.defenses.canonical.with_smoothing`, what ``tightrope train --defense canonical
    --smoothing K`` saves): OUT/NAME-smR x K[-sS], written whole or not at all. Attack it with the
    ``attack`` step like any model: every query is the mean over its copies, seeded by the text, so the
    attack queries the expectation the pipeline answers."""
    import os
    import shutil
    import tempfile

    from tightrope import workflows
    from tightrope.defenses.canonical import with_smoothing
    from tightrope.transforms import FILE

    clf = workflows.load(model)
    transform = with_smoothing(clf.input_transform, rate, copies, seed)
    card = json.loads((Path(model) / "card.json").read_text())
    dest = out / f"{_label(model)}-sm{rate:g}x{copies}" if seed == 0 else out / f"{_label(model)}-sm{rate:g}x{copies}-s{seed}"
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=f".{dest.name}."))
    shutil.copytree(model, tmp, dirs_exist_ok=True, copy_function=os.link,
                    ignore=shutil.ignore_patterns(FILE, "card.json", "checkpoint"))
    (tmp / FILE).write_text(json.dumps(transform.to_json()))
    card["input_transform"] = transform.card_entry()
    (tmp / "card.json").write_text(json.dumps(card, indent=1))
    if dest.exists():
        shutil.rmtree(dest)
    tmp.replace(dest)
    print(f"wrote {dest} (rate {rate}, {copies} copies, seed {seed})", flush=True)


def wilson(won: int, attacked: int) -> tuple[float, float]:
    from scipy.stats import binomtest

    if attacked == 0:
        return float("nan"), float("nan")
    ci = binomtest(won, attacked).proportion_ci(confidence_level=0.95, method="wilson")
    return ci.low, ci.high


def clean(model: str, out: Path, threads: int) -> dict:
    """Accuracy and macro-F1 on the dataset's clean test texts, and the time of the transform beside the model's."""
    import time

    import torch

    from tightrope import workflows
    from tightrope.evaluate.metrics import classification_metrics

    file = out / "clean" / f"{_label(model)}.json"
    if file.exists():
        return json.loads(file.read_text())
    torch.set_num_threads(threads)
    data = DATASET.clean()
    clf = workflows.load(model)
    t0 = time.perf_counter()
    if clf.input_transform is not None:
        clf.input_transform(list(data.texts))  # timed alone: the transform's share of the pipeline
    t1 = time.perf_counter()
    logits = clf.logits(list(data.texts), 64 if DATASET.name == "MR" else 16)  # the whole defended pipeline (smoothing's copies included)
    t2 = time.perf_counter()
    t2 -= t1 - t0  # the pipeline ran the transform again: the model's own time
    metrics = classification_metrics(data.labels, logits.argmax(-1).tolist(), list(data.label_names)).summary()
    result = {"model": model, "examples": len(data), **metrics,
              "transform_ms_per_text": 1000 * (t1 - t0) / len(data), "model_ms_per_text": 1000 * (t2 - t1) / len(data)}
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(result, indent=1))
    return result


def table(models: list[str], out: Path, recipes_: list[str], threads: int) -> None:
    head = ["model", f"clean acc. ({DATASET.name} test)", "macro-F1"] + [f"{r} ASR (95% CI)" for r in recipes_] + \
        ["strongest", "strongest, logits tempered", "PGD eps 0.002 ASR", "latency ms/text (x first row)"]
    lat = json.loads((out / "latency.json").read_text())["rows"] if (out / "latency.json").exists() else {}
    rows = []
    for model in models:
        c = clean(model, out, threads)
        cells = [f"`{_label(model)}`", f"{c['accuracy']:.1%}", f"{c['macro_f1']:.3f}"]
        best = None
        for recipe in recipes_:
            file = out / "attacks" / _label(model) / recipe / "summary.json"
            if not file.exists():
                cells.append("-")
                continue
            r = json.loads(file.read_text())
            won, attacked = r["succeeded"], r["succeeded"] + r["failed"]
            lo, hi = wilson(won, attacked)
            asr = won / attacked if attacked else float("nan")
            calls = out / "attacks" / _label(model) / recipe / "transform.json"
            through = f", {json.loads(calls.read_text())['texts']:,} texts through the transform" if calls.exists() else ""
            cells.append(f"{asr:.1%} ({lo:.1%}-{hi:.1%}), {won}/{attacked}{through}")
            best = max(best or (asr, recipe), (asr, recipe))
        cells.append(f"{best[1]} {best[0]:.1%}" if best else "-")
        hot = out / "attacks" / _label(model) / f"{best[1]}@T" / "summary.json" if best else None
        if hot is not None and hot.exists():
            r = json.loads(hot.read_text())
            t = json.loads((hot.parent / "attack.json").read_text()).get("temperature")
            cells.append(f"{r['succeeded'] / max(1, r['succeeded'] + r['failed']):.1%} (T = {t:.3g})")
        else:
            cells.append("-")
        p = out / "attacks" / _label(model) / "pgd" / "summary.json"
        if p.exists():
            point = json.loads(p.read_text())["points"][0]
            cells.append(f"{point['attack_success_rate']:.1%} ({point['succeeded']}/{point['succeeded'] + point['failed']})")
        else:
            cells.append("-")
        row = lat.get(_label(model))
        cells.append(f"{row['ms_per_text']:.2f} ({row['relative']:.2f}x)" if row else "-")
        rows.append(cells)
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for cells in rows:
        print("| " + " | ".join(cells) + " |")


def coverage(out: Path) -> None:
    """Cluster statistics of the synonym encoding for a grid of settings (MR training sentences only)."""

    from tightrope.attacks.recipes import default_embedding
    from tightrope.attacks.resources import TEXTFOOLER_STOPWORDS
    from tightrope.attacks.text import AttackedText
    from tightrope.attacks.words import wordnet_synonyms
    from tightrope.data import load_task
    from tightrope.defenses.canonical import build

    embedding = default_embedding()
    train = load_task(str(out / "mr-train.jsonl.gz"), "train").subset(300, 1)
    words = list(dict.fromkeys(w.lower() for t in train.texts for w in AttackedText.from_text(t).words
                               if w.lower() not in TEXTFOOLER_STOPWORDS))
    near = embedding.neighbours(words, 50, 0.5)  # TextFooler's candidate sets
    print("| min cosine | WordNet | largest clusters | TextFooler pairs sharing a code | PWWS pairs sharing a code |"
          " good / bad / great / terrible / film / funny / boring |")
    print("|---|---|---|---|---|---|")
    for min_cos, wordnet in [(0.5, False), (0.5, True), (0.9, False), (0.95, False), (0.95, True)]:
        enc = build(neighbours=50, min_cos=min_cos, wordnet=wordnet, embedding=embedding)
        code = enc.canonical_word
        sizes = sorted((len(m) for m in enc.clusters().values()), reverse=True)[:3]
        tf = [code(u) == code(w) for w, cands in zip(words, near) for u, _ in cands]
        pw = [code(u) == code(w) for w in words for u in wordnet_synonyms(w)]
        examples = " / ".join(code(w) for w in ("good", "bad", "great", "terrible", "film", "funny", "boring"))
        print(f"| {min_cos} | {'yes' if wordnet else 'no'} | {', '.join(f'{s:,}' for s in sizes)} | "
              f"{sum(tf) / len(tf):.1%} | {sum(pw) / max(1, len(pw)):.1%} | {examples} |", flush=True)


def swaps(models: list[str], out: Path) -> None:
    from tightrope.attacks.attacker import read_results
    from tightrope.attacks.recipes import default_embedding

    embedding = default_embedding()
    print("| model | recipe | swapped words in successes | counter-fitted cosine >= 0.95 | median cosine |")
    print("|---|---|---|---|---|")
    for model in models:
        for recipe in ("textfooler", "pwws"):
            folder = out / "attacks" / _label(model) / recipe
            results = [r for f in sorted(folder.glob("results*.jsonl")) for r in read_results(f)]
            cos = []
            for r in results:
                if r.status != "succeeded":
                    continue
                for a, b in zip(r.original_text.split(), r.perturbed_text.split()):
                    if a != b:
                        c = embedding.cosine(a.lower(), b.lower())
                        cos.append(-1.0 if c is None else c)  # a word without a vector: outside the encoding
            if cos:
                print(f"| `{_label(model)}` | {recipe} | {len(cos)} | {sum(c >= 0.95 for c in cos) / len(cos):.1%} | "
                      f"{sorted(cos)[len(cos) // 2]:.2f} |")



CAPS = (("1 word", {"max_words": 1}), ("2 words", {"max_words": 2}), ("10% of words", {"max_share": 0.1}),
        ("20%", {"max_share": 0.2}), ("30%", {"max_share": 0.3}))


def caps(models: list[str], out: Path, recipes_: list[str]) -> None:
    """ASR under a cap on the words changed, from the uncapped runs (exact for greedy searches)."""
    from tightrope.attacks.attacker import read_results
    from tightrope.attacks.results import capped_success_rate

    print("| model | recipe | " + " | ".join(name for name, _ in CAPS) + " | no cap (as run) |")
    print("|---|---|" + "---|" * (len(CAPS) + 1))
    for model in models:
        for recipe in recipes_:
            folder = out / "attacks" / _label(model) / recipe
            results = [r for f in sorted(folder.glob("results*.jsonl")) for r in read_results(f)]
            if not results:
                continue
            cells = []
            for _, cap in CAPS + (("none", {"max_share": float("inf")}),):
                won, attacked = capped_success_rate(results, **cap)
                cells.append(f"{won / attacked:.1%}" if attacked else "-")
            cells[-1] += f" ({attacked})"
            print(f"| `{_label(model)}` | {recipe} | " + " | ".join(cells) + " |")

def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=("prepare", "coverage", "attack", "pgd", "fgws", "latency", "smooth", "swaps", "table", "curve", "caps"))
    parser.add_argument("models", nargs="*")
    parser.add_argument("--out", type=Path, default=Path("runs/defense-mr"))
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="mr",
                        help="mr: TextFooler's MR sample, MR test; imdb: TextFooler's IMDB sample, 1,000 IMDB test reviews")
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--figure", type=Path, default=Path("docs/figures/defense-mr-curve.png"))
    parser.add_argument("--rate", type=float, default=0.25, help="smooth: chance of a swap per word")
    parser.add_argument("--copies", type=int, default=8, help="smooth: copies per query")
    parser.add_argument("--seed", type=int, default=0, help="smooth: seed of the copies")
    parser.add_argument("--deltas", default="1,2,3,5,10", help="fgws: frequency thresholds tried")
    parser.add_argument("--temperature", default=None, help="attack: 'fit' or a number (the temperature check)")
    args = parser.parse_intermixed_args(argv)
    global DATASET
    DATASET = DATASETS[args.dataset]
    if args.step == "prepare":
        prepare(args.out)
    elif args.step == "coverage":
        coverage(args.out)
    elif args.step == "swaps":
        swaps(args.models, args.out)
    elif args.step == "caps":
        caps(args.models, args.out, args.recipes.split(","))
    elif args.step == "attack":
        attack(args.models, args.out, args.n, args.recipes.split(","), args.threads, args.temperature)
    elif args.step == "fgws":
        fgws(args.models[0], args.out, [int(d) for d in args.deltas.split(",")], args.threads)
    elif args.step == "smooth":
        for model in args.models:
            smooth(model, args.out, args.rate, args.copies, args.seed)
    elif args.step == "curve":
        curve(args.models, args.out, args.figure, args.recipes.split(","), args.threads)
    elif args.step == "latency":
        latency(args.models, args.out, args.threads)
    elif args.step == "pgd":
        pgd(args.models, args.out, args.n, args.threads)
    else:
        table(args.models, args.out, args.recipes.split(","), args.threads)


if __name__ == "__main__":
    sys.exit(main())
