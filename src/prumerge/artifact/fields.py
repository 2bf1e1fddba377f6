"""The manifest's field checks: every section is a dataclass whose ``check`` names the bad field and its range in one
:class:`ArtifactError` (a manifest is input: a hand-edited or hostile one must fail in one line when read, never
crash later), plus the two records every graph section holds: tensor specs and the decoder's I/O names.
"""

from __future__ import annotations

import dataclasses
import math

from ..errors import ArtifactError


class Section:
    """A typed manifest section: its fields are attributes (read as ``graph.file``, never by string key), parsed
    and range-checked once when the manifest is read.

    Unknown keys are refused when read: a fact the reader does not know is a fact it would silently drop.
    """

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def _names(cls) -> tuple:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, data, where: str):
        if data is None:
            return None
        if isinstance(data, cls):
            return data
        if not isinstance(data, dict):
            raise ArtifactError(f"manifest section {where} is not an object")
        unknown = sorted(set(data) - set(cls._names()))
        if unknown:
            raise ArtifactError(f"manifest section {where} has unknown field(s) {', '.join(unknown)}; rebuild the artifact "
                                "with this version of prumerge-export")
        try:
            section = cls(**data)
        except TypeError as exc:
            raise ArtifactError(f"manifest section {where} lacks required fields: {exc}") from exc
        section.check(where)
        return section

    def check(self, where: str) -> None:
        """Refuse field values of the wrong type or outside their range (a manifest is input: its numbers size
        buffers and loops, and its strings become format templates)."""


def _integer(value, where: str, low: int, high: int, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ArtifactError(f"manifest field {where} must be an integer in {low}..{high}, got {value!r}")


def _choice(value, where: str, allowed, optional: bool = False) -> None:
    if value is None and optional:
        return
    if value not in allowed:
        raise ArtifactError(f"manifest field {where} must be one of {', '.join(map(str, allowed))}, got {value!r}")


def _number(value, where: str, low: float, high: float, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not low <= value <= high:
        raise ArtifactError(f"manifest field {where} must be a number in {low:g}..{high:g}, got {value!r}")


def _strings(value, where: str) -> None:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ArtifactError(f"manifest field {where} must be a list of strings")


_DTYPES = ("float32", "float16", "bfloat16", "int64", "int32", "bool", "uint8", "int8")


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One graph input or output as built: name, element type, shape (sizes, or axis names such as ``batch``)."""

    name: str
    dtype: str
    shape: list

    @classmethod
    def parse(cls, spec, where: str) -> "TensorSpec":
        if isinstance(spec, cls):
            return spec
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
            raise ArtifactError(f"manifest field {where} must be an object with a name")
        _choice(spec.get("dtype"), f"{where}.dtype", _DTYPES)
        shape = spec.get("shape")
        if not isinstance(shape, list) or not all((isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= 1 << 20)
                                                  or (isinstance(d, str) and d) for d in shape):
            raise ArtifactError(f"manifest field {where}.shape must be a list of sizes (0..{1 << 20}) or axis names")
        unknown = sorted(set(spec) - {"name", "dtype", "shape"})
        if unknown:
            raise ArtifactError(f"manifest field {where} has unknown field(s) {', '.join(unknown)}")
        return cls(spec["name"], spec["dtype"], list(shape))


def _tensor_specs(specs, where: str) -> list:
    if not isinstance(specs, list) or not specs:
        raise ArtifactError(f"manifest field {where} must be a non-empty list of tensor specs")
    return [TensorSpec.parse(spec, f"{where}[{i}]") for i, spec in enumerate(specs)]


@dataclasses.dataclass(frozen=True)
class DecoderIO:
    """The decoder's input and output names, one name per layer for the cache (written out by the build from the
    builder's per-layer templates, so the runtime formats nothing it reads from a manifest)."""

    inputs_embeds: str
    attention_mask: str
    logits: str
    past_keys: list
    past_values: list
    present_keys: list
    present_values: list

    @classmethod
    def from_templates(cls, io: dict, layers: int) -> "DecoderIO":
        """From onnxruntime-genai's ``genai_config.json`` names (``past_key_values.%d.key``...): build side only."""
        names = {kind: [io[f"{kind}_names"] % i for i in range(layers)]
                 for kind in ("past_key", "past_value", "present_key", "present_value")}
        return cls(io["inputs_embeds"], io["attention_mask"], io["logits"], names["past_key"], names["past_value"],
                   names["present_key"], names["present_value"])

    @classmethod
    def parse(cls, data, where: str, layers: int) -> "DecoderIO":
        if isinstance(data, cls):
            return data
        fields = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(data, dict) or sorted(data) != sorted(fields):
            raise ArtifactError(f"manifest field {where} must name the decoder's {', '.join(fields)}")
        for name in fields[:3]:
            if not isinstance(data[name], str) or not data[name]:
                raise ArtifactError(f"manifest field {where}.{name} must be a tensor name")
        for name in fields[3:]:
            names = data[name]
            if not isinstance(names, list) or len(names) != layers or not all(isinstance(n, str) and n for n in names):
                raise ArtifactError(f"manifest field {where}.{name} must list one tensor name per layer ({layers})")
        return cls(**data)

    def cache_names(self) -> list:
        """``[(past input, present output)]``: keys of every layer, then values."""
        return list(zip(self.past_keys, self.present_keys)) + list(zip(self.past_values, self.present_values))
