"""``none``: every patch, unreduced (the LLaVA baseline every reducer is compared against).

It has no reducer function: the encoder returns the feature layer's patches (with CLS for LLaVA's ``full`` feature
strategy), so its graph has no reducer nodes to attribute.
"""

from ..registry import ReducerSpec, register

SPEC = register(ReducerSpec(
    name="none",
    help="every patch (the unreduced baseline)",
    adaptive=False,
    scoring_layer=None,
    listing=0,
))
