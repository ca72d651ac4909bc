"""Render a finished study run as one self-contained HTML file and a Markdown file.

Everything comes from the run's result files (``run.json``, each step's ``result.json``, and the
search's ``search/search.json`` when a search ran), never from a model: a report can be re-rendered
anywhere. Contents: the seed paper's Table I (before / after) and Table II (per technique); plots of
accuracy against latency, attack success rate per model, training curves and the search's Pareto
front (clean accuracy, strongest attack's success rate and latency, one colour per defense);
a few adversarial examples with their changes highlighted; the environment. :func:`render_search`
writes the search's front alone (``search/front.md`` and ``front.png``) from ``search/search.json``.
"""

from __future__ import annotations

import base64
import difflib
import html
import json
from dataclasses import dataclass, field
from pathlib import Path

from tightrope.errors import TightropeError
from tightrope.provenance import environment
from tightrope.report import plots
from tightrope.report.tables import (
    epsilon_table,
    markdown_table,
    robustness_table,
    table_one,
    table_two,
)
from tightrope.study.runner import write_result


@dataclass
class RunData:
    root: Path
    spec: dict
    evals: dict[str, dict] = field(default_factory=dict)  # model -> EvalResult dict
    attacks: dict[str, dict[str, dict]] = field(default_factory=dict)  # attack -> model -> report dict
    histories: dict[str, list[dict]] = field(default_factory=dict)  # model -> training history
    techniques: dict[str, str] = field(default_factory=dict)
    search: dict | None = None


def load_run(root: str | Path) -> RunData:
    root = Path(root)
    manifest = root / "run.json"
    spec_file = root / "spec.json"
    if not manifest.exists() or not spec_file.exists():
        raise TightropeError(f"{root} holds no finished study run (no run.json); run `tightrope run` first.")
    spec = json.loads(spec_file.read_text())
    data = RunData(root, spec)
    for step in json.loads(manifest.read_text())["steps"]:
        result = json.loads((root / step["dir"] / "result.json").read_text())["result"]
        parts = step["name"].split("/")
        if step["kind"] == "evaluate":
            data.evals[parts[1]] = result
        elif step["kind"] in ("attack", "attack-embedding"):
            data.attacks.setdefault(parts[1], {})[parts[2]] = result
        elif step["kind"] in ("train", "defend") and result.get("history"):
            data.histories[parts[1]] = result["history"]
    data.techniques = {"baseline": "fine-tuned (fp32)"}
    for d in spec.get("defenses", []):
        data.techniques[d["name"]] = f"defense: {d['method']}"
    for v in spec.get("compress", []):
        prefix = "" if v.get("source", "baseline") == "baseline" else f"{data.techniques.get(v['source'], v['source'])} + "
        data.techniques[v["name"]] = prefix + " + ".join(_step_label(s) for s in v["steps"])
    search = root / "search" / "search.json"
    if search.exists():
        data.search = json.loads(search.read_text())
    return data


def _step_label(step: dict) -> str:
    params = step.get("params") or {}
    shown = ", ".join(f"{k}={v}" for k, v in params.items() if k in ("sparsity", "blocksize", "bits", "heads", "ffn", "threshold"))
    return step["method"] + (f"({shown})" if shown else "")


# --- pieces ---------------------------------------------------------------------------------------


def asr_of(report: dict | None) -> float | None:
    return None if report is None else report.get("attack_success_rate")


def word_diff(original: str, perturbed: str) -> list[tuple[str, str, str]]:
    """Word-level edit script: ("same" | "changed", original words, perturbed words) in order."""
    a, b = original.split(), perturbed.split()
    out = []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        out.append(("same" if op == "equal" else "changed", " ".join(a[i1:i2]), " ".join(b[j1:j2])))
    return out


def pick_examples(data: RunData, k: int) -> list[tuple[str, str, dict]]:
    """Up to ``k`` successful adversarial examples, spread over attacks and models, shortest first."""
    picked = []
    for attack, per_model in data.attacks.items():
        for model, report in per_model.items():
            wins = [e for e in report.get("examples_detail", []) if e["status"] == "succeeded"]
            picked += [(attack, model, e) for e in sorted(wins, key=lambda e: len(e["original_text"]))[:k]]
    picked.sort(key=lambda t: (t[2]["index"], t[1]))
    seen, out = set(), []
    for item in picked:  # one example per (attack, model) first, then fill
        if (item[0], item[1]) not in seen:
            seen.add((item[0], item[1]))
            out.append(item)
    out += [p for p in picked if p not in out]
    return out[:k]


def _table_one_data(data: RunData):
    report = data.spec.get("report") or {}
    before = report.get("before") or "baseline"
    after = report.get("after") or (list(data.evals)[-1] if data.evals else "baseline")
    if before not in data.evals or after not in data.evals:
        return None
    attack = report.get("attack") or next(iter(data.attacks), None)
    per = data.attacks.get(attack, {})
    return table_one(data.evals[before], data.evals[after], asr_of(per.get(before)), asr_of(per.get(after)),
                     (before, after)), attack


def make_plots(data: RunData) -> dict[str, bytes]:
    """Every plot the run's results allow: name -> PNG bytes."""
    out = {}
    points = {m: (e["latency"]["median_ms"], e["metrics"]["accuracy"]) for m, e in data.evals.items() if e.get("latency")}
    if points:
        out["accuracy_vs_latency"] = plots.accuracy_vs_latency(points)
    if data.attacks:
        out["attack_success_rate"] = plots.asr_bars({a: {m: asr_of(r) for m, r in per.items()}
                                                     for a, per in data.attacks.items()})
    if data.histories:
        out["training_curves"] = plots.training_curves(data.histories)
    if data.search and data.search.get("trials") and data.search.get("trade_off"):
        out["search_front"] = search_figure(data.search)
    elif data.search and data.search.get("trials"):
        objectives = data.search["objectives"]
        x, y = (objectives + objectives)[:2] if len(objectives) == 1 else objectives[:2]
        latency = next((o for o in ("latency", "latency_ms") if o in objectives), None)
        if latency is not None and "accuracy" in objectives:
            x, y = latency, "accuracy"
        out["pareto_front"] = plots.pareto_plot([{"number": t["number"], **t["values"]} for t in data.search["trials"]],
                                                x, y, set(data.search["front"]))
    return out


CAPTIONS = {
    "accuracy_vs_latency": "Test accuracy against median latency (batch 1) of every model variant.",
    "attack_success_rate": "Attack success rate (succeeded / (succeeded + failed); skipped examples apart).",
    "training_curves": "Validation accuracy and training loss over epochs (from each model card's history).",
    "pareto_front": "Search trials on two of its objectives; red points are Pareto-optimal over all objectives.",
    "search_front": "Search trials: clean accuracy and latency against the strongest attack's success rate, one colour "
                    "per defense (legend); filled points are the Pareto front of the three, numbered as in the front's table.",
}


def _environment(data: RunData) -> dict:
    for e in data.evals.values():
        if e.get("environment"):
            return e["environment"]

    return environment()


def _percent(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def trial_defense(trial: dict) -> str:
    """The defense a search trial started from (searches before the defense dimension called it ``source``)."""
    params = trial.get("params", {})
    return trial.get("attrs", {}).get("defense") or params.get("defense") or params.get("source") or "baseline"


def trial_compression(trial: dict) -> str:
    """A search trial's compression in a few words: '30% magnitude + Int8Dynamic', or 'none'."""
    params = trial.get("params", {})
    parts = []
    sparsity = params.get("sparsity") or 0
    if sparsity > 0:
        parts.append(f"{100 * sparsity:.0f}% {'structured' if params.get('structured') else 'magnitude'}")
    if params.get("quant", "none") != "none":
        parts.append(params["quant"])
    return " + ".join(parts) or "none"


def search_figure(search: dict) -> bytes:
    """The trade-off figure of a search summary (accuracy / latency against the strongest attack's success rate)."""
    points = [{"number": t["number"], **t["values"], "defense": trial_defense(t), "compression": trial_compression(t)}
              for t in search["trials"]]
    return plots.search_front(points, set(search["trade_off"]["front"]), latency=search["trade_off"]["objectives"][2])


def search_rows(search: dict) -> tuple[list[str], list[list[str]]]:
    """The search's Pareto front as a table. With the trade-off of accuracy, strongest attack and latency:
    one row per member of that front (and the chosen model), its defense, compression and each attack's rate."""
    objectives = search["objectives"]
    chosen = (search.get("chosen") or {}).get("number")
    trade_off = search.get("trade_off")
    if not trade_off:
        header = ["trial", "params", *objectives, "chosen"]
        rows = []
        for t in search["trials"]:
            if t["number"] not in search["front"]:
                continue
            params = ", ".join(f"{k}={v}" for k, v in t["params"].items())
            rows.append([str(t["number"]), params, *(f"{t['values'][o]:.4g}" for o in objectives),
                         "yes" if t["number"] == chosen else ""])
        return header, rows
    attacks = list(dict.fromkeys(a for t in search["trials"] for a in t.get("attrs", {}).get("asr_by_attack", {})))
    latency = trade_off["objectives"][2]  # latency, the ratio to the baseline; latency_ms in searches stored before it
    others = [o for o in objectives if o not in ("accuracy", "asr", latency)]
    header = ["trial", "defense", "compression", "accuracy", "strongest ASR", *(f"{a} ASR" for a in attacks),
              *(["latency (x baseline)", "latency (ms)"] if latency == "latency" else ["latency (ms)"]), *others, "chosen"]
    front = set(trade_off["front"])
    rows = []
    for t in sorted(search["trials"], key=lambda t: -t["values"]["accuracy"]):
        if t["number"] not in front and t["number"] != chosen:
            continue
        attrs, v = t.get("attrs", {}), t["values"]
        by_attack = attrs.get("asr_by_attack", {})
        strongest = attrs.get("strongest_attack")
        rows.append([str(t["number"]), trial_defense(t), trial_compression(t), _percent(v["accuracy"]),
                     _percent(v["asr"]) + (f" ({strongest})" if strongest and len(attacks) > 1 else ""),
                     *(_percent(by_attack.get(a)) for a in attacks), *_latency_cells(v, attrs, latency),
                     *(f"{v[o]:.4g}" for o in others),
                     ("yes" if t["number"] in front else "yes (not on this front)") if t["number"] == chosen else ""])
    return header, rows


def _latency_cells(values: dict, attrs: dict, latency: str) -> list[str]:
    """A trial's latency: the ratio to the baseline and the absolute median beside it, or (a search stored
    before the ratio) the absolute median alone."""
    if latency == "latency_ms":
        return [f"{values['latency_ms']:.1f}"]
    ms = attrs.get("latency_ms")
    return [f"{values['latency']:.2f}x", "-" if ms is None else f"{ms:.1f}"]


def _search_rows(data: RunData) -> tuple[list[str], list[list[str]]] | None:
    return search_rows(data.search) if data.search else None


SEARCH_NOTE = ("The Pareto front of clean accuracy, the strongest attack's success rate (the highest over the attacks "
               "the search ran, each listed) and latency (relative to the baseline, timed in interleaved pairs in one "
               "process; the absolute median beside it follows the machine's load): no other trial is at least as "
               "good on all three and better on one. Each setting was measured once; the chosen model is the front's "
               "member that meets the limits given to `tightrope search`.")


def render_search(root: str | Path) -> dict[str, Path]:
    """Write the search's front as ``search/front.md`` and its figure as ``search/front.png`` from
    ``search/search.json`` alone (``tightrope search`` without a finished ``tightrope run``)."""
    folder = Path(root) / "search"
    file = folder / "search.json"
    if not file.exists():
        raise TightropeError(f"{Path(root)} holds no search summary (search/search.json); run `tightrope search` first.")
    search = json.loads(file.read_text())
    out: dict[str, Path] = {}
    md = ["# Search: the Pareto front", ""]
    if search.get("trials"):
        md += [markdown_table(*search_rows(search)), ""]
        if search.get("trade_off"):
            md += [SEARCH_NOTE, "", f"![{CAPTIONS['search_front']}](front.png)", ""]
            png = folder / "front.png"
            png.write_bytes(search_figure(search))
            out["figure"] = png
    else:
        md += ["No trial has finished yet.", ""]
    out["markdown"] = _write_text(folder / "front.md", "\n".join(md))
    return out


# --- documents ------------------------------------------------------------------------------------


STYLE = """
body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}figure{margin:1.5em 0}img{max-width:100%}
del{background:#fdd;text-decoration:line-through}ins{background:#dfd;text-decoration:none;font-weight:bold}
.example{border-left:3px solid #999;padding:.3em .8em;margin:1em 0;font-size:.95em}
code{background:#f4f4f4;padding:1px 3px}
"""

# Marks the page once loaded: how many figures decoded, and any script error (tests read these).
SELF_CHECK = """
<script>
window.addEventListener('error', function (e) { document.body.dataset.errors = (document.body.dataset.errors || '') + e.message + ';'; });
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.querySelectorAll('figure img'));
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.dataset.figuresLoaded = ok + '/' + imgs.length;
});
</script>
"""


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _html_example(attack: str, model: str, e: dict, label_names: list[str]) -> str:
    parts = []
    for kind, old, new in word_diff(e["original_text"], e["perturbed_text"]):
        if kind == "same":
            parts.append(html.escape(old))
        else:
            parts.append((f"<del>{html.escape(old)}</del>" if old else "") + (f" <ins>{html.escape(new)}</ins>" if new else ""))
    name = lambda i: label_names[i] if i < len(label_names) else str(i)  # noqa: E731
    return (f'<div class="example"><b>{html.escape(attack)}</b> on <b>{html.escape(model)}</b>: '
            f"{name(e['original_prediction'])} &rarr; {name(e['perturbed_prediction'])} "
            f"({e['words_perturbed']} of {e['words']} words changed)<br>{' '.join(parts)}</div>")


def _md_example(attack: str, model: str, e: dict, label_names: list[str]) -> str:
    parts = []
    for kind, old, new in word_diff(e["original_text"], e["perturbed_text"]):
        parts.append(old if kind == "same" else (f"~~{old}~~" if old else "") + (f" **{new}**" if new else ""))
    name = lambda i: label_names[i] if i < len(label_names) else str(i)  # noqa: E731
    return (f"- *{attack}* on *{model}*: {name(e['original_prediction'])} -> {name(e['perturbed_prediction'])} "
            f"({e['words_perturbed']} of {e['words']} words changed): " + " ".join(parts).replace("\n", " "))


def render_report(root: str | Path) -> dict[str, Path]:
    """Write ``report.html`` (self-contained) and ``report.md`` (with ``report_files/*.png``) in ``root``."""

    data = load_run(root)
    root = Path(root)
    rep = data.spec.get("report") or {}
    title = rep.get("title") or f"Study {data.spec.get('name', root.name)}"
    figures = make_plots(data)
    env = _environment(data)
    one = _table_one_data(data)
    two = table_two(data.evals, data.techniques) if data.evals else None
    robust = robustness_table(data.evals, data.attacks) if data.attacks else None
    curve = epsilon_table(data.attacks)
    robust_note = ("Every model under every attack on the same seeded test examples: attack success rate = "
                   "succeeded / (succeeded + failed), examples the model already got wrong are skipped (TextAttack's "
                   "definition); accuracy and F1 on the study's test subset.")
    search = _search_rows(data)
    examples = pick_examples(data, rep.get("examples", 5))
    label_names = next((r.get("label_names", []) for per in data.attacks.values() for r in per.values()), [])
    env_rows = [["python", env.get("python", "-")], ["platform", env.get("platform", "-")],
                ["processor", f"{env.get('processor', '-')} ({env.get('cpu_count', '-')} cores)"],
                ["device", str(env.get("device", "-"))], ["torch threads", str(env.get("torch_threads", "-"))],
                *([k, v] for k, v in (env.get("libraries") or {}).items())]
    attack_note = ""
    if one is not None and one[1]:
        attack_cfg = next((a for a in data.spec.get("attacks", []) if (a.get("name") or a["recipe"]) == one[1]), {})
        attack_note = f"Attack success rate: {one[1]} on {attack_cfg.get('n', '?')} test examples."

    out: dict[str, Path] = {}
    if rep.get("html", True):
        body = [f"<h1>{html.escape(title)}</h1>", f"<p>{html.escape(data.spec.get('description', ''))}</p>"]
        if one is not None:
            body += ["<h2>Table I: before and after</h2>", _html_table(*one[0]), f"<p>{html.escape(attack_note)}</p>"]
        if two is not None:
            body += ["<h2>Table II: size, latency and memory per technique</h2>", _html_table(*two),
                     "<p>Stored = bytes of weight files on disk; peak memory = resident set of a fresh process "
                     "that loads the model and runs one inference. Unstructured sparsity does not make dense "
                     "matrix products faster.</p>"]
        if robust is not None:
            body += ["<h2>Robustness: every model under every attack</h2>", _html_table(*robust),
                     f"<p>{html.escape(robust_note)}</p>"]
        if curve is not None:
            body += ["<h2>Accuracy under embedding attacks, per epsilon</h2>", _html_table(*curve)]
        if search is not None:
            body += ["<h2>Search: the Pareto front</h2>", _html_table(*search)]
            if data.search.get("trade_off"):
                body.append(f"<p>{html.escape(SEARCH_NOTE)}</p>")
        if figures:
            body.append("<h2>Plots</h2>")
        for name, png in figures.items():
            b64 = base64.b64encode(png).decode()
            body.append(f'<figure id="{name}"><img alt="{name}" src="data:image/png;base64,{b64}">'
                        f"<figcaption>{html.escape(CAPTIONS[name])}</figcaption></figure>")
        if examples:
            body.append("<h2>Adversarial examples</h2>")
            body += [_html_example(a, m, e, label_names) for a, m, e in examples]
        body += ["<h2>Environment</h2>", _html_table(["item", "value"], env_rows)]
        page = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                f"<style>{STYLE}</style></head><body>{''.join(body)}{SELF_CHECK}</body></html>")
        out["html"] = _write_text(root / "report.html", page)
    if rep.get("markdown", True):
        files = root / "report_files"
        files.mkdir(exist_ok=True)
        md = [f"# {title}", "", data.spec.get("description", "").strip(), ""]
        if one is not None:
            md += ["## Table I: before and after", "", markdown_table(*one[0]), "", attack_note, ""]
        if two is not None:
            md += ["## Table II: size, latency and memory per technique", "", markdown_table(*two), ""]
        if robust is not None:
            md += ["## Robustness: every model under every attack", "", markdown_table(*robust), "", robust_note, ""]
        if curve is not None:
            md += ["## Accuracy under embedding attacks, per epsilon", "", markdown_table(*curve), ""]
        if search is not None:
            md += ["## Search: the Pareto front", "", markdown_table(*search), ""]
            if data.search.get("trade_off"):
                md += [SEARCH_NOTE, ""]
        for name, png in figures.items():
            (files / f"{name}.png").write_bytes(png)
            md += [f"![{CAPTIONS[name]}](report_files/{name}.png)", ""]
        if examples:
            md += ["## Adversarial examples", "", *(_md_example(a, m, e, label_names) for a, m, e in examples), ""]
        md += ["## Environment", "", markdown_table(["item", "value"], env_rows), ""]
        out["markdown"] = _write_text(root / "report.md", "\n".join(md))
    write_result(root / "report.json", {"figures": list(figures), "files": {k: v.name for k, v in out.items()}})
    return out


def _write_text(path: Path, text: str) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path
