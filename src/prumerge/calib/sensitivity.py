"""Which parts of the tower to keep float so an INT8 vision graph keeps a target share of fp32's token selection.

Why: on real weights the error that moves PruMerge's selection is spread over the tower, and its parts differ in how
much of it they add: on DINOv2-S with static scales the patch embedding alone (it quantises the input pixels with
one scale) costs more than any encoder layer. A user asks for an agreement (``--int8-target-jaccard 0.9``), not for
a list of layers: quantise everything; if that misses the target, measure each part quantised alone (every other
part float), then keep the most harmful ones float, the fewest that reach the target (binary search over how many,
in order of harm: agreement grows as parts are kept float, closely enough that the answer is taken from the probe
that measured it, never assumed). Every probe quantises and compares on the calibration set itself, as the build's
own INT8 record does.

Recorded in the manifest: the parts kept float, each part's agreement alone, the target; the agreement reached is
the build's ordinary INT8 agreement. The probe (quantise, compare) is ``prumerge.calib.int8``'s, so this module holds the choice alone and imports
nothing of the flow that calls it. Costs ``2 + parts + log2(parts)`` quantisations: ~5 minutes for DINOv2-S (13
parts) on 28 photos on 2 CPU cores; a 24-layer ViT-L at 336 px takes far longer (each probe calibrates and runs it).
"""

from __future__ import annotations

import dataclasses
from typing import Callable


@dataclasses.dataclass
class FloatChoice:
    """What :func:`choose_float_parts` decided and measured."""

    parts: list  # tower parts kept float, in the tower's order
    reached: float  # mean Jaccard with those parts float (the probe that chose them)
    alone: dict  # part -> mean Jaccard with only that part quantised (empty when all-quantised met the target)
    probes: int  # quantisations run

    def sensitivity(self) -> list:
        return [[part, round(float(j), 4)] for part, j in self.alone.items()]


def choose_float_parts(parts: list, probe: Callable[[tuple], float], target: float, log=print) -> FloatChoice:
    """The fewest of ``parts`` (in the tower's order) to keep float for ``probe(float_parts) >= target``; ``probe``
    returns the mean Jaccard of the graph quantised with those parts float. When even every part float misses the
    target (what stays quantised, the projector, cannot move the selection; but a probe's noise can), that is the
    choice and ``reached`` says by how much."""
    position = {part: i for i, part in enumerate(parts)}
    count = 0

    def measure(float_parts) -> float:
        nonlocal count
        count += 1
        return float(probe(tuple(sorted(float_parts, key=position.get))))

    reached = measure(())
    log(f"everything INT8: mean Jaccard {reached:.3f} (target {target:g})")
    if reached >= target or not parts:
        return FloatChoice([], reached, {}, count)
    alone = {}
    for part in parts:
        alone[part] = measure([other for other in parts if other != part])
        log(f"{part} alone INT8: mean Jaccard {alone[part]:.3f}")
    order = sorted(parts, key=lambda part: (alone[part], position[part]))  # most harmful (lowest alone) first
    best = (list(parts), measure(parts))
    if best[1] < target:
        log(f"every part float: mean Jaccard {best[1]:.3f}, still below the target; building that, its agreement "
            "recorded")
        return FloatChoice(list(parts), best[1], alone, count)
    low, high = 1, len(parts)  # invariant: keeping order[:high] float meets the target
    while low < high:
        middle = (low + high) // 2
        got = measure(order[:middle])
        log(f"{middle} most harmful part(s) float ({', '.join(order[:middle])}): mean Jaccard {got:.3f}")
        if got >= target:
            high, best = middle, (order[:middle], got)
        else:
            low = middle + 1
    return FloatChoice(sorted(best[0], key=position.get), best[1], alone, count)
