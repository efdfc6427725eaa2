"""The config schema's vocabulary: every setting's meaning, allowed values and range live in its dataclass
field (`setting(...)`); the validators read the choices and ranges from there, and `describe()` prints
the same fields as `python engine/train.py --help`. Imports nothing from the engine.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, NamedTuple


class Range(NamedTuple):
    """[low, high] with either end open; `high=None` is unbounded."""

    low: float
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def holds(self, value: Any) -> bool:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
            return False
        high = math.inf if self.high is None else self.high
        above = value > self.low if self.low_open else value >= self.low
        below = value < high if self.high_open else value <= high
        return above and below

    def text(self, integer: bool) -> str:
        """'a positive integer', 'an integer >= 0', 'a number in (0, inf)' ..."""
        if integer and self.high is None:
            return "a positive integer" if self.low == 1 and not self.low_open else f"an integer >= {self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        return f"a number in {'(' if self.low_open else '['}{self.low:g}, {hi}{')' if self.high_open else ']'}"


def setting(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    choices: tuple = (),
    range: Range | None = None,
    factory: Any = dataclasses.MISSING,
) -> Any:
    """A schema field: its default (or default `factory`), what it means, and what values are allowed."""
    meta = {"help": help, "choices": tuple(choices), "range": range}
    return dataclasses.field(default=default, default_factory=factory, metadata=meta)


def spec(cls: type, name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(cls) if f.name == name)


def choices(cls: type, name: str) -> tuple:
    """The allowed values of `cls.name` (empty: not a choice)."""
    return spec(cls, name).metadata.get("choices", ())


def bounds(cls: type, name: str) -> Range:
    return spec(cls, name).metadata["range"]


def type_text(hint: Any) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_text(a) for a in args) + (" or null" if type(None) in typing.get_args(hint) else "")
    if origin is tuple:
        return "[" + ", ".join(type_text(a) for a in args) + "]"
    if origin is list:
        return f"list of {type_text(args[0])}"
    if origin is dict:
        return "mapping"
    return {Any: "any", bool: "bool", int: "int", float: "float", str: "str"}.get(
        hint, getattr(hint, "__name__", str(hint))
    )


def _default_text(f: dataclasses.Field) -> str:
    value = f.default_factory() if f.default is dataclasses.MISSING else f.default
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(list(value) if isinstance(value, tuple) else value)


def describe(cls: type, prefix: str = "") -> list[str]:
    """Every key of the schema `cls`, depth first: `key  type  default  allowed` and its meaning below."""
    lines, hints = [], typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key, hint = prefix + f.name.rstrip("_"), hints[f.name]
        if dataclasses.is_dataclass(hint):
            lines += ["", f"{key}:"] + describe(hint, key + ".")
            continue
        allowed = f.metadata.get("choices") and " | ".join(map(str, f.metadata["choices"]))
        rng = f.metadata.get("range")
        if rng is not None:
            allowed = rng.text(hint is int)
        elif hint is bool:
            allowed = "true | false"
        head = f"  {key}  ({type_text(hint)}, default {_default_text(f)}"
        lines.append(head + (f"; allowed: {allowed})" if allowed else ")"))
        lines.append(f"      {f.metadata.get('help', '')}")
    return lines
