"""The reducer registry: every method is one :class:`ReducerSpec`, declared in its own module of
``prumerge.reduce.methods``, and everything that lists, parses, dispatches, explains or draws methods reads it here.

Why: adding VisionZip and DivPrune took 15 source files in one commit, because the method list, its options, their
defaults, the encoder's dispatch, the node-stage rule, the heat-map legends and the budget's build line each kept
their own copy. Now a method module declares its name, whether its count depends on the image, its options (a
dataclass whose fields carry help and range through :func:`option`), the torch function the encoder calls, its
:class:`prumerge.reduce.explain.Explanation`, and the legend ``inspect`` prints; the command line's ``--method``
choices and reducer flags, ``ReducerConfig``'s fields and checks, and ``evaluate``'s ``build`` line are generated
from those declarations (optimum's ``register_tasks_manager_onnx`` and onnxruntime-genai's one class per
architecture do the same for model families).

Stdlib only, and so is every method module at import time (their torch code imports torch inside the functions):
``ReducerConfig`` is read on machines without torch.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import math
import pkgutil
from typing import Any, Callable

from ..errors import ConfigError


def option(default: Any, help: str, minimum: float | None = None) -> Any:
    """A reducer option: a dataclass field whose metadata is its help text and lower bound (the command line's
    ``--name`` is the field name with dashes). Its type is the field's annotation: ``int``, ``float`` or a str
    ``Enum`` (whose values are the choices)."""
    return dataclasses.field(default=default, metadata={"help": help, "minimum": minimum})


@dataclasses.dataclass(frozen=True)
class OptionSpec:
    """One option as the command line, ``ReducerConfig`` and ``evaluate``'s build line see it."""

    name: str
    default: Any
    kind: type  # int, float or an Enum class
    help: str
    minimum: float | None
    owners: tuple  # the methods that read it

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def choices(self) -> tuple | None:
        return tuple(m.value for m in self.kind) if isinstance(self.kind, type) and issubclass(self.kind, enum.Enum) else None

    def check(self, value: Any) -> Any:
        """``value`` normalised (enum members for choices), or one ConfigError naming the option and the rule."""
        if self.choices is not None:
            try:
                return self.kind(value.value if isinstance(value, enum.Enum) else value)
            except ValueError:
                raise ConfigError(f"unknown {self.name} {value!r}; choose one of: {', '.join(self.choices)}") from None
        low = "" if self.minimum is None else f" >= {self.minimum:g}"
        if self.kind is int:
            if isinstance(value, bool) or not isinstance(value, int) or (self.minimum is not None and value < self.minimum):
                raise ConfigError(f"{self.name} must be an integer{low}, got {value!r}")
            return int(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or (self.minimum is not None and value < self.minimum):
            raise ConfigError(f"{self.name} must be a finite number{low}, got {value!r}")
        return float(value)


@dataclasses.dataclass(frozen=True)
class ReducerSpec:
    """A reduction method, everything about it in one record.

    ``count(config, num_patches)``: the fixed token count (None for adaptive methods, whose count a capacity
    bounds). ``run(encoder, features, q, k)``: the torch reducer on the encoder's feature layer (prefix tokens
    first; ``projected`` methods get the projected patches instead) returning ``(tokens, indices)`` for fixed counts or
    a ``ReducedTokens`` for adaptive ones; ``None`` for ``none`` (the encoder returns its features). ``explain``
    (features, q, k, config, num_heads, prefix, importance) -> ``Explanation``. ``scoring_layer``: whose q/k the
    method reads: ``"last"`` (PruMerge), ``"feature"`` (the layer that outputs the features: VisionZip) or None.
    ``legend``: (heat map, count line, tint) for ``inspect``; the count line is formatted with ``method``, ``kept``,
    ``sampled``, ``tokens``, ``patches``. ``ranked``: the kept order is a ranking (drawn as numbers). ``summary``:
    what ``inspect`` prints, formatted with those and ``outliers``, ``extra_only`` (patches no token took, only in
    the extra token or dropped) and ``kept_list``.
    """

    name: str
    help: str
    adaptive: bool
    options: type | None = None  # a dataclass of option(...) fields
    count: Callable | None = None
    run: Callable | None = None
    explain: Callable | None = None
    projected: bool = False
    scoring_layer: str | None = "last"
    legend: tuple = ("", "", "")
    ranked: bool = False
    inputs: tuple = ()  # graph inputs the method reads besides the pixels (``artifact.contract.QUESTION_INPUTS``)
    # validation of a fixed-count method whose choice can tie (near_ties(features, *inputs, config, candidate) ->
    # [bool] per image: may the reference have chosen ``candidate`` up to float error); None: indices must match
    near_ties: Callable | None = None
    summary: str = ("{method}: {tokens} tokens of {patches} patches; {extra_only} dropped\n"
                    "chosen patches: {kept_list}")
    listing: int = 100  # where tables list it (none first)

    def fixed_count(self, config, num_patches: int) -> int | None:
        return None if self.count is None else int(self.count(config, num_patches))

    @property
    def option_names(self) -> tuple:
        return tuple(f.name for f in dataclasses.fields(self.options)) if self.options else ()


_SPECS: dict = {}
_LOADED = False
_OPTIONS: dict = {}  # options(), made once: ReducerConfig reads it at every construction


def register(spec: ReducerSpec) -> ReducerSpec:
    """Add ``spec`` (each method module calls this once at import). A name twice, or an option declared by two
    different option classes, is a programming error caught on first use."""
    if spec.name in _SPECS and _SPECS[spec.name] is not spec:
        raise ValueError(f"reducer {spec.name!r} registered twice")
    _SPECS[spec.name] = spec
    _OPTIONS.clear()
    return spec


def _load() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    from . import methods

    for info in sorted(pkgutil.iter_modules(methods.__path__), key=lambda i: i.name):
        importlib.import_module(f"{methods.__name__}.{info.name}")


def specs() -> dict:
    """``{name: ReducerSpec}`` of every registered method, in listing order."""
    _load()
    return dict(sorted(_SPECS.items(), key=lambda item: (item[1].listing, item[0])))


def names() -> tuple:
    return tuple(specs())


def get(name) -> ReducerSpec:
    """The spec of ``name`` (a method name or enum member), or one ConfigError listing the choices."""
    name = getattr(name, "value", name)
    found = specs().get(str(name).strip().lower())
    if found is None:
        raise ConfigError(f"unknown method {name!r}; choose one of: {', '.join(names())}")
    return found


def options() -> dict:
    """``{option name: OptionSpec}``: every method's options, each declared once (by its option class)."""
    if _OPTIONS:
        return _OPTIONS
    out: dict = {}
    declared: dict = {}
    for spec in specs().values():
        if spec.options is None:
            continue
        for field in dataclasses.fields(spec.options):
            if field.name in declared and declared[field.name] is not spec.options:
                raise ValueError(f"reducer option {field.name!r} is declared by two option classes")
            declared[field.name] = spec.options
            owners = out[field.name].owners + (spec.name,) if field.name in out else (spec.name,)
            kind = field.type if isinstance(field.type, type) else _resolve(spec.options, field.type)
            out[field.name] = OptionSpec(field.name, field.default, kind, field.metadata["help"],
                                         field.metadata["minimum"], owners)
    _OPTIONS.update(out)
    return _OPTIONS


def defaults() -> dict:
    """``{option name: default}`` in plain values (enum members as their strings)."""
    return {name: getattr(o.default, "value", o.default) for name, o in options().items()}


def _resolve(owner: type, annotation: str) -> type:
    """A field annotation written as a string (``from __future__ import annotations``) as its type."""
    import sys

    namespace = vars(sys.modules[owner.__module__])
    if annotation in ("int", "float"):
        return {"int": int, "float": float}[annotation]
    return namespace[annotation]
