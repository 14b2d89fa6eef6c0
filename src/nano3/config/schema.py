"""Typed, frozen views of params.yaml sections, parsed once: every key checked against its dataclass field.

A section is a frozen dataclass; each field carries its default, its documentation (`doc`, docs/parameters.md's
parameter table is generated from it) and an optional range check (`check`, a predicate plus what it expects).
`parse` walks a raw mapping into the dataclass: an unknown key is refused with the nearest valid one, a wrong
type or an out-of-range value names the dotted key and what it must be.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Callable

from nano3.errors import UserError


class UnknownKey(UserError):
    """A key no section has; `key` is its dotted name (the loader adds command-line hints for overrides)."""

    def __init__(self, message: str, key: str):
        super().__init__(message)
        self.key = key


def knob(default: Any = dataclasses.MISSING, doc: str = "", check: tuple[Callable[[Any], bool], str] | None = None,
         factory: Callable[[], Any] | None = None):
    """A section field: its default, one line of documentation and an optional (predicate, expectation)."""
    metadata = {"doc": doc, "check": check}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def nearest(key: str, valid: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean '{dotted(prefix, close[0])}'?" if close else f"; valid keys: {', '.join(sorted(valid))}"


def dotted(prefix: str, key) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _expected(kind) -> str:
    """What a value of `kind` is, in the words of an error message."""
    if typing.get_origin(kind) is typing.Literal:
        return " | ".join(map(str, typing.get_args(kind)))
    if dataclasses.is_dataclass(kind) or typing.get_origin(kind) is dict:
        return "a mapping"
    return {int: "a whole number", float: "a number", str: "a string", bool: "true or false",
            list: "a list"}.get(typing.get_origin(kind) or kind, str(kind))


def _coerce(value: Any, kind, where: str, source: str):
    """`value` as `kind` (int, float, str, bool, X | None, list[X], dict[str, X], Literal, a section dataclass)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _coerce(value, option, where, source)
            except UserError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]  # its own message
        raise UserError(f"{source}: '{where}' must be {' or '.join(map(_expected, options))}, got {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise UserError(f"{source}: '{where}' must be one of {' | '.join(map(str, args))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            raise UserError(f"{source}: '{where}' must be a mapping of {kind.__name__} fields, got {value!r}")
        return parse(kind, value, where, source)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{source}: '{where}' must be a list, got {value!r}")
        return tuple(_coerce(v, args[0], f"{where}[{i}]", source) for i, v in enumerate(value)) if args else tuple(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{source}: '{where}' must be a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{where}.{k}", source) for k, v in value.items()}
    if kind is bool:
        if not isinstance(value, bool):
            raise UserError(f"{source}: '{where}' must be true or false, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{source}: '{where}' must be a number, got {value!r}")
        return value  # kept as written (an int stays an int): digests of the raw tree stay as they were
    if kind is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise UserError(f"{source}: '{where}' must be a whole number, got {value!r}")
        return int(value)
    if kind is str:
        if not isinstance(value, str):
            raise UserError(f"{source}: '{where}' must be a string, got {value!r}")
        return value
    raise TypeError(f"{where}: unsupported field type {kind}")


def parse(cls, raw: dict, prefix: str, source: str):
    """`raw` (a params.yaml mapping) as the frozen dataclass `cls`; `prefix` is its dotted key for messages."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in raw:
        if key not in fields:
            raise UnknownKey(f"{source}: unknown key '{dotted(prefix, key)}'{nearest(str(key), list(fields), prefix)}",
                             dotted(prefix, key))
    values = {}
    for name, f in fields.items():
        where = dotted(prefix, name)
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise UserError(f"{source}: missing key '{where}'; add it (see docs/parameters.md)")
            continue
        value = _coerce(raw[name], hints[name], where, source)
        check = f.metadata.get("check")
        if check and value is not None and not check[0](value):
            raise UserError(f"{source}: '{where}' must be {check[1]}, got {raw[name]!r}")
        values[name] = value
    return cls(**values)


def field_docs(cls, prefix: str = "", values=None) -> list[tuple[str, str, str]]:
    """(dotted key, value, doc) for every field of `cls`, nested sections flattened, a `dict[str, section]` as
    `<name>`: docs/parameters.md's table. Values are `values`' (an instance) where given, else the defaults."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        kind = hints[f.name]
        value = getattr(values, f.name) if values is not None else _default(f)
        if dataclasses.is_dataclass(kind):
            rows += field_docs(kind, key + ".", value if dataclasses.is_dataclass(value) else None)
            continue
        args = typing.get_args(kind)
        if typing.get_origin(kind) is dict and args and dataclasses.is_dataclass(args[1]):
            rows += field_docs(args[1], f"{key}.<name>.")
            continue
        rows.append((key, _show(value), f.metadata.get("doc", "")))
    return rows


def _default(f):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return "(required)"


def _show(value) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(map(str, value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {v}" for k, v in value.items()) + "}"
    return str(value)
