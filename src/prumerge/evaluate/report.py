"""The evaluation as a table, as JSON, and as a picture of accuracy against time to first token."""

from __future__ import annotations

import json
from pathlib import Path


def table(rows: list, title: str = "evaluate"):
    from rich.table import Table

    t = Table(title=title)
    for name in ("configuration", "answered", "accuracy", "x full", "agree", "yes/no F1", "visual tokens mean [min-max]",
                 "prefill ms p50/p90", "TTFT ms p50/p90"):
        t.add_column(name, justify="left" if name == "configuration" else "right")
    for r in rows:
        yn = r.get("yes_no")
        tokens = r.get("visual_tokens")
        t.add_row(
            r["configuration"], f"{r['answered']}/{r['questions']}",
            f"{r['accuracy']:.3f}" if "accuracy" in r else "-",
            f"{r['accuracy_ratio']:.3f}" if "accuracy_ratio" in r else "-",
            f"{r['agreement']:.3f}" if "agreement" in r else "-",
            f"{yn['f1']:.3f}" if yn else "-",
            f"{tokens['mean']:.1f} [{tokens['min']}-{tokens['max']}]" if tokens else "-",
            f"{r['prefill_ms']['p50']:.0f} / {r['prefill_ms']['p90']:.0f}" if "prefill_ms" in r else "-",
            f"{r['ttft_ms']['p50']:.0f} / {r['ttft_ms']['p90']:.0f}" if "ttft_ms" in r else "-",
        )
    return t


def category_table(rows: list):
    from rich.table import Table

    categories = sorted({c for r in rows for c in r.get("by_category", {})})
    t = Table(title="accuracy by category")
    t.add_column("configuration")
    for c in categories:
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(r["configuration"], *[f"{r['by_category'][c]:.3f}" if c in r.get("by_category", {}) else "-" for c in categories])
    return t


def write_json(report: dict, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def plot(rows: list, path: str | Path) -> Path:
    """Accuracy (y) against median TTFT (x), one labelled point per configuration."""
    from ..plotting import pyplot

    plt = pyplot()
    points = [r for r in rows if "accuracy" in r and "ttft_ms" in r]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for r in points:
        x, y = r["ttft_ms"]["p50"], r["accuracy"]
        ax.scatter([x], [y], s=40)
        ax.annotate(f"{r['configuration']} ({r['visual_tokens']['mean']:.0f} tok)", (x, y), textcoords="offset points",
                    xytext=(6, 4), fontsize=8)
    ax.set_xlabel("median time to first token (ms)")
    ax.set_ylabel("accuracy")
    ax.set_title("accuracy vs TTFT")
    ax.grid(alpha=0.3)
    if points:
        low = min(r["accuracy"] for r in points)
        ax.set_ylim(max(0.0, low - 0.1), 1.02)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
