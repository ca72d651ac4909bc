"""tightrope's text attacks against TextAttack 0.3.11's own recipes, same model, same examples, same constraints.

TextAttack is installed for this benchmark only, in a throwaway virtual environment (no system site
packages) that reuses this project's torch 2.13.0 and transformers through a .pth file and never
changes them (``pip install torch==2.13.0`` into it instead gives the same torch, 200 MB later)::

    python -m venv /tmp/ta-venv
    echo "$PWD/.venv/lib/python3.11/site-packages" > /tmp/ta-venv/lib/python3.11/site-packages/zz_main.pth
    /tmp/ta-venv/bin/pip install --no-deps textattack==0.3.11 jieba lru-dict levenshtein rapidfuzz langdetect \
        editdistance num2words word2number more-itertools terminaltables lemminflect pinyin OpenHowNet six anytree \
        language_tool_python toml bert_score
    # TextAttack imports flair at start-up; DeepWordBug and PWWS never call it, so a three-file stub stands in:
    python benchmarks/attacks.py --write-flair-stub /tmp/ta-venv

Run (first N sentences of the split; both sides truncate at 128 tokens; TextAttack's model wrapper pads
every input to 128 as in the issue's reference measurement, tightrope pads each batch to its longest text,
and ``--padded-ablation`` adds a tightrope row padded to 128 too, to show what the padding alone buys)::

    python benchmarks/attacks.py --model runs/minilm-sst2 --task sst2 --split test --n 100 \
        --recipes deepwordbug --shards 2 --seeds 3 --json runs/bench-attacks/dwb.json

``--seeds K`` runs every row under K seeds and pools them: DeepWordBug's character edits are random on
both sides, and one seed's success rate moves by several examples in a hundred.

``--streams K`` adds tightrope rows in one process with K examples attacked at once on threads
(``tightrope attack --streams K``), the victim running ``--threads / K`` threads each, on torch and on
ONNX Runtime's fp32 graph (``--runtime onnxruntime``); each such row reports on how many examples it
found exactly what the one-stream row found (status, adversarial text, queries). The issue-24 run
(one process on each side; TextAttack truncates and pads at the head, so tightrope's victim reads the
head too)::

    python benchmarks/attacks.py --model runs/qs-base --task textfooler-mr --n 100 --max-length 64 \
        --recipes deepwordbug,pwws --streams 2 --seeds 3 --json runs/bench-attacks/mr.json
    python benchmarks/attacks.py --model runs/imdb-base --task textfooler-imdb --n 30 --max-length 256 \
        --recipes deepwordbug --streams 2 --seeds 3 --json runs/bench-attacks/imdb.json

``--shards K`` adds a tightrope row with the examples split over K processes sharing the same
threads (``--threads / K`` each): a multi-process figure, kept apart from the one-process rows.

Both sides run the same composition. DeepWordBug (Gao et al. 2018): goal untargeted classification;
RepeatModification; the same stopword list (TextFooler's, passed to TextAttack's StopwordModification,
whose default needs NLTK's stopword corpus, which is not installed offline); Levenshtein distance <= 30
(tightrope counts it per word, an upper bound of TextAttack's whole-text distance, so never looser); four
random character edits per word; greedy search by "[UNK]" replacement importance. PWWS (Ren et al. 2019):
WordNet 3.0 synonyms (the same database: tightrope's prepared NLTK copy is put on TextAttack's NLTK_DATA),
RepeatModification, the same stopwords, greedy search by probability-weighted word saliency.
TextAttack's TextFooler and HotFlip recipes do not run offline (they download counter-fitted embeddings
and, for HotFlip, NLTK's part-of-speech tagger), so they are not compared here. Each side runs in its own
process, one after the other, with the same torch thread count.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

TEXTATTACK_SCRIPT = textwrap.dedent(r"""
    import json, sys, time
    import torch, transformers
    torch.set_num_threads(int(sys.argv[3]))
    import textattack
    from textattack import Attack, AttackArgs, Attacker
    from textattack.attack_results import FailedAttackResult, SkippedAttackResult, SuccessfulAttackResult
    from textattack.constraints.overlap import LevenshteinEditDistance
    from textattack.constraints.pre_transformation import RepeatModification, StopwordModification
    from textattack.goal_functions import UntargetedClassification
    from textattack.search_methods import GreedyWordSwapWIR
    from textattack.transformations import (CompositeTransformation, WordSwapNeighboringCharacterSwap,
        WordSwapRandomCharacterDeletion, WordSwapRandomCharacterInsertion, WordSwapRandomCharacterSubstitution)

    spec = json.load(open(sys.argv[1]))
    model = transformers.AutoModelForSequenceClassification.from_pretrained(spec["model"], use_safetensors=True).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(spec["model"])
    tokenizer.model_max_length = spec["max_length"]  # TextAttack pads every input to this length
    wrapper = textattack.models.wrappers.HuggingFaceModelWrapper(model, tokenizer)
    stopwords = StopwordModification(stopwords=set(spec["stopwords"]))
    if spec["recipe"] == "deepwordbug":
        # DeepWordBugGao2018.build, with the stopword list given explicitly (see the module docstring)
        transformation = CompositeTransformation([WordSwapNeighboringCharacterSwap(), WordSwapRandomCharacterSubstitution(),
            WordSwapRandomCharacterDeletion(), WordSwapRandomCharacterInsertion()])
        constraints = [RepeatModification(), stopwords, LevenshteinEditDistance(30)]
        search = GreedyWordSwapWIR(wir_method="unk")
    elif spec["recipe"] == "pwws":
        # PWWSRen2019.build, with the same stopword list
        from textattack.transformations import WordSwapWordNet
        transformation, constraints = WordSwapWordNet(), [RepeatModification(), stopwords]
        search = GreedyWordSwapWIR("weighted-saliency")
    else:
        raise SystemExit(f"no TextAttack recipe for {spec['recipe']}")
    attack = Attack(UntargetedClassification(wrapper), constraints, transformation, search)
    dataset = textattack.datasets.Dataset(list(zip(spec["texts"], spec["labels"])))
    args = AttackArgs(num_examples=len(spec["texts"]), random_seed=spec["seed"], disable_stdout=True, silent=True)
    start = time.perf_counter()
    results = Attacker(attack, dataset, args).attack_dataset()
    seconds = time.perf_counter() - start
    out = []
    for r in results:
        status = ("succeeded" if isinstance(r, SuccessfulAttackResult) else
                  "skipped" if isinstance(r, SkippedAttackResult) else "failed")
        orig, pert = r.original_result.attacked_text, r.perturbed_result.attacked_text
        changed = len(orig.all_words_diff(pert)) if status == "succeeded" else 0
        out.append({"status": status, "queries": r.perturbed_result.num_queries, "words": len(orig.words),
                    "perturbed": changed})
    json.dump({"seconds": seconds, "results": out}, open(sys.argv[2], "w"))
""")

RANDOMIZED = {"deepwordbug"}  # recipes whose edits are drawn at random (TextAttack's and tightrope's alike)

FLAIR_STUB = {
    "__init__.py": "import torch\ndevice = torch.device('cpu')\nfrom . import data, models  # noqa\n",
    "data.py": "class Tokenizer:\n    pass\n\n\nclass Sentence:\n    def __init__(self, *a, **k):\n"
               "        raise ImportError('flair is stubbed for the benchmark')\n",
    "models.py": "class SequenceTagger:\n    @staticmethod\n    def load(*a, **k):\n"
                 "        raise ImportError('flair is stubbed for the benchmark')\n",
}


def write_flair_stub(venv: Path) -> None:
    site = next(venv.glob("lib/python3*/site-packages"))
    (site / "flair").mkdir(exist_ok=True)
    for name, body in FLAIR_STUB.items():
        (site / "flair" / name).write_text(body)


def metrics(statuses: list[str], queries: list[int], shares: list[float], seconds: float) -> dict:
    """TextAttack's definitions (see tightrope.attacks.results)."""
    won, lost, skipped = (statuses.count(s) for s in ("succeeded", "failed", "skipped"))
    attacked = [q for s, q in zip(statuses, queries) if s != "skipped"]
    wins = [p for s, p in zip(statuses, shares) if s == "succeeded"]
    return {"examples": len(statuses), "succeeded": won, "failed": lost, "skipped": skipped,
            "original_accuracy": (len(statuses) - skipped) / len(statuses),
            "attack_success_rate": won / (won + lost) if won + lost else None,
            "average_queries": sum(attacked) / len(attacked) if attacked else None,
            "average_perturbed_share": sum(wins) / len(wins) if wins else None,
            "seconds": seconds, "examples_per_minute": 60 * len(statuses) / seconds,
            "rows": [list(r) for r in zip(statuses, queries, shares)]}  # per example, for pooling and re-analysis


def pooled(runs: list[dict]) -> dict:
    """One row from the same attack run under several seeds, as if it were one long run (DeepWordBug's
    edits are random, so one seed's ASR moves by a few examples); each seed's own figures are kept."""
    if len(runs) == 1:
        return runs[0]
    rows = [row for run in runs for row in run["rows"]]
    return {**metrics(*map(list, zip(*rows)), sum(r["seconds"] for r in runs)),
            "per_seed": [{k: r[k] for k in ("succeeded", "failed", "skipped", "attack_success_rate",
                                            "examples_per_minute")} for r in runs],
            "outcomes": [o for r in runs for o in r.get("outcomes", [])]}


def load_victim(model: str, max_length: int, pad_to_max: bool = False):
    """The victim as tightrope loads it; ``pad_to_max`` pads every batch to ``max_length`` tokens as
    TextAttack's HuggingFaceModelWrapper does (an ablation: tightrope pads to the longest text of a batch)."""
    from tightrope import workflows
    from tightrope.encoding import collate

    victim = workflows.load(model, max_length=max_length)
    victim.truncation = "head"  # what TextAttack's HuggingFaceModelWrapper keeps: both sides read the same tokens
    if pad_to_max:
        def logits_of_ids(sequences, batch_size=64, progress=None):
            import torch

            out = []
            with torch.inference_mode():
                for i in range(0, len(sequences), batch_size):
                    batch = [s + [victim.pad_id] * (max_length - len(s)) for s in sequences[i:i + batch_size]]
                    inputs = collate(batch, victim.pad_id)
                    inputs["attention_mask"] = (torch.tensor(batch) != victim.pad_id).long()
                    out.append(victim.forward_ids(inputs["input_ids"], inputs["attention_mask"]))
            return torch.cat(out)

        victim.logits_of_ids = logits_of_ids
    return victim


def run_tightrope(model: str, data, seed: int, max_length: int, recipe: str, pad_to_max: bool = False, *,
                  threads: int = 2, streams: int = 1, runtime: str = "torch", first_token: bool = True) -> dict:
    """tightrope's attack in this process, as ``tightrope attack --threads T --streams K --runtime R`` runs it:
    K examples at once on threads, the victim running T // K threads each (torch, or ONNX Runtime's fp32
    graph checked against torch's logits). ``first_token=False`` runs the victim's full last layer (the
    ablation of :mod:`tightrope.first_token`). The clock starts once the victim and the attack are built."""
    import torch

    from tightrope.attacks import recipes
    from tightrope.attacks.attacker import Attacker

    per = max(1, threads // streams)
    torch.set_num_threads(per)
    victim = load_victim(model, max_length, pad_to_max)
    victim.first_token_only = first_token
    if runtime == "onnxruntime":
        from tightrope.compress.onnxrt import onnx_twin

        victim, _ = onnx_twin(victim, data.texts[:16], threads=per)
    victim.source = model
    attack = recipes.build(recipe, victim)
    results = []

    def tick(result, done):
        results.append(result)
        if len(results) % 10 == 0:
            print(f"  tightrope {recipe} ({runtime}, {streams} streams): {len(results)}/{len(data)} in "
                  f"{time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)

    start = time.perf_counter()
    Attacker(attack, seed=seed, streams=streams).run(victim, data, progress=tick)
    seconds = time.perf_counter() - start
    torch.set_num_threads(threads)
    results.sort(key=lambda r: r.index)
    return {**metrics([r.status for r in results], [r.queries for r in results],
                      [r.perturbed_share for r in results], seconds), "load_after": os.getloadavg()[0],
            "threads": threads, "streams": streams, "runtime": runtime, "first_token": first_token,
            "outcomes": [[r.status, r.perturbed_text, r.queries] for r in results]}


def same_outcomes(a: dict, b: dict) -> int:
    """Examples on which two tightrope rows found the same thing (status, adversarial text, queries)."""
    return sum(x == y for x, y in zip(a.get("outcomes", []), b.get("outcomes", [])))


def _shard_worker(model, data, seed, max_length, recipe, threads, k, shards, barrier, queue):
    import torch

    from tightrope.attacks import recipes

    torch.set_num_threads(threads)
    victim = load_victim(model, max_length)
    attack = recipes.build(recipe, victim)
    barrier.wait()  # every shard has loaded its model and resources: the clock starts now
    start = time.perf_counter()
    results = [attack.attack(victim, data.texts[i], data.labels[i], index=i, seed=seed, victim=model)
               for i in range(k, len(data), shards)]
    queue.put((k, start, time.perf_counter(), [(r.status, r.queries, r.perturbed_share) for r in results]))


def run_tightrope_sharded(model: str, data, seed: int, max_length: int, recipe: str, shards: int, threads: int) -> dict:
    """The same attack with the examples split over ``shards`` processes of ``threads // shards`` torch
    threads each (what ``tightrope attack --shard`` does under ``accelerate launch``); the wall time runs
    from the moment every shard is ready to the moment the last one finishes."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(shards), ctx.Queue()
    per = max(1, threads // shards)
    procs = [ctx.Process(target=_shard_worker, args=(model, data, seed, max_length, recipe, per, k, shards, barrier, queue))
             for k in range(shards)]
    for proc in procs:
        proc.start()
    parts = [queue.get() for _ in procs]
    for proc in procs:
        proc.join()
    seconds = max(p[2] for p in parts) - min(p[1] for p in parts)
    rows = [row for _, _, _, part in sorted(parts) for row in part]
    return {**metrics([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], seconds),
            "load_after": os.getloadavg()[0], "shards": shards, "threads_per_shard": per}


def run_textattack(python: str, model: str, data, seed: int, max_length: int, threads: int, recipe: str) -> dict:
    from tightrope import models
    from tightrope.attacks.resources import TEXTFOOLER_STOPWORDS, nltk_data_dir

    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"tightrope-bench-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    spec = {"model": models.resolve(model), "texts": data.texts, "labels": data.labels, "seed": seed,
            "max_length": max_length, "stopwords": sorted(TEXTFOOLER_STOPWORDS), "recipe": recipe}
    (work / "spec.json").write_text(json.dumps(spec))
    (work / "run.py").write_text(TEXTATTACK_SCRIPT)
    # TextAttack builds NLTK-stopword constraints at import time; NLTK's corpus is not installed offline, so
    # a stopwords/english file holding the same list that both sides use is provided for the import.
    corpus = work / "nltk_data" / "corpora" / "stopwords"
    corpus.mkdir(parents=True, exist_ok=True)
    (corpus / "english").write_text("\n".join(sorted(TEXTFOOLER_STOPWORDS)) + "\n")
    nltk_path = str(work / "nltk_data")
    if recipe == "pwws":  # WordNet 3.0 as tightrope prepares it for NLTK (the same database on both sides)
        nltk_path += os.pathsep + str(nltk_data_dir())
    env = {**os.environ, "NLTK_DATA": nltk_path, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([python, str(work / "run.py"), str(work / "spec.json"), str(work / "out.json"), str(threads)],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"TextAttack failed:\n{proc.stderr[-3000:]}")
    out = json.loads((work / "out.json").read_text())
    rows = out["results"]
    return {"load_after": os.getloadavg()[0], **metrics([r["status"] for r in rows], [r["queries"] for r in rows],
                   [r["perturbed"] / r["words"] if r["words"] else 0.0 for r in rows], out["seconds"])}


def fmt(m: dict) -> str:
    asr = "-" if m["attack_success_rate"] is None else f"{m['attack_success_rate']:.1%}"
    q = "-" if m["average_queries"] is None else f"{m['average_queries']:.1f}"
    p = "-" if m["average_perturbed_share"] is None else f"{m['average_perturbed_share']:.1%}"
    return f"{m['examples_per_minute']:>9.1f}{asr:>8}{q:>9}{p:>11}{m['original_accuracy']:>10.1%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="model directory (a fine-tuned classifier)")
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--split", default="test")
    parser.add_argument("--n", type=int, default=100, help="the first N examples of the split")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, default=1,
                        help="run every row under seeds SEED .. SEED+K-1 and pool them (random edits: one seed's "
                             "ASR moves by a few examples)")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--recipes", default="deepwordbug", help="comma-separated: deepwordbug, pwws")
    parser.add_argument("--padded-ablation", action="store_true",
                        help="also run tightrope with every batch padded to --max-length, as TextAttack pads")
    parser.add_argument("--shards", type=int, default=1,
                        help="also run tightrope split over this many processes (threads shared among them)")
    parser.add_argument("--streams", type=int, default=1,
                        help="also run tightrope in one process with this many examples at once (tightrope attack "
                             "--streams), on torch and on ONNX Runtime")
    parser.add_argument("--stream-runtimes", default="torch,onnxruntime",
                        help="victim runtimes of the --streams rows (comma-separated)")
    parser.add_argument("--no-plain", action="store_true",
                        help="skip the one-stream tightrope row (long runs; the streams rows are then not checked "
                             "against it)")
    parser.add_argument("--full-forward", action="store_true",
                        help="also run the --streams rows with the victim's full last layer (the ablation of the "
                             "first-token path, tightrope.first_token)")
    parser.add_argument("--compare-to", type=Path, metavar="JSON",
                        help="an earlier run's --json: count, per row of both, the examples whose results are equal")
    parser.add_argument("--textattack-python", default="/tmp/ta-venv/bin/python")
    parser.add_argument("--skip-textattack", action="store_true")
    parser.add_argument("--write-flair-stub", type=Path, metavar="VENV", help="write the flair stub into VENV and exit")
    parser.add_argument("--json", type=Path, help="write the table as JSON here")
    args = parser.parse_args()
    if args.seeds < 1 or args.shards < 1 or args.n < 1:
        parser.error("--seeds, --shards and --n must be at least 1")
    if args.write_flair_stub:
        write_flair_stub(args.write_flair_stub)
        return
    if not args.model:
        parser.error("--model is required")
    recipe_names = [r.strip() for r in args.recipes.split(",") if r.strip()]
    unknown = set(recipe_names) - {"deepwordbug", "pwws"}
    if unknown:
        parser.error(f"no TextAttack counterpart runs offline for {sorted(unknown)}; choose deepwordbug, pwws")

    import torch

    from tightrope.data import TaskData, load_task

    torch.set_num_threads(args.threads)
    full = load_task(args.task, args.split)
    data = TaskData(full.name, full.split, full.texts[: args.n], full.labels[: args.n], full.label_names)
    setup = {"model": args.model, "task": f"{args.task}:{args.split}", "examples": len(data), "threads": args.threads,
             "seeds": list(range(args.seed, args.seed + args.seeds)),
             "max_length": args.max_length, "torch": torch.__version__, "load_before": os.getloadavg()}
    table: dict[str, dict[str, dict]] = {}
    all_seeds = list(range(args.seed, args.seed + args.seeds))
    for recipe in recipe_names:
        rows = table.setdefault(recipe, {})
        seeds = all_seeds if recipe in RANDOMIZED else all_seeds[:1]  # PWWS is deterministic: one seed says it all
        if not args.no_plain:
            rows["tightrope"] = pooled([run_tightrope(args.model, data, s, args.max_length, recipe,
                                                      threads=args.threads) for s in seeds])
        if args.streams > 1:
            for runtime in [r.strip() for r in args.stream_runtimes.split(",") if r.strip()]:
                row = pooled([run_tightrope(args.model, data, s, args.max_length, recipe, threads=args.threads,
                                            streams=args.streams, runtime=runtime) for s in seeds])
                if "tightrope" in rows:
                    row["same_as_one_stream"] = same_outcomes(row, rows["tightrope"])
                rows[f"tightrope, {args.streams} streams, {runtime}"] = row
                if args.full_forward:
                    rows[f"tightrope, {args.streams} streams, {runtime}, full last layer"] = pooled(
                        [run_tightrope(args.model, data, s, args.max_length, recipe, threads=args.threads,
                                       streams=args.streams, runtime=runtime, first_token=False) for s in seeds])
        if args.padded_ablation:
            rows[f"tightrope, padded to {args.max_length}"] = pooled(
                [run_tightrope(args.model, data, s, args.max_length, recipe, pad_to_max=True) for s in seeds])
        if args.shards > 1:
            rows[f"tightrope, {args.shards} processes"] = pooled(
                [run_tightrope_sharded(args.model, data, s, args.max_length, recipe, args.shards, args.threads)
                 for s in seeds])
        if not args.skip_textattack:
            rows["textattack-0.3.11"] = pooled(
                [run_textattack(args.textattack_python, args.model, data, s, args.max_length, args.threads, recipe)
                 for s in seeds])
    setup["load_after"] = os.getloadavg()
    print(f"{setup['task']} first {len(data)}, seeds {setup['seeds']}, {args.threads} threads, max length {args.max_length}, "
          f"load average {setup['load_before'][0]:.1f} before / {setup['load_after'][0]:.1f} after")
    print(f"{'recipe':<13}{'implementation':<36}{'ex/min':>9}{'ASR':>8}{'queries':>9}{'perturbed':>11}{'orig acc':>10}")
    for recipe, rows in table.items():
        for name, m in rows.items():
            print(f"{recipe:<13}{name:<36}{fmt(m)}")
        if "textattack-0.3.11" in rows:
            peer = rows["textattack-0.3.11"]["examples_per_minute"]
            for name in [n for n in rows if n.startswith("tightrope") and "padded" not in n]:
                same = rows[name].get("same_as_one_stream")
                same = "" if same is None else f" (results equal to one stream's on {same} of {rows[name]['examples']})"
                print(f"{recipe:<13}speed-up of {name}: {rows[name]['examples_per_minute'] / peer:.2f}x{same}")
    if args.compare_to:
        before = json.loads(args.compare_to.read_text())["table"]
        for recipe, rows in table.items():
            for name, m in rows.items():
                if name.startswith("tightrope") and name in before.get(recipe, {}):
                    same = same_outcomes(m, before[recipe][name])
                    m["same_as_compared_run"] = same
                    print(f"{recipe:<13}{name}: results equal to {args.compare_to}'s on {same} of {m['examples']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"setup": setup, "table": table}, indent=2))


if __name__ == "__main__":
    main()
