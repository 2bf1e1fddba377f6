"""Token-budget calibration: how many tokens each method keeps on a set of images, and the capacity to export.

The padded contract needs a static capacity ``K_max``. The safe default (every possible outlier) is 145 slots for
PruMerge on 576 patches and 577 for PruMerge+, which wastes memory and projector work when real images keep far
fewer. ``--coverage 0.999`` picks the smallest capacity that holds that share of the calibration images
untruncated; images beyond it keep their highest-attention tokens and are flagged ``truncated`` at run time.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np

from ..artifact.contract import ADAPTIVE_METHODS
from ..errors import ConfigError, InputError

SCHEMA = "prumerge-calibration"


def capacity_for_coverage(num_tokens: list, coverage: float) -> int:
    """Smallest capacity C with at least ``coverage`` of the images having ``num_tokens <= C``."""
    if not num_tokens:
        raise InputError("no token counts to calibrate on")
    if not 0 < coverage <= 1:
        raise ConfigError(f"coverage must be in (0, 1], got {coverage}")
    ordered = sorted(int(n) for n in num_tokens)
    return ordered[max(math.ceil(coverage * len(ordered)) - 1, 0)]


def count_stats(num_tokens: list) -> dict:
    data = np.asarray(num_tokens, dtype=np.float64)
    p50, p90, p99 = np.percentile(data, [50, 90, 99])
    return {"mean": float(data.mean()), "p50": float(p50), "p90": float(p90), "p99": float(p99),
            "min": int(data.min()), "max": int(data.max()), "n": int(data.size)}


@dataclasses.dataclass
class BudgetReport:
    model: str
    num_patches: int
    images: list
    skipped: list
    source: dict
    coverage: float
    methods: dict  # method -> {"num_tokens": [...], "stats": {...}, "capacity": C, "default_capacity": C0}
    fingerprint: str | None = None  # the checkpoint's (Checkpoint.fingerprint): a build refuses another model's file
    image_size: int | None = None

    def to_dict(self) -> dict:
        return {"format": SCHEMA, "version": 1, **dataclasses.asdict(self)}

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def read(cls, path: str | Path) -> "BudgetReport":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read calibration file {path}: {exc}") from exc
        if not isinstance(data, dict) or data.get("format") != SCHEMA:
            raise InputError(f"{path} is not a prumerge calibration file")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        missing = [n for n, f in fields.items() if n not in data and f.default is dataclasses.MISSING]
        if missing:
            raise InputError(f"calibration file {path} lacks {', '.join(missing)}; write it again with prumerge-export calibrate")
        report = cls(**{n: data[n] for n in fields if n in data})
        if not isinstance(report.methods, dict) or not report.methods or not all(
                isinstance(m, dict) and _positive_int(m.get("capacity")) for m in report.methods.values()):
            raise InputError(f"calibration file {path} has malformed method entries (each needs an integer capacity >= 1)")
        if not _positive_int(report.num_patches) or (report.image_size is not None and not _positive_int(report.image_size)):
            raise InputError(f"calibration file {path}: num_patches and image_size must be integers >= 1")
        return report

    def check_model(self, encoder) -> None:
        """Refuse a calibration made with another model (other checkpoint or patch grid)."""
        source = encoder.source.get("model")
        if int(self.num_patches) != encoder.num_patches or (self.image_size and int(self.image_size) != encoder.image_size):
            raise ConfigError(f"the calibration file was made with {self.model} ({self.num_patches} patches"
                              f"{f', {self.image_size} px' if self.image_size else ''}) but this build is {source} "
                              f"({encoder.num_patches} patches, {encoder.image_size} px); calibrate this model")
        fingerprint = encoder.source.get("fingerprint")
        if self.fingerprint and fingerprint and self.fingerprint != fingerprint:
            raise ConfigError(f"the calibration file was made with {self.model} but this build is {source} (their configs "
                              "differ); calibrate this model")

    def capacity(self, method: str) -> int:
        if method not in self.methods:
            raise ConfigError(f"the calibration file has no counts for {method}; it has {', '.join(self.methods)}")
        return int(self.methods[method]["capacity"])


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def calibrate_budget(model: str, images, methods=("prumerge", "prumerge+"), coverage: float = 0.999, batch: int = 8,
                     image_size: int | None = None, **reducer_options) -> BudgetReport:
    """Run each method's reducer (untruncated) over ``images`` (a :class:`CalibrationSet`) with ``model``'s tower."""
    if not 0 < coverage <= 1:  # before the model pass, not after it
        raise ConfigError(f"coverage must be in (0, 1], got {coverage}")
    fixed = [m for m in methods if m not in ADAPTIVE_METHODS]
    if fixed:
        raise ConfigError(f"calibrate measures the per-image token counts of prumerge / prumerge+; {', '.join(fixed)} "
                          "keeps a fixed count (its options) and needs no capacity")
    import torch

    from ..model.encoder import PruMergeEncoder
    from ..reduce.config import ReducerConfig, default_capacity
    from ..runtime.preprocess import preprocess_batch

    encoder = PruMergeEncoder.from_pretrained(model, method="prumerge", project=False, image_size=image_size, **reducer_options)
    config = encoder.preprocess_config()
    counts = {m: [] for m in methods}
    with torch.no_grad():
        for start in range(0, len(images.images), batch):
            pixels = torch.from_numpy(preprocess_batch(images.images[start : start + batch], config))
            hidden, q, k = encoder.tower_outputs(pixels)
            for method in methods:
                reducer = ReducerConfig(**{**encoder.reducer.to_dict(), "method": method, "capacity": None})
                out = encoder.reduce(hidden, q, k, reducer)
                counts[method] += out.num_tokens.tolist()
    return BudgetReport(
        model=str(model), num_patches=encoder.num_patches, images=images.names, skipped=images.skipped,
        source=images.source, coverage=coverage, fingerprint=encoder.source.get("fingerprint"), image_size=encoder.image_size,
        methods={m: {"num_tokens": counts[m], "stats": count_stats(counts[m]),
                     "capacity": capacity_for_coverage(counts[m], coverage),
                     "default_capacity": default_capacity(m, encoder.num_patches)} for m in methods},
    )


def histogram(report: BudgetReport, path: str | Path) -> Path:
    """Histogram PNG of kept-token counts per method, the chosen capacity marked."""
    from ..plotting import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, len(report.methods), figsize=(5 * len(report.methods), 3.6), dpi=100, squeeze=False)
    for ax, (method, data) in zip(axes[0], report.methods.items()):
        ax.hist(data["num_tokens"], bins=min(40, max(5, len(set(data["num_tokens"])))), color="tab:blue")
        ax.axvline(data["capacity"], color="tab:red", linestyle="--", label=f"capacity {data['capacity']} ({report.coverage:g})")
        ax.set_title(f"{method}: mean {data['stats']['mean']:.1f} of {report.num_patches} patches")
        ax.set_xlabel("tokens per image (kept + extra)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
