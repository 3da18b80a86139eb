"""YAML → typed, frozen dataclasses, with `include:` and dotted CLI overrides.

The flow (DESIGN §1): one YAML file, which may `include:` others (paths relative
to the including file, merged depth-first, the including file wins) → a nested
dict → dotted overrides (`optim.lr=1e-4`) → strict conversion into the config
dataclasses, where an unknown key or a value of the wrong type is a
`ConfigError` naming the full dotted path.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
from typing import Any, Literal, Mapping, Optional, Union, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A user error in a config file or override; the CLI prints it as one line."""


def load_yaml_with_includes(path: str, _stack: tuple[str, ...] = ()) -> dict:
    """Read `path`, resolve its `include:` list recursively and merge."""
    path = os.path.abspath(path)
    if path in _stack:
        chain = " -> ".join(_stack + (path,))
        raise ConfigError(f"include cycle: {chain}")
    if not os.path.isfile(path):
        where = f" (included from {_stack[-1]})" if _stack else ""
        raise ConfigError(f"config file not found: {path}{where}")
    with open(path) as f:
        try:
            raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"invalid YAML in {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(raw).__name__}")
    includes = raw.pop("include", []) or []
    if isinstance(includes, str):
        includes = [includes]
    merged: dict = {}
    for inc in includes:
        inc_path = inc if os.path.isabs(inc) else os.path.join(os.path.dirname(path), inc)
        merged = deep_merge(merged, load_yaml_with_includes(inc_path, _stack + (path,)))
    return deep_merge(merged, raw)


def deep_merge(base: Mapping, top: Mapping) -> dict:
    """Recursive dict merge; values of `top` win, mappings merge key by key."""
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """`optim.lr=1e-4` → (['optim', 'lr'], 1e-4). The value is read as YAML."""
    body = text[2:] if text.startswith("--") else text
    if "=" not in body:
        raise ConfigError(f"override {text!r} must look like --section.key=value")
    dotted, value_text = body.split("=", 1)
    if not dotted or any(not part for part in dotted.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(value_text) if value_text != "" else ""
    except yaml.YAMLError:
        value = value_text
    return dotted.split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Set each dotted override in a copy of `raw` (typing is checked later)."""
    out = deep_merge({}, raw)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return out


def from_dict(cls: type, raw: Any, path: str = "") -> Any:
    """Build dataclass `cls` from `raw`, rejecting unknown keys and wrong types."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {raw!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in raw if k not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), list(fields), n=1)
        hint = f" (did you mean {_join(path, close[0])!r}?)" if close else ""
        raise ConfigError(f"unknown config key {_join(path, key)!r}{hint}")
    kwargs = {name: _convert(hints[name], raw[name], _join(path, name)) for name in fields if name in raw}
    try:
        return cls(**kwargs)
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{path or 'config'}: {e}") from None


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else str(key)


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        chosen = _by_discriminator(args, value, path)
        if chosen is not None:
            return from_dict(chosen, value, path)
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: {value!r} matches none of {tp}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{path}: {value!r} is not one of {list(get_args(tp))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        (item_tp, *_rest) = get_args(tp) or (Any,)
        items = [_convert(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        _, val_tp = get_args(tp)
        return {str(k): _convert(val_tp, v, f"{path}.{k}") for k, v in value.items()}
    return _convert_scalar(tp, value, path)


DISCRIMINATOR = "arch"


def _by_discriminator(args: tuple, value: Any, path: str) -> Optional[type]:
    """For a union of config sections told apart by their `arch` (model: uniter | albef),
    the one `value` names (absent: the first); None when `args` is not such a union."""
    options = [a for a in args if a is not type(None)]
    if not (options and all(dataclasses.is_dataclass(a) for a in options)):
        return None
    names = {}
    for option in options:
        field = {f.name: f for f in dataclasses.fields(option)}.get(DISCRIMINATOR)
        if field is None:
            return None
        names[field.default] = option
    if not isinstance(value, Mapping):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {value!r}")
    name = value.get(DISCRIMINATOR, next(iter(names)))
    if name not in names:
        raise ConfigError(f"{_join(path, DISCRIMINATOR)}: {name!r} is not one of {list(names)}")
    return names[name]


def _convert_scalar(tp: Any, value: Any, path: str) -> Any:
    if tp is Any:
        return value
    # bool is an int subclass in Python; a config must not silently accept `lr: true`.
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:  # YAML 1.1 reads `1e-4` (no dot) as a string.
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise ConfigError(f"{path}: unsupported field type {tp}")
    raise ConfigError(f"{path}: expected {tp.__name__}, got {value!r} ({type(value).__name__})")


def to_dict(cfg: Any) -> Any:
    """Dataclass tree → plain dict/list tree (for YAML, JSON and MLflow)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """{'optim': {'lr': 1}} → {'optim.lr': 1}; lists stay values."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = _join(prefix, key)
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out


# scheme://user:password@host
URL_PASSWORD = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/@\s:]*:[^/@\s]+@")


def check_no_url_passwords(tree: Any, path: str = "") -> None:
    """Refuse a config value like `http://user:pass@mlflow:5000` (it would be logged as a param)."""
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            check_no_url_passwords(value, f"{path}.{key}" if path else str(key))
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            check_no_url_passwords(value, f"{path}[{i}]")
    elif isinstance(tree, str) and URL_PASSWORD.search(tree):
        raise ConfigError(f"{path} carries a password in its URL; give the URL without it and the credentials "
                          f"in the environment (MLflow: MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD)")


__all__ = [
    "ConfigError", "load_yaml_with_includes", "deep_merge", "parse_override",
    "apply_overrides", "from_dict", "to_dict", "flatten", "check_no_url_passwords",
]
