"""Choose a configuration by budget: the one a user would deploy, from measurements on their own questions.

``--ttft-budget-ms X``: among configurations whose median TTFT is within X, the most accurate (ties: the faster).
``--min-accuracy-ratio R``: among those keeping at least R of the full-token accuracy, the fastest. Both: the
fastest that meets both. The answer comes with the ``build`` command that makes the chosen artifact.
"""

from __future__ import annotations

import shlex

from ..artifact.contract import ADAPTIVE_METHODS, PLAIN_OPSET
from ..errors import InputError
from ..reduce import registry


NEEDS_FULL_TOKENS = ("--min-accuracy-ratio needs the full-token configuration (method none: an artifact built with "
                     "--baseline or --method none) as its reference")


def check_request(ttft_budget_ms: float | None, min_accuracy_ratio: float | None, methods=None) -> None:
    """Refuse a budget that cannot choose, before any question is answered: a TTFT budget that is not a positive
    finite number of ms, a ratio outside (0, 1.5] (NaN included), or a ratio with no full-token configuration
    (``methods``: the methods being evaluated) to take it against."""
    import math

    if ttft_budget_ms is not None and not (ttft_budget_ms > 0 and math.isfinite(ttft_budget_ms)):
        raise InputError(f"--ttft-budget-ms must be a positive number of ms, got {ttft_budget_ms}")
    if min_accuracy_ratio is not None and not 0 < min_accuracy_ratio <= 1.5:
        raise InputError(f"--min-accuracy-ratio must be in (0, 1.5], got {min_accuracy_ratio}")
    if min_accuracy_ratio is not None and methods is not None and "none" not in methods:
        raise InputError(NEEDS_FULL_TOKENS)


def choose(rows: list, ttft_budget_ms: float | None = None, min_accuracy_ratio: float | None = None) -> dict:
    """The chosen summary row (see :func:`runner.summarize`), or one :class:`InputError` saying why none fits."""
    if ttft_budget_ms is None and min_accuracy_ratio is None:
        raise InputError("give --ttft-budget-ms or --min-accuracy-ratio to choose a configuration")
    check_request(ttft_budget_ms, min_accuracy_ratio)
    measured = [r for r in rows if "accuracy" in r and "ttft_ms" in r]
    if not measured:
        raise InputError("no configuration has scored answers (the question file needs reference answers)")
    withheld = next((r["accuracy_ratio_withheld"] for r in measured if "accuracy_ratio_withheld" in r), None)
    if min_accuracy_ratio is not None and withheld:
        raise InputError(f"--min-accuracy-ratio cannot choose on these questions: {withheld}, so a ratio to them "
                         "means nothing (ask questions the full-token model answers, or choose by --ttft-budget-ms)")
    if min_accuracy_ratio is not None and not any("accuracy_ratio" in r for r in measured):
        raise InputError(NEEDS_FULL_TOKENS)
    fits = []
    for row in measured:
        if ttft_budget_ms is not None and row["ttft_ms"]["p50"] > ttft_budget_ms:
            continue
        if min_accuracy_ratio is not None and row.get("accuracy_ratio", 0.0) < min_accuracy_ratio:
            continue
        fits.append(row)
    if not fits:
        wanted = " and ".join(s for s in (f"median TTFT <= {ttft_budget_ms:g} ms" if ttft_budget_ms is not None else "",
                                          f"accuracy >= {min_accuracy_ratio:g} x full tokens" if min_accuracy_ratio is not None else "") if s)
        best = ", ".join(f"{r['configuration']}: {r['ttft_ms']['p50']:.0f} ms, {r['accuracy']:.3f}"
                         + (f" ({r['accuracy_ratio']:.3f} x)" if "accuracy_ratio" in r else "") for r in measured)
        raise InputError(f"no measured configuration has {wanted} ({best})")
    if min_accuracy_ratio is not None:
        return min(fits, key=lambda r: (r["ttft_ms"]["p50"], -r["accuracy"]))
    return max(fits, key=lambda r: (r["accuracy"], -r["ttft_ms"]["p50"]))


def build_command(row: dict, out: str = "artifacts/chosen") -> str:
    """The ``prumerge-export build`` line that makes the chosen configuration's artifact."""
    facts = row["build"]
    args = ["prumerge-export", "build", str(facts["source"]), "--out", out, "--method", facts["method"]]
    if facts.get("revision"):
        args += ["--revision", str(facts["revision"])]
    if facts.get("text_encoder"):
        args += ["--text-encoder", str(facts["text_encoder"])]
    if facts["method"] != "none":
        if facts["method"] in ADAPTIVE_METHODS:  # the others' count is their options'
            args += ["--max-tokens", str(int(facts["capacity"]))]
        declared, defaults = registry.options(), registry.defaults()  # each option's flag and default, declared once
        # with a text encoder the sign's default is another (from_flags): say it whatever it is
        stated = {"relevance_sign"} if facts.get("text_encoder") else set()
        for name, value in (facts.get("reducer_options") or {}).items():
            if name in declared and (value != defaults[name] or name in stated):
                args += [declared[name].flag, str(value)]  # str(float): the shortest form that reads back equal
    if facts.get("opset") not in (None, PLAIN_OPSET):  # e.g. 23: fused attention
        args += ["--opset", str(facts["opset"])]
    if facts.get("output") == "dynamic":
        args += ["--output", "dynamic"]
    if facts.get("precision") == "fp16":
        args += ["--fp16"]
    if facts.get("precision") == "int8":
        args += ["--precision", "int8", "--calibration", "CALIBRATION.json"]
        if facts.get("int8_calibration_method") not in (None, "minmax"):  # the form measured, not the default
            args += ["--calibration-method", facts["int8_calibration_method"]]
        if facts.get("int8_float_layers"):
            args += ["--int8-float-layers", str(facts["int8_float_layers"])]
        if facts.get("int8_target_jaccard"):
            args += ["--int8-target-jaccard", f"{facts['int8_target_jaccard']:g}"]
    if facts.get("llm_precision"):
        args += ["--llm-precision", str(facts["llm_precision"])]
    if facts.get("llm_kv_cache"):  # the cache measured, whatever the default resolves to where it is rebuilt
        args += ["--llm-kv-cache", str(facts["llm_kv_cache"])]
    if facts.get("image_size"):
        args += ["--image-size", str(facts["image_size"])]
    return shlex.join(args)
