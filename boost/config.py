"""Dataclass configs from YAML files and ``key.sub=value`` command-line overrides.

    cfg = load_config(TrainConfig, "run.yaml", ["steps=200", "solver.method=neumann"])

Nested dataclass fields are YAML mappings; override values are parsed as YAML scalars (``1e-4``,
``true``, ``null``, ``[1, 2]``). Unknown keys and values of the wrong type raise a ``ValueError``
that names the file (or the override) and the key, with the keys that exist. A key that a config
class has retired (its ``REMOVED`` class attribute: key -> a function of the value given, returning the
message) is refused with that message, which names the setting to use instead.

Booleans are ``true`` and ``false`` only (YAML 1.2): PyYAML follows YAML 1.1, where ``no``, ``off``,
``yes`` and ``on`` are booleans too, so ``data.strict=no`` would pass silently and ``name: off`` would
become ``False``. Here those words are strings, and a boolean setting given one is an error.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

C = TypeVar("C")

_BOOL = "tag:yaml.org,2002:bool"
_YAML11_BOOLS = frozenset({"yes", "no", "on", "off"})


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 booleans: only true/false (any case), not yes/no/on/off."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    _BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def parse_yaml(text: str) -> Any:
    """YAML text -> Python values, with YAML 1.2 booleans (see the module docstring)."""
    return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 (a SafeLoader subclass)


def _coerce(value: Any, annotation: Any, origin: str, key: str) -> Any:
    where = f"{origin}: {key}"
    kind = typing.get_origin(annotation)
    if kind in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, origin, key)
            except ValueError:
                continue
        raise ValueError(f"{where}: {value!r} is not a {annotation}")
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping of {annotation.__name__} fields, got {value!r}")
        return from_dict(annotation, value, origin, f"{key}.")
    if kind in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(annotation)[:1] or (Any,)
        items = [_coerce(v, item, origin, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if kind is tuple else items
    if annotation is Any:
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            hint = " (yes/no/on/off are not booleans here)" if str(value).lower() in _YAML11_BOOLS else ""
            raise ValueError(f"{where}: expected true or false, got {value!r}{hint}")
        return value
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a string, got {value!r}")
        return value
    raise ValueError(f"{where}: cannot read a value of type {annotation}")


def from_dict(cls: type[C], data: dict[str, Any], origin: str = "config", prefix: str = "") -> C:
    """Build dataclass ``cls`` from a (nested) mapping; missing keys keep their defaults.

    Errors read ``{origin}: {key path}: {what is wrong}``.
    """
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    where = f"{origin}: {prefix.rstrip('.')}" if prefix else origin
    removed = getattr(cls, "REMOVED", {})
    for key in unknown:
        if key in removed:
            raise ValueError(f"{where}: {removed[key](data[key])}")
    if unknown:
        raise ValueError(
            f"{where}: unknown key '{prefix}{unknown[0]}' for {cls.__name__}; known keys: {', '.join(names)}"
        )
    kwargs = {k: _coerce(v, hints[k], origin, f"{prefix}{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as exc:  # a __post_init__ check
        raise ValueError(f"{where}: {exc}") from exc


def from_attributes(cls: type[C], source: Any, **overrides: Any) -> C:
    """Build dataclass ``cls`` from the same-named attributes of ``source`` (an ``argparse`` namespace,
    another dataclass), then ``overrides``; a field that ``source`` lacks keeps its default.

    The one place where settings pass from a command line or another settings object to a dataclass
    of the same names, e.g. ``from_attributes(RolloutConfig, args, reuse_cache=not args.no_kv_cache)``.
    """
    values = {
        f.name: getattr(source, f.name) for f in dataclasses.fields(cls) if f.init and hasattr(source, f.name)
    }
    return cls(**{**values, **overrides})


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {dotted!r}: {key!r} is not a group of settings")
    node[keys[-1]] = value


def load_config(cls: type[C], path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> C:
    """``cls`` from the YAML file at ``path`` (optional) with ``key.sub=value`` overrides applied."""
    tree: dict[str, Any] = {}
    where = "config"
    if path is not None:
        where = str(path)
        try:
            loaded = parse_yaml(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such config file") from None
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(
                f"{path}: the top level must be a mapping of settings, got {type(loaded).__name__}"
            )
        tree = loaded or {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r}: write it as key=value (nested: group.key=value)")
        _set(tree, key.strip(), parse_yaml(text))
    return from_dict(cls, tree, f"{where} with overrides" if overrides else where)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain (YAML-ready) mapping of a dataclass config; tuples become lists."""

    def plain(x):
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    return plain(dataclasses.asdict(cfg))
