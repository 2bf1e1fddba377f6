"""Profile output: a terminal table, JSON (stable keys, schema in the README) and a stacked-bar PNG."""

from __future__ import annotations

import json
from pathlib import Path

from ..plotting import pyplot
from .runner import STAGE_ORDER, ProfileReport


def write_json(report: ProfileReport, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return path


def table(report: ProfileReport):
    from rich.table import Table

    out = Table(title=f"p50 ms over {report.config['runs']} runs x {report.config['images']} images "
                      f"(warm-up {report.config['warmup']} excluded), provider {report.config['provider']}")
    out.add_column("stage")
    for m in report.methods:
        out.add_column(m.method, justify="right")
    for stage in (*STAGE_ORDER, "ttft", "end_to_end"):
        out.add_row(stage, *[_fmt(m.stages[stage]["p50"]) for m in report.methods])
    out.add_row("end_to_end p90 / p99", *[f"{_fmt(m.stages['end_to_end']['p90'])} / {_fmt(m.stages['end_to_end']['p99'])}"
                                          for m in report.methods])
    out.add_row("decode ms/token", *[_fmt(m.decode_ms_per_token["p50"], 2) for m in report.methods])
    out.add_row("tokens/s", *[_fmt(m.tokens_per_s["p50"], 1) for m in report.methods])
    out.add_row("visual tokens mean [min, max]",
                *[f"{m.visual_tokens['mean']:.1f} [{m.visual_tokens['min']}, {m.visual_tokens['max']}]" for m in report.methods])
    out.add_row("reducer share of vision graph", *[f"{100 * m.node_share['reducer']:.2f}%" for m in report.methods])
    out.add_row("peak RSS MB (process so far)", *[f"{m.peak_rss_mb:.0f}" for m in report.methods])
    out.add_row("artifact MB: vision / LLM / embeddings",
                *[f"{m.artifact_mb.get('vision', 0):.1f} / {m.artifact_mb.get('llm_decoder', 0):.1f} / "
                  f"{m.artifact_mb.get('embeddings', 0):.1f}" for m in report.methods])
    out.add_row("KV cache MB at most positions", *[f"{_fmt(m.kv_cache_mb, 2)} @ {m.positions_max}" for m in report.methods])
    return out


def _fmt(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def plot(report: ProfileReport, path: str | Path, width_px: int = 1000, height_px: int = 600) -> Path:
    """Stacked bars of p50 stage times per method (PNG of exactly ``width_px`` x ``height_px``)."""
    plt = pyplot()
    dpi = 100
    fig, ax = plt.subplots(figsize=(width_px / dpi, height_px / dpi), dpi=dpi)
    names = [m.method for m in report.methods]
    bottom = [0.0] * len(names)
    colours = plt.get_cmap("tab10")
    for i, stage in enumerate(STAGE_ORDER):
        values = [m.stages[stage]["p50"] or 0.0 for m in report.methods]
        ax.bar(names, values, bottom=bottom, label=stage, color=colours(i))
        bottom = [b + v for b, v in zip(bottom, values)]
    for x, m in enumerate(report.methods):
        ax.annotate(f"{m.visual_tokens['mean']:.0f} visual tokens", (x, bottom[x]), ha="center", va="bottom", fontsize=9)
    ax.set_ylabel("ms (p50)")
    ax.set_title(f"prumerge pipeline, {report.config['provider']}: per-stage latency")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
