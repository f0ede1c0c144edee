"""A tree of dataclasses filled from parsed YAML: every key checked against its section's fields, every
value coerced to the field's type, and every problem a `ConfigError` whose one line names the dotted key."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from dforce import DforceError


class ConfigError(DforceError, ValueError):
    """A config problem, said in one line that names the file and the key."""


def build(cls: type, raw: Any, where: str) -> Any:
    """The dataclass `cls` from the mapping `raw`, its keys prefixed by `where` in errors ("" at the top,
    "train." for a section); a `__post_init__`'s ValueError("field: problem") is reported at its key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key not in fields:
            raise ConfigError(f"{where}{key}: unknown key; valid keys: {', '.join(fields)}")
        kwargs[key] = coerce(value, hints[key], f"{where}{key}")
    missing = [f"{where}{name}" for name, f in fields.items() if required(f) and name not in kwargs]
    if missing:
        raise ConfigError(f"missing required key(s): {', '.join(missing)}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as error:  # "field: problem" from a __post_init__ names its key
        field_name, sep, problem = str(error).partition(": ")
        if sep and field_name in fields:
            raise ConfigError(f"{where}{field_name}: {problem}") from None
        raise ConfigError(f"{where.rstrip('.') or 'config'}: {error}") from None


def required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def coerce(value: Any, hint: Any, key: str) -> Any:
    """`value` as type `hint`, or a ConfigError naming `key`. Ints pass as floats; lists as tuples."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if dataclasses.is_dataclass(hint):
        return build(hint, value, f"{key}.")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arm in (a for a in args if a is not type(None)):
            if dataclasses.is_dataclass(arm) and isinstance(value, dict):
                return build(arm, value, f"{key}.")  # a section: its own error names the inner key
            try:
                return coerce(value, arm, key)
            except ConfigError:
                continue
    elif origin in (list, tuple) and isinstance(value, (list, tuple)):
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {value!r}")
            return tuple(
                coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))
            )
        items = [coerce(v, args[0] if args else Any, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    elif origin is dict and isinstance(value, dict):
        return {str(k): coerce(v, args[1] if args else Any, f"{key}.{k}") for k, v in value.items()}
    elif hint is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            return float(value)  # YAML reads 1e-4 (no dot) as a string
        except ValueError:
            pass
    elif hint in (int, str, bool) and type(value) is hint:
        return value
    name = getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
    quote = (
        " (YAML reads an unquoted no, yes, on, off as a bool: quote it)" if isinstance(value, bool) else ""
    )
    raise ConfigError(f"{key}: expected {name}, got {value!r}{quote}")
