"""params.yaml plus `key=value` overrides: the one place every knob is read from.

Stages receive the whole parameter tree and pick what they need through `get`, which names the
missing or mistyped key in its error so a typo in params.yaml is a one-line fix.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Iterable

import yaml

from nano3.errors import UserError

PARAMS_FILE = "params.yaml"
_MISSING = object()


class _Loader(yaml.SafeLoader):
    """YAML 1.2 floats (`25e12`, `1e-4`), as DVC reads params.yaml; PyYAML alone reads them as strings."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)$|^[-+]?(?:[0-9][0-9_]*)\.[0-9_]*$"
               r"|^[-+]?\.[0-9_]+(?:[eE][-+][0-9]+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)


def yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)


class Params(dict):
    """The parsed parameter tree; remembers the file it came from for error messages."""

    source: str = PARAMS_FILE

    def has_key(self, dotted: str) -> bool:
        node: Any = self
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return True

    def get_key(self, dotted: str, default: Any = _MISSING, kind: type | tuple[type, ...] | None = None):
        node: Any = self
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                if default is not _MISSING:
                    return default
                raise UserError(f"{self.source}: missing key '{dotted}'; add it (see README, 'Parameters')")
            node = node[part]
        if kind is not None and node is not None and not isinstance(node, kind):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise UserError(f"{self.source}: '{dotted}' must be {names}, got {node!r}")
        return node


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise UserError(f"override '{text}' must look like key.path=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def set_key(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"override '{dotted}': '{part}' is not a section")
    node[parts[-1]] = value


def load_params(path: str | Path = PARAMS_FILE, overrides: Iterable[str] = ()) -> Params:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: parameter file not found; run from the repository root or pass --params")
    try:
        tree = yaml_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})")
    if not isinstance(tree, dict):
        raise UserError(f"{path}: top level must be a mapping of sections")
    params = Params(copy.deepcopy(tree))
    params.source = str(path)
    for text in overrides:
        key, value = parse_override(text)
        set_key(params, key, value)
    return params
