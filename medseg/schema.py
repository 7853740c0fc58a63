"""Typed config from YAML/JSON: a mapping read into frozen dataclasses, field by field, by their annotations.

Unknown keys, missing keys and values of the wrong type raise `ConfigError` naming the file and the
dotted key (`augmentation.affine.p`), so a typo never falls back to a default silently. Supported
annotations: bool, int, float, str, Literal, Optional/Union, tuple (fixed or `...`), dict and nested
dataclasses. `medseg.config` declares the task's classes; this module only reads values into them.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Union

from medseg.errors import ConfigError


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(tp: Any, value: Any, key: str, source: str) -> Any:
    """Convert a YAML/JSON value to the annotated type, or raise naming the key."""

    def fail(expected: str) -> ConfigError:
        return ConfigError(f"{source}: key '{key}' must be {expected}, got {value!r}")

    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value, key, source)
            except ConfigError as error:
                errors.append(error)
        raise errors[0] if len(errors) == 1 else fail(" or ".join(_type_name(a) for a in args))
    if origin is Literal:
        if value in args:
            return value
        raise fail("one of " + ", ".join(repr(a) for a in args))
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise fail("a mapping")
        return build(tp, value, source, prefix=f"{key}.")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise fail(f"a list ({_type_name(tp)})")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{key}[{i}]", source) for i, v in enumerate(value))
        if len(value) != len(args):
            raise fail(f"a list of {len(args)} values")
        return tuple(_coerce(a, v, f"{key}[{i}]", source) for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise fail("a mapping")
        return {_coerce(args[0], k, key, source): _coerce(args[1], v, f"{key}.{k}", source) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise fail("true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise fail("an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise fail("a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise fail("a string")
    raise TypeError(f"config type {tp} is not supported")  # a bug in the config classes, not user input


def build(cls: type, raw: dict, source: str, prefix: str = "") -> Any:
    """An instance of dataclass `cls` from a YAML/JSON mapping: every key known, every value of its type."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            raise ConfigError(f"{source}: unknown key '{prefix}{key}' (expected one of: {', '.join(names)})")
    kwargs = {k: _coerce(hints[k], v, prefix + k, source) for k, v in raw.items()}
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{source}: missing key '{prefix}{missing[0]}'")
    return cls(**kwargs)
