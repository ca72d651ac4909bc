"""The report's plots, drawn with matplotlib (Agg, no display) from result dicts only.

Each function returns PNG bytes, so the HTML report can embed them as base64 and stay one
self-contained file, and the Markdown report can link them as files.
"""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def accuracy_vs_latency(points: dict[str, tuple[float, float]]) -> bytes:
    """One point per model: median latency (ms, batch 1) against test accuracy."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (latency_ms, accuracy) in points.items():
        ax.scatter([latency_ms], [accuracy], s=40)
        ax.annotate(name, (latency_ms, accuracy), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("median latency, batch 1 (ms)")
    ax.set_ylabel("test accuracy")
    ax.set_title("Accuracy against latency")
    ax.grid(alpha=0.3)
    return _png(fig)


def asr_bars(asr: dict[str, dict[str, float | None]]) -> bytes:
    """Attack success rate per model, one group of bars per attack (before / after side by side)."""
    attacks = list(asr)
    models = sorted({m for per in asr.values() for m in per}, key=lambda m: (m != "baseline", m))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(models) * max(1, len(attacks))), 4))
    width = 0.8 / max(1, len(attacks))
    for k, attack in enumerate(attacks):
        xs = [i + k * width for i in range(len(models))]
        ys = [asr[attack].get(m) or 0.0 for m in models]
        bars = ax.bar(xs, ys, width=width, label=attack)
        for bar, m in zip(bars, models):
            value = asr[attack].get(m)
            ax.annotate("n/a" if value is None else f"{100 * value:.0f}%", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8)
    ax.set_xticks([i + width * (len(attacks) - 1) / 2 for i in range(len(models))], models, rotation=20)
    ax.set_ylabel("attack success rate")
    ax.set_ylim(0, 1.05)
    ax.set_title("Attack success rate per model")
    ax.legend(fontsize=8)
    return _png(fig)


def training_curves(histories: dict[str, list[dict]]) -> bytes:
    """Validation accuracy (and training loss) over epochs, from each model card's history."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    for name, history in histories.items():
        epochs = [h.get("epoch", h.get("step", i)) for i, h in enumerate(history)]
        left.plot(epochs, [h.get("accuracy") for h in history], marker="o", label=name)
        right.plot(epochs, [h.get("loss") for h in history], marker="o", label=name)
    left.set_xlabel("epoch")
    left.set_ylabel("validation accuracy")
    right.set_xlabel("epoch")
    right.set_ylabel("training loss (last batch)")
    left.set_title("Training curves")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    left.legend(fontsize=8)
    return _png(fig)


def pareto_plot(points: list[dict], x: str, y: str, front: set[int]) -> bytes:
    """Every search trial on two objectives, the Pareto-optimal ones highlighted and joined."""
    fig, ax = plt.subplots(figsize=(6, 4))
    rest = [p for p in points if p["number"] not in front]
    best = sorted((p for p in points if p["number"] in front), key=lambda p: p[x])
    ax.scatter([p[x] for p in rest], [p[y] for p in rest], c="0.7", s=25, label="dominated trials")
    ax.scatter([p[x] for p in best], [p[y] for p in best], c="C3", s=40, label="Pareto front")
    ax.plot([p[x] for p in best], [p[y] for p in best], c="C3", alpha=0.5)
    for p in best:
        ax.annotate(str(p["number"]), (p[x], p[y]), textcoords="offset points", xytext=(4, 3), fontsize=7)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title("Search: trials and Pareto front")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def search_front(points: list[dict], front: set[int], latency: str = "latency") -> bytes:
    """The search's trade-off in two panels: clean accuracy and latency, each against the strongest attack's
    success rate. One colour per defense (the legend names it); the Pareto front over all three filled and
    numbered by trial (the report's table gives each one's compression); dominated trials hollow. ``latency``
    is the key of the latency: ``latency`` (relative to the baseline) or ``latency_ms`` (older searches)."""
    defenses = list(dict.fromkeys(p["defense"] for p in points))
    colour = {d: f"C{i % 10}" for i, d in enumerate(defenses)}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    latency_label = "latency, batch 1 (x the baseline's)" if latency == "latency" else "median latency, batch 1 (ms)"
    for ax, y, label in ((axes[0], "accuracy", "clean accuracy"), (axes[1], latency, latency_label)):
        for d in defenses:
            rest = [p for p in points if p["defense"] == d and p["number"] not in front]
            best = [p for p in points if p["defense"] == d and p["number"] in front]
            ax.scatter([p["asr"] for p in rest], [p[y] for p in rest], s=30, facecolors="none", edgecolors=colour[d])
            ax.scatter([p["asr"] for p in best], [p[y] for p in best], s=60, c=colour[d], edgecolors="black",
                       label=d if ax is axes[0] else None)
        for p in points:
            if p["number"] in front:  # the trial's number: its row in the report's table of the front
                ax.annotate(f"#{p['number']}", (p["asr"], p[y]), textcoords="offset points", xytext=(4, 3), fontsize=7)
        ax.set_xlabel("strongest attack's success rate")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_title("Accuracy against the strongest attack")
    axes[1].set_title("Latency against the strongest attack")
    axes[0].legend(title="defense (filled: Pareto front)", fontsize=7, title_fontsize=7)
    return _png(fig)
