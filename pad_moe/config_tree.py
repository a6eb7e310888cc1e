"""The generic half of the config tree: nested dataclasses from plain dicts (keys, sections and scalar types checked
by name and value), ``key=value`` overrides, YAML files read safely. ``pad_moe.config`` defines the sections."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import fields
from typing import Any, Optional

import yaml

SECTIONS: dict[str, type] = {}
"""Section dataclasses by name (``ModelConfig`` ...), filled by ``pad_moe.config``: field types are strings here."""


def from_dict(cls, data: dict[str, Any], path: str = ""):
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys, sections given as scalars, scalars given as
    sections and values of the wrong type, each by name and value."""
    return _build(cls, _checked(cls, data, path))


def _build(cls, checked: dict[str, Any]):
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for name, value in checked.items():
        sub = _section(known[name])
        kwargs[name] = _build(sub, value) if sub else value
    return cls(**kwargs)


def _section(f) -> Optional[type]:
    """The dataclass of a section field (``model: ModelConfig``), None for a scalar field."""
    return SECTIONS.get(f.type if isinstance(f.type, str) else getattr(f.type, "__name__", ""))


def _default(f):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _checked(cls, data, path: str) -> dict[str, Any]:
    """``data`` checked against dataclass ``cls`` (keys, sections, scalar types; sections recursively) and coerced:
    a plain nested dict. An empty section (``train:`` in YAML, i.e. null) is an empty mapping."""
    if data is None and path:
        data = {}
    if not isinstance(data, dict):
        keys = [f.name for f in fields(cls)]
        example = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
        raise ValueError(f"{path or 'config'}={_short(data)} must be a section (a mapping of its keys: {example}), "
                         f"got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted((k for k in data if k not in known), key=str)
    if unknown:
        where = f"{path}." if path else ""
        raise ValueError(f"unknown config key {where}{unknown[0]}; known keys: {', '.join(sorted(known))}")
    out = {}
    for name, value in data.items():
        f = known[name]
        where = f"{path}.{name}" if path else name
        sub = _section(f)
        out[name] = _checked(sub, value, where) if sub else _coerce(where, str(f.type), value, _default(f))
    return out


def _coerce(where: str, ftype: str, value, default=None):
    """Check a scalar against its field type; accept YAML's strings for numbers such as '3e-3' (YAML 1.1 reads an
    exponent without a dot as a string). Numbers must be finite; true/false is no number and 1/0 no bool. Sequence
    fields (train.betas, data.text_files) take a YAML list whose items have the type of the default's items (str when
    the default is empty)."""
    optional = ftype.startswith("Optional[")
    base = ftype[len("Optional["):-1] if optional else ftype
    if value is None:
        if optional:
            return None
        raise ValueError(f"{where} may not be null")
    if base in ("float", "int", "bool", "str") and isinstance(value, (dict, list)):
        kind = "section (mapping)" if isinstance(value, dict) else "list"
        raise ValueError(f"{where}={_short(value)} is a {kind}; {where} takes a single {base} value")
    if base == "float":
        if isinstance(value, bool):
            raise ValueError(f"{where}={value!r} is not a number")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}={_short(value)} is not a number") from None
        if not math.isfinite(number):
            raise ValueError(f"{where}={_short(value)} must be a finite number")
        return number
    if base == "int" and (isinstance(value, bool) or not isinstance(value, int)):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError(f"{where}={_short(value)} is not an integer")
    if base == "bool" and not isinstance(value, bool):
        raise ValueError(f"{where}={_short(value)} is not true/false")
    if base == "str" and not isinstance(value, str):
        hint = f"; quote it: {where}='{value}'" if isinstance(value, (bool, int, float)) else ""
        raise ValueError(f"{where}={_short(value)} is not a string{hint}")
    if base in ("tuple", "list"):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}={_short(value)} is not a list; write e.g. {where}=[{_example(default)}]")
        items = list(default) if isinstance(default, (list, tuple)) else []
        item_type = type(items[0]).__name__ if items else "str"
        value = [_coerce(f"{where}[{i}]", item_type, v) for i, v in enumerate(value)]
        return tuple(value) if base == "tuple" else value
    if base == "dict" and not isinstance(value, dict):
        raise ValueError(f"{where}={_short(value)} is not a mapping")
    return value


def _example(default) -> str:
    items = list(default) if isinstance(default, (list, tuple)) else []
    return ", ".join(map(str, items)) if items else "a, b"


def to_dict(cfg) -> dict[str, Any]:
    out = dataclasses.asdict(cfg)
    out["train"]["betas"] = list(out["train"]["betas"])
    return out


def _parse_value(item: str, raw: str):
    if not raw.strip():
        return None
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ValueError(f"override {item!r}: the value {raw!r} is not valid YAML ({_yaml_problem(err)})") from None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides to a nested dict (values parsed as YAML scalars)."""
    data = yaml.safe_load(yaml.safe_dump(data))  # deep copy of plain data
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value (e.g. moe.num_experts=4)")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(p.strip() for p in parts):
            raise ValueError(f"override {item!r} has an empty key part; write e.g. train.lr=1e-3")
        node = data
        for i, part in enumerate(parts[:-1]):
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                where = ".".join(parts[:i + 1])
                raise ValueError(f"override {item!r}: {where} is {_short(node)}, not a section; write {where}=VALUE")
        node[parts[-1]] = _parse_value(item, raw)
    return data


def _yaml_problem(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or (str(err).strip().splitlines() or [type(err).__name__])[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def _duplicate_key(node) -> Optional[tuple[str, int]]:
    """The first key that a YAML mapping of the composed document repeats (safe_load keeps the last silently)."""
    stack, visited = [node], set()
    while stack:
        n = stack.pop()
        if id(n) in visited:  # an alias shares its anchor's node: walk it once
            continue
        visited.add(id(n))
        if isinstance(n, yaml.MappingNode):
            seen = set()
            for k, v in n.value:
                if isinstance(k, yaml.ScalarNode) and k.tag != "tag:yaml.org,2002:merge":
                    if k.value in seen:
                        return k.value, k.start_mark.line + 1
                    seen.add(k.value)
                stack.append(v)
        elif isinstance(n, yaml.SequenceNode):
            stack.extend(n.value)
    return None


def read_yaml_file(path: str, what: str = "config file") -> Any:
    """``yaml.safe_load`` of a UTF-8 file; a missing, unreadable, non-UTF-8 or invalid file, or a repeated key,
    raises ValueError naming the file."""
    if os.path.isdir(path):
        raise ValueError(f"{what} {path!r} is a directory; pass a YAML file (see configs/)")
    if not os.path.isfile(path):
        raise ValueError(f"{what} {path!r} does not exist; pass a YAML file (see configs/)")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as err:
        raise ValueError(f"{what} {path!r} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset "
                         f"{err.start})") from None
    except OSError as err:
        raise ValueError(f"{what} {path!r} cannot be read: {err.strerror or err}") from None
    try:
        duplicate = _duplicate_key(yaml.compose(text, Loader=yaml.SafeLoader))
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(f"{what} {path!r} is not valid YAML: {_yaml_problem(err)}") from None
    if duplicate is not None:
        raise ValueError(f"{what} {path!r} repeats the key {duplicate[0]!r} (line {duplicate[1]}); keep one")
    return data
