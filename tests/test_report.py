"""Study reports: Table I / II, plots, highlighted examples; the HTML opens in headless Chromium."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tightrope.errors import TightropeError
from tightrope.report.render import load_run, render_report, word_diff


def _eval(acc: float, ms: float, rss: int, params: int, nonzero: int) -> dict:
    return {"model": "x", "task": "t", "split": "test",
            "metrics": {"accuracy": acc, "macro_f1": acc - 0.01, "per_class_f1": {}, "confusion": [], "label_names": ["neg", "pos"],
                        "examples": 100},
            "latency": {"batch_size": 1, "seq_len": 64, "median_ms": ms, "p95_ms": ms * 1.2, "runs": 30, "threads": 2},
            "throughput": None, "weight_bytes": params * 4, "peak_rss_bytes": rss, "baseline_rss_bytes": None,
            "parameters": params, "nonzero_parameters": nonzero, "compression": None, "seconds": 1.0,
            "environment": {"python": "3.11", "platform": "linux", "processor": "cpu", "cpu_count": 2, "torch_threads": 2,
                            "device": "cpu", "libraries": {"torch": "2.x"}}}


def _attack(asr: float) -> dict:
    ex = [{"index": 0, "status": "succeeded", "label": 1, "original_text": "a truly great film", "perturbed_text": "a truly grwat film",
           "original_prediction": 1, "perturbed_prediction": 0, "words": 4, "words_perturbed": 1, "modified_indices": [2],
           "queries": 10},
          {"index": 1, "status": "failed", "label": 0, "original_text": "dull <b>and</b> slow", "perturbed_text": "dull <b>and</b> slow",
           "original_prediction": 0, "perturbed_prediction": 0, "words": 3, "words_perturbed": 0, "modified_indices": [],
           "queries": 12}]
    return {"recipe": "deepwordbug", "attack_success_rate": asr, "succeeded": 1, "failed": 1, "skipped": 0,
            "label_names": ["neg", "pos"], "examples_detail": ex}


def fake_run(root: Path, with_search: bool = True) -> Path:
    spec = {"name": "demo", "description": "a demo", "compress": [{"name": "int8", "source": "baseline",
            "steps": [{"method": "Int8Dynamic", "params": {}}]}], "defenses": [],
            "attacks": [{"recipe": "deepwordbug", "n": 2, "name": None}], "report": {"after": "int8", "examples": 3}}
    steps = {"train/baseline": ("train", {"model_dir": "m", "history": [{"epoch": 1, "accuracy": 0.8, "loss": 0.5},
                                                                         {"epoch": 2, "accuracy": 0.85, "loss": 0.3}]}),
             "evaluate/baseline": ("evaluate", _eval(0.85, 10.0, 300_000_000, 22_000_000, 22_000_000)),
             "evaluate/int8": ("evaluate", _eval(0.84, 6.0, 200_000_000, 22_000_000, 21_000_000)),
             "attack/deepwordbug/baseline": ("attack", _attack(0.5)),
             "attack/deepwordbug/int8": ("attack", _attack(0.4))}
    manifest = []
    for i, (name, (kind, result)) in enumerate(steps.items()):
        d = root / "steps" / f"{kind}-{i}"
        d.mkdir(parents=True)
        (d / "result.json").write_text(json.dumps({"name": name, "result": result}))
        manifest.append({"name": name, "kind": kind, "key": str(i), "dir": f"steps/{kind}-{i}", "seconds": 0})
    (root / "run.json").write_text(json.dumps({"steps": manifest}))
    (root / "spec.json").write_text(json.dumps(spec))
    if with_search:
        trials = [{"number": i, "params": {"quant": q, "sparsity": s}, "values": {"accuracy": a, "latency_ms": l}}
                  for i, (q, s, a, l) in enumerate([("none", 0.0, 0.85, 10), ("int8", 0.0, 0.84, 6), ("nf4", 0.5, 0.7, 9)])]
        (root / "search").mkdir()
        (root / "search" / "search.json").write_text(json.dumps({"objectives": ["accuracy", "latency_ms"], "trials": trials,
                                                                 "front": [0, 1], "chosen": {"number": 1}}))
    return root


def test_report_has_tables_plots_examples_and_environment(tmp_path):
    out = render_report(fake_run(tmp_path))
    page = out["html"].read_text()
    assert "Table I" in page and "Table II" in page
    assert "85.0%" in page and "84.0%" in page  # accuracy before / after
    assert "50.0%" in page and "40.0%" in page  # attack success before / after
    for fig in ("accuracy_vs_latency", "attack_success_rate", "training_curves", "pareto_front"):
        assert f'id="{fig}"' in page
        assert (tmp_path / "report_files" / f"{fig}.png").read_bytes()[:4] == b"\x89PNG"
    assert "<del>great</del> <ins>grwat</ins>" in page
    assert "<b>and</b>" not in page.split("Adversarial examples")[1]  # example text is escaped
    assert "src=\"http" not in page and "<link" not in page  # self-contained
    md = out["markdown"].read_text()
    assert "| accuracy | 85.0% | 84.0% |" in md
    assert "~~great~~ **grwat**" in md


def test_report_without_attacks_or_search_still_renders(tmp_path):
    root = fake_run(tmp_path, with_search=False)
    manifest = json.loads((root / "run.json").read_text())
    manifest["steps"] = [s for s in manifest["steps"] if s["kind"] != "attack"]
    (root / "run.json").write_text(json.dumps(manifest))
    page = render_report(root)["html"].read_text()
    assert 'id="pareto_front"' not in page and 'id="attack_success_rate"' not in page
    assert "Table I" in page


def test_report_of_unfinished_run_is_one_sentence(tmp_path):
    with pytest.raises(TightropeError, match="no finished study run"):
        load_run(tmp_path)


def test_word_diff_marks_only_changed_words():
    assert word_diff("a b c d", "a x c d") == [("same", "a", "a"), ("changed", "b", "x"), ("same", "c d", "c d")]


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(_chromium() is None, reason="no Chromium here (Debian: apt-get install chromium)")
def test_html_report_opens_in_headless_chromium_and_shows_every_plot(tmp_path):
    root = fake_run(tmp_path / "run")
    page = render_report(root)["html"]
    profile = tmp_path / "profile"
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--no-first-run", f"--user-data-dir={profile}",
           "--virtual-time-budget=5000", "--dump-dom", page.resolve().as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    dom = done.stdout
    assert 'data-figures-loaded="4/4"' in dom, dom[:500]
    assert "data-errors" not in dom


def test_robustness_table_has_every_model_under_every_attack(tmp_path):
    root = fake_run(tmp_path, with_search=False)
    pgd = {"attack_success_rate": 0.75, "epsilon": 0.01, "examples": 4, "original_accuracy": 1.0,
           "attack": {"name": "PGD-5", "norm": "linf"}, "gradient_source": "victim",
           "points": [{"epsilon": 0.02, "accuracy_under_attack": 0.0, "succeeded": 4, "failed": 0, "skipped": 0},
                      {"epsilon": 0.01, "accuracy_under_attack": 0.25, "succeeded": 3, "failed": 1, "skipped": 0}]}
    d = root / "steps" / "attack-embedding-9"
    d.mkdir(parents=True)
    (d / "result.json").write_text(json.dumps({"name": "attack/pgd/int8", "result": pgd}))
    manifest = json.loads((root / "run.json").read_text())
    manifest["steps"].append({"name": "attack/pgd/int8", "kind": "attack-embedding", "key": "9",
                              "dir": "steps/attack-embedding-9", "seconds": 0})
    (root / "run.json").write_text(json.dumps(manifest))
    md = render_report(root)["markdown"].read_text()
    table = md.split("## Robustness: every model under every attack")[1].split("##")[0]
    assert "| model | accuracy | macro-F1 | latency | peak memory | deepwordbug ASR |" in table
    assert "pgd ASR (eps=0.01)" in table
    int8 = next(line for line in table.splitlines() if line.startswith("| int8 |"))
    assert "40.0% (1/2)" in int8 and "75.0% (3/4)" in int8
    baseline = next(line for line in table.splitlines() if line.startswith("| baseline |"))
    assert baseline.rstrip().endswith("| - |")  # the baseline was not attacked with PGD
    curve = md.split("## Accuracy under embedding attacks, per epsilon")[1].split("##")[0]
    assert "| eps=0.01 | eps=0.02 |" in curve and "| 25.0% | 0.0% |" in curve
