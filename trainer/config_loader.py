"""Config dicts → typed, frozen dataclasses: dotted CLI overrides, strict conversion, value checks.

The flow (docs/design.md, "Configuration"): one YAML file with its includes (`trainer.config_files`) → a nested
dict → dotted overrides (`optim.lr=1e-4`) → strict conversion into the config
dataclasses, where an unknown key or a value of the wrong type is a
`ConfigError` naming the full dotted path.

Hostile input stays cheap: override values are read as bounded YAML, and unknown keys
are named before any walk over the values, which refuses NaN/infinity and URLs carrying
a user name or password anywhere.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
from typing import Any, Literal, Mapping, Optional, Union, get_args, get_origin, get_type_hints

import yaml

from trainer.config_files import ConfigError, MAX_CONFIG_BYTES, MAX_YAML_DEPTH, deep_merge, safe_load_bounded


MAX_INT = 2**63 - 1
"""Largest integer a config takes: beyond int64 a value breaks tensors and C APIs with a traceback."""


def parse_override(text: str) -> tuple[list[str], Any]:
    """`optim.lr=1e-4` → (['optim', 'lr'], 1e-4). The value is read as YAML."""
    body = text[2:] if text.startswith("--") else text
    if "=" not in body:
        raise ConfigError(f"override {text!r} must look like --section.key=value")
    dotted, value_text = body.split("=", 1)
    if not dotted or any(not part for part in dotted.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    if dotted.count(".") >= MAX_YAML_DEPTH:
        raise ConfigError(f"override --{dotted[:80]}...: key nested too deeply (over {MAX_YAML_DEPTH} levels)")
    if len(value_text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"override --{dotted}: value larger than {MAX_CONFIG_BYTES >> 20} MiB")
    try:
        value = safe_load_bounded(value_text, f"override --{dotted}") if value_text != "" else ""
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
    fields = _known_fields(cls, raw, path)
    kwargs = {name: _convert(hints[name], raw[name], _join(path, name)) for name in fields if name in raw}
    try:
        return cls(**kwargs)
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{path or 'config'}: {e}") from None


def _known_fields(cls: type, raw: Mapping, path: str) -> list[str]:
    """The init fields of `cls`; a key of `raw` that is none of them is a ConfigError."""
    fields = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = [k for k in raw if k not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), fields, n=1)
        hint = f" (did you mean {_join(path, close[0])!r}?)" if close else ""
        raise ConfigError(f"unknown config key {_join(path, key)!r}{hint}")
    return fields


def check_known_keys(cls: type, raw: Any, path: str = "") -> None:
    """Refuse an unknown key in the sections of `cls` (recursively) before anything walks the
    values: it follows the dataclass schema only, never into lists or values, so its cost does
    not grow with the input. `from_dict` checks the rest (e.g. keys of list items)."""
    if not isinstance(raw, Mapping):
        return  # from_dict names the type error
    hints = get_type_hints(cls)
    for name in _known_fields(cls, raw, path):
        value = raw.get(name)
        section = _section_type(hints[name], value, _join(path, name)) if isinstance(value, Mapping) else None
        if section is not None:
            check_known_keys(section, value, _join(path, name))


SECTION_RESOLVER = "section_for"
"""A field type with this static method, `(value, path) -> dataclass`, picks the section's class
from its value (the `model:` section's class comes from the recipe its `arch` names)."""


def _section_type(tp: Any, value: Mapping, path: str) -> Optional[type]:
    """The dataclass a mapping `value` of field type `tp` becomes, or None (a dict field, ...)."""
    if hasattr(tp, SECTION_RESOLVER):
        return getattr(tp, SECTION_RESOLVER)(value, path)
    if dataclasses.is_dataclass(tp):
        return tp
    if get_origin(tp) in (Union, types.UnionType):
        options = [a for a in get_args(tp) if a is not type(None)]
        if len(options) == 1 and dataclasses.is_dataclass(options[0]):
            return options[0]
    return None


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else str(key)


def _convert(tp: Any, value: Any, path: str) -> Any:
    if hasattr(tp, SECTION_RESOLVER):
        tp = getattr(tp, SECTION_RESOLVER)(value, path)
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
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


def _convert_scalar(tp: Any, value: Any, path: str) -> Any:
    if tp is Any:
        return value
    # bool is an int subclass in Python; a config must not silently accept `lr: true`.
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            if abs(value) > MAX_INT:
                raise ConfigError(f"{path}: {value:.3g} is out of range (at most {MAX_INT})")
            return value
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:  # YAML 1.1 reads `1e-4` (no dot) as a string.
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):
                raise ConfigError(f"{path}: {value!r} is not a finite number")
            return number
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


# scheme://userinfo@host: a user name (often a token, https://ghp_...@host) or user:password.
URL_USERINFO = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#@\s]*@")


def check_config_values(tree: Any, path: str = "") -> None:
    """Refuse NaN / infinity anywhere (a NaN task ratio silently drops the task, a NaN lr
    trains nothing), and URLs with a user name or password: the resolved config is printed,
    saved beside the checkpoints and logged as MLflow params. Errors name the key, never the value."""
    stack: list[tuple[str, Any]] = [(path, tree)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, Mapping):
            stack.extend((_join(where, str(k)), v) for k, v in reversed(list(value.items())))
        elif isinstance(value, (list, tuple)):
            stack.extend((f"{where}[{i}]", v) for i, v in reversed(list(enumerate(value))))
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{where or 'config'}: {value} is not a finite number")
        elif isinstance(value, str) and URL_USERINFO.search(value):
            raise ConfigError(f"{where or 'config'} carries a password (or a token as user name) in its URL; "
                              f"give the URL without the user@ part and the credentials in the environment "
                              f"(MLflow: MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or "
                              f"MLFLOW_TRACKING_TOKEN; S3: the AWS credential chain)")


__all__ = [
    "parse_override", "apply_overrides", "from_dict", "to_dict", "flatten", "check_config_values",
    "check_known_keys", "URL_USERINFO",
]
