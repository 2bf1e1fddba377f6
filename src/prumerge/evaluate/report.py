"""The evaluation as a table, as JSON, and as a picture of accuracy against time to first token."""

from __future__ import annotations

import json
from pathlib import Path


def table(rows: list, title: str = "evaluate"):
    from rich.table import Table

    withheld = next((r["accuracy_ratio_withheld"] for r in rows if "accuracy_ratio_withheld" in r), None)
    t = Table(title=title, caption=f"* x full withheld: {withheld}" if withheld else None)
    for name in ("configuration", "answered", "accuracy", "x full", "agree", "yes/no F1", "visual tokens mean [min-max]",
                 "prefill ms p50/p90", "TTFT ms p50/p90"):
        t.add_column(name, justify="left" if name == "configuration" else "right")
    for r in rows:
        yn = r.get("yes_no")
        tokens = r.get("visual_tokens")
        t.add_row(
            r["configuration"], f"{r['answered']}/{r['questions']}",
            f"{r['accuracy']:.3f}" if "accuracy" in r else "-",
            f"{r['accuracy_ratio']:.3f}" if "accuracy_ratio" in r else "n/a*" if "accuracy_ratio_withheld" in r else "-",
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
    colours = [ax.scatter([r["ttft_ms"]["p50"]], [r["accuracy"]], s=40).get_facecolor()[0] for r in points]
    ax.set_xlabel("median time to first token (ms)")
    ax.set_ylabel("accuracy")
    ax.set_title("accuracy vs TTFT")
    ax.grid(alpha=0.3)
    if points:
        low = min(r["accuracy"] for r in points)
        ax.set_ylim(max(0.0, low - 0.1), 1.02)
    fig.tight_layout()
    _place_labels(fig, ax, [(r["ttft_ms"]["p50"], r["accuracy"], f"{r['configuration']} ({r['visual_tokens']['mean']:.0f} tok)",
                             colour) for r, colour in zip(points, colours)])
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# where a label may sit around its point (offset points): right, then below, above, left, and further out
_LABEL_OFFSETS = [(6, 4), (6, -12), (6, 16), (-6, 4), (-6, -12), (-6, 16), (6, -26), (6, 30), (-6, -26), (-6, 30),
                  (6, -40), (6, 44), (-6, -40), (-6, 44)]


def _place_labels(fig, ax, labels: list) -> None:
    """Annotate each point (in its colour, with a thin leader line) at the first offset whose text box overlaps no label placed before it and stays inside
    the axes (points close together, such as several configurations at nearly one TTFT, would otherwise print their
    labels over each other); a label with no free offset takes the one that overlaps least."""
    from matplotlib.text import Text

    renderer = fig.canvas.get_renderer()
    inside = ax.get_window_extent(renderer)
    placed = []
    for x, y, text, colour in sorted(labels, key=lambda item: (-item[1], item[0])):
        best = None
        for dx, dy in _LABEL_OFFSETS:
            note = ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=8, color=colour,
                               ha="left" if dx > 0 else "right",
                               arrowprops=dict(arrowstyle="-", lw=0.5, color=colour, shrinkA=0, shrinkB=3))
            note.update_positions(renderer)
            box = Text.get_window_extent(note, renderer)  # the text's own box, not the leader line's
            overlap = sum(_overlap(box, other) for other in placed) + _outside(box, inside)
            if best is None or overlap < best[0]:
                if best is not None:
                    best[1].remove()
                best = (overlap, note, box)
            else:
                note.remove()
            if overlap == 0:
                break
        placed.append(best[2])


def _overlap(a, b) -> float:
    return max(0.0, min(a.x1, b.x1) - max(a.x0, b.x0)) * max(0.0, min(a.y1, b.y1) - max(a.y0, b.y0))


def _outside(box, frame) -> float:
    """Area of ``box`` outside ``frame``."""
    return box.width * box.height - _overlap(box, frame)
