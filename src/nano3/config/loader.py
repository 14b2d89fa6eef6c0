"""params.yaml plus `key=value` overrides, read once and checked against the typed sections.

`load_params` returns `Params`: the raw tree as DVC sees it (run digests and lineage hash it) with its typed view
`params.settings` (nano3.config.sections), which every stage reads. An unknown or mistyped key stops the load in
one line that names it and the nearest valid key.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Iterable

import yaml

from nano3.config.overrides import unknown_key_hint
from nano3.config.schema import UnknownKey, parse
from nano3.config.sections import PHASE_NAMES, Settings
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
    """The parameter tree as written (what DVC and the run digests see); `settings` is its typed, checked view.
    Remembers the file it came from for error messages."""

    source: str = PARAMS_FILE

    @property
    def settings(self) -> Settings:
        """The typed view, parsed from the tree as it is now (a copy such as the reference budget's parses anew)."""
        key = repr(self)
        cached = self.__dict__.get("_settings")
        if cached is None or cached[0] != key:
            cached = (key, parse_settings(self, self.source))
            self.__dict__["_settings"] = cached
        return cached[1]

    def get_key(self, dotted: str, default: Any = _MISSING, kind: type | tuple[type, ...] | None = None):
        """A raw value by dotted key, for tests and tools; the stages read `settings`."""
        node: Any = self
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                if default is not _MISSING:
                    return default
                raise UserError(f"{self.source}: missing key '{dotted}'; add it (see docs/parameters.md)")
            node = node[part]
        if kind is not None and node is not None and not isinstance(node, kind):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise UserError(f"{self.source}: '{dotted}' must be {names}, got {node!r}")
        return node


def parse_settings(tree: dict, source: str) -> Settings:
    """The typed sections of `tree`; also checks what crosses fields (dataset names, phase names)."""
    settings = parse(Settings, tree, "", source)
    prep = settings.prep
    for name, spec in settings.datasets.items():
        if not name or any(c in name for c in "./ "):
            raise UserError(f"{source}: dataset name {name!r} must not contain '.', '/' or spaces "
                            f"(it is a params key and a directory name)")
        valid = spec.valid_fraction if spec.valid_fraction is not None else prep.valid_fraction
        test = spec.test_fraction if spec.test_fraction is not None else prep.test_fraction
        if valid + test >= 1:
            raise UserError(f"{source}: 'datasets.{name}' valid_fraction + test_fraction must lie in [0, 1)")
    mix, lc = settings.lc.mix, settings.lc
    for where, seq in (("lc.seq_length", lc.seq_length), ("lc.reference.seq_length", lc.reference.seq_length)):
        if mix.short_share and seq % mix.short_length:
            raise UserError(f"{source}: 'lc.mix.short_length' ({mix.short_length}) must divide {where} ({seq})")
    r = settings.retrieval
    if r.max_chars < r.min_chars:
        raise UserError(f"{source}: 'retrieval.max_chars' ({r.max_chars}) must be at least 'retrieval.min_chars' ({r.min_chars})")
    for phase in settings.blend.phases:
        if phase not in PHASE_NAMES:
            raise UserError(f"{source}: unknown blend phase 'blend.phases.{phase}'; phases are {', '.join(PHASE_NAMES)}")
    return settings


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
    keys = []
    for text in overrides:
        key, value = parse_override(text)
        set_key(params, key, value)
        keys.append(key)
    try:
        params.settings  # noqa: B018 - checks every key now, before any stage work
    except UnknownKey as e:
        unknown = next((k for k in keys if k == e.key or k.startswith(e.key + ".")), None)
        if unknown is None:
            raise
        raise UserError(f"override '{unknown}': params.yaml has no such key; {unknown_key_hint(unknown)}") from None
    return params
