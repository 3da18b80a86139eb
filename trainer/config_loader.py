"""YAML → typed, frozen dataclasses, with `include:` and dotted CLI overrides.

The flow (DESIGN §1): one YAML file, which may `include:` others (paths relative
to the including file, merged depth-first, the including file wins) → a nested
dict → dotted overrides (`optim.lr=1e-4`) → strict conversion into the config
dataclasses, where an unknown key or a value of the wrong type is a
`ConfigError` naming the full dotted path.

Hostile input stays cheap: YAML is composed and sized (aliases expanded, nesting,
recursion) before anything is built, includes are bounded in depth and number, and
unknown keys are named before any walk over the values, which refuses NaN/infinity
and URLs carrying a user name or password anywhere.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
from typing import Any, Literal, Mapping, Optional, Union, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A user error in a config file or override; the CLI prints it as one line."""


# Bounds on what a config may make the loader do; real configs are far below each.
MAX_CONFIG_BYTES = 4 << 20
"""Size of one YAML file (or override value)."""
MAX_YAML_VALUES = 100_000
"""Values (scalars, lists, mappings) of the whole config once YAML aliases are expanded: a
500-byte alias bomb ("billion laughs") expands to hundreds of millions."""
MAX_YAML_DEPTH = 64
"""Nesting of lists and mappings (and parts of a dotted override key)."""
MAX_INCLUDE_DEPTH = 16
MAX_INCLUDED_FILES = 64
"""Files read for one config, a file included twice counted twice (include diamonds double per level)."""
MAX_INT = 2**63 - 1
"""Largest integer a config takes: beyond int64 a value breaks tensors and C APIs with a traceback."""


@dataclasses.dataclass
class _LoadBudget:
    files: int = 0
    values: int = 0


def load_yaml_with_includes(path: str) -> dict:
    """Read `path`, resolve its `include:` list recursively and merge."""
    return _load_with_includes(path, (), _LoadBudget())


def _load_with_includes(path: str, stack: tuple[str, ...], budget: _LoadBudget) -> dict:
    path = os.path.abspath(path)
    if path in stack:
        chain = " -> ".join(stack + (path,))
        raise ConfigError(f"include cycle: {chain}")
    if len(stack) >= MAX_INCLUDE_DEPTH:
        raise ConfigError(f"{path}: include chain more than {MAX_INCLUDE_DEPTH} files deep (from {stack[0]})")
    budget.files += 1
    if budget.files > MAX_INCLUDED_FILES:
        raise ConfigError(f"{path}: more than {MAX_INCLUDED_FILES} included files in all (from {stack[0]}; "
                          f"a file included twice counts twice)")
    raw = _read_yaml_file(path, stack, budget)
    includes = raw.pop("include", []) or []
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(inc, str) for inc in includes):
        raise ConfigError(f"{path}: include must be a file name or a list of them")
    merged: dict = {}
    for inc in includes:
        inc_path = inc if os.path.isabs(inc) else os.path.join(os.path.dirname(path), inc)
        merged = deep_merge(merged, _load_with_includes(inc_path, stack + (path,), budget))
    return deep_merge(merged, raw)


def _read_yaml_file(path: str, stack: tuple[str, ...], budget: _LoadBudget) -> dict:
    if not os.path.isfile(path):
        where = f" (included from {stack[-1]})" if stack else ""
        raise ConfigError(f"config file not found: {path}{where}")
    with open(path, "rb") as f:
        data = f.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES >> 20} MiB; a config is a small file")
    try:
        raw = safe_load_bounded(data.decode("utf-8"), path, budget) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"invalid YAML in {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(raw).__name__}")
    return raw


def safe_load_bounded(text: str, where: str, budget: Optional[_LoadBudget] = None) -> Any:
    """`yaml.safe_load`, refusing recursive anchors, nesting deeper than MAX_YAML_DEPTH and more
    than MAX_YAML_VALUES values once aliases are expanded, before anything is constructed."""
    loader = yaml.SafeLoader(text)
    try:
        try:
            node = loader.get_single_node()
        except RecursionError:  # PyYAML's composer recurses once per level
            raise ConfigError(f"{where}: YAML nested too deeply (over {MAX_YAML_DEPTH} levels)") from None
        if node is None:
            return None
        budget = budget or _LoadBudget()
        budget.values += _expanded_values(node, where)
        if budget.values > MAX_YAML_VALUES:
            raise ConfigError(f"{where}: more than {MAX_YAML_VALUES} values in the config once YAML "
                              f"aliases are expanded")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _expanded_values(root: yaml.Node, where: str) -> int:
    """Values under `root` with every alias expanded; over the bound, an error naming the top-level key."""
    sizes: dict[int, int] = {}
    pairs = root.value if isinstance(root, yaml.MappingNode) else [(None, root)]
    total = 0
    for key_node, value_node in pairs:
        label = f"{where}: {key_node.value}" if isinstance(key_node, yaml.ScalarNode) else where
        total += _node_size(value_node, sizes, label) + (_node_size(key_node, sizes, label) if key_node else 0)
        if total > MAX_YAML_VALUES:
            raise ConfigError(f"{label}: more than {MAX_YAML_VALUES} values once its YAML aliases are "
                              f"expanded (an alias bomb?)")
    return total


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return list(node.value) if isinstance(node, yaml.SequenceNode) else []


def _node_size(root: yaml.Node, sizes: dict[int, int], label: str) -> int:
    """Expanded size of `root`, each shared (aliased) node sized once; iterative, so no recursion limit."""
    started: set[int] = set()  # on the current path: reaching one again is a cycle
    stack: list[tuple[yaml.Node, int, bool]] = [(root, 0, False)]
    while stack:
        node, depth, finished = stack.pop()
        if finished:
            started.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes[id(c)] for c in _children(node))
            continue
        if id(node) in sizes:
            continue
        if id(node) in started:
            raise ConfigError(f"{label}: recursive YAML alias (an anchor used inside itself)")
        if depth > MAX_YAML_DEPTH:
            raise ConfigError(f"{label}: YAML nested too deeply (over {MAX_YAML_DEPTH} levels)")
        started.add(id(node))
        stack.append((node, depth, True))
        stack.extend((child, depth + 1, False) for child in _children(node))
    return sizes[id(root)]


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


def _section_type(tp: Any, value: Mapping, path: str) -> Optional[type]:
    """The dataclass a mapping `value` of field type `tp` becomes, or None (a dict field, ...)."""
    if dataclasses.is_dataclass(tp):
        return tp
    if get_origin(tp) in (Union, types.UnionType):
        options = [a for a in get_args(tp) if a is not type(None)]
        if len(options) == 1 and dataclasses.is_dataclass(options[0]):
            return options[0]
        return _by_discriminator(tuple(options), value, path)
    return None


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
    "ConfigError", "load_yaml_with_includes", "deep_merge", "parse_override",
    "apply_overrides", "from_dict", "to_dict", "flatten", "check_config_values", "check_known_keys",
    "safe_load_bounded",
]
