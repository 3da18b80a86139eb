"""Reading config files: bounded YAML with `include:`, and the ConfigError every config step raises.

One YAML file may `include:` others (paths relative to the including file, merged
depth-first, the including file wins; a choice set such as `tasks:` is replaced, not merged) into
one nested dict, in which every path a file names (PATH_KEYS) is relative to that file
(docs/design.md, "Configuration"); turning that dict into the config dataclasses is
`trainer.config_loader`'s job.

Hostile input stays cheap: YAML is composed and sized (aliases expanded, nesting,
recursion) before anything is built, and includes are bounded in depth and number.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Optional

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


@dataclasses.dataclass
class _LoadBudget:
    """What one config has cost so far: files read and YAML values (aliases expanded)."""
    files: int = 0
    values: int = 0


PATH_KEYS = (
    "data.train", "data.val", "data.tokenizer.path", "data.datasets[].train", "data.datasets[].val",
    "model.init_from_bert", "model.init_from_uniter", "model.init_from_vit",
    "finetune.train", "finetune.val", "finetune.features[]", "finetune.init_from",
)
"""Path-valued keys: a relative value in a YAML file is resolved against that file's folder
(`include:` is too); a command-line override, against the working directory; absolute paths and
URLs (s3://...) stay as they are; the loaded config holds them absolute. `name[]` means the key of
each item of the list `name`. A new path key is added here, and nowhere else. train.run_dir is not
one: it stays relative to the working directory (the usual convention for an output folder)."""

CHOICE_SET_KEYS = ("tasks",)
"""Mappings that are a set of choices rather than settings: a later file's mapping replaces the
earlier one whole (leaving a task out of it removes the task), where other mappings merge key by
key. A dotted override (`--tasks.mlm=2`) still sets one entry of the current set. (The per-dataset
`data.datasets[].tasks` are inside a list, which a later file replaces whole anyway.)"""


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
    raw = resolve_paths(_read_yaml_file(path, stack, budget), os.path.dirname(path), source=path)
    includes = raw.pop("include", []) or []
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(inc, str) for inc in includes):
        raise ConfigError(f"{path}: include must be a file name or a list of them")
    merged: dict = {}
    for inc in includes:
        inc_path = inc if os.path.isabs(inc) else os.path.join(os.path.dirname(path), inc)
        merged = merge_files(merged, _load_with_includes(inc_path, stack + (path,), budget))
    return merge_files(merged, raw)


def merge_files(base: Mapping, top: Mapping) -> dict:
    """A later config file over an earlier one: `deep_merge`, except that each of CHOICE_SET_KEYS
    that `top` sets replaces the earlier mapping whole."""
    out = deep_merge(base, top)
    for dotted in CHOICE_SET_KEYS:
        parts = dotted.split(".")
        node, out_node = top, out
        for part in parts[:-1]:
            node, out_node = node.get(part), out_node.get(part)
            if not isinstance(node, Mapping) or not isinstance(out_node, dict):
                break
        else:
            if parts[-1] in node:
                out_node[parts[-1]] = node[parts[-1]]
    return out


_WRITTEN: dict[str, tuple[str, str]] = {}
"""Resolved path -> (the value as written, the file that wrote it), for `path_origin`'s hints."""


def resolve_paths(raw: dict, base_dir: str, source: Optional[str] = None) -> dict:
    """`raw` (one file's mapping) with each relative value of PATH_KEYS joined to `base_dir` (absolute);
    `source`: the file `raw` was read from, remembered for error messages."""
    for dotted in PATH_KEYS:
        _resolve_key(raw, dotted.split("."), os.path.abspath(base_dir), source)
    return raw


def _resolve_key(node: Any, parts: list[str], base_dir: str, source: Optional[str]) -> None:
    if not isinstance(node, dict):
        return  # a type error, named when the config is built
    head, rest = parts[0], parts[1:]
    if head.endswith("[]"):
        items = node.get(head[:-2])
        for i, item in enumerate(items if isinstance(items, list) else []):
            if rest:
                _resolve_key(item, rest, base_dir, source)
            elif isinstance(item, str):  # a list of paths
                items[i] = _resolved(item, base_dir, source)
    elif rest:
        _resolve_key(node.get(head), rest, base_dir, source)
    elif isinstance(node.get(head), str):
        node[head] = _resolved(node[head], base_dir, source)


def _resolved(written: str, base_dir: str, source: Optional[str]) -> str:
    value = resolve_path(written, base_dir)
    if source and written != value:
        _WRITTEN[value] = (written, source)
    return value


def path_origin(path: str) -> str:
    """For a missing file: " (written 'x' in <file>: ...)" when a config file named `path` relative
    to itself; "" otherwise (an absolute value, or one from the command line: as given, from the cwd)."""
    if path not in _WRITTEN:
        return ""
    written, source = _WRITTEN[path]
    return f" (written {written!r} in {source}, whose folder a config file's paths are relative to)"


def resolve_path(value: str, base_dir: str) -> str:
    """`value` joined to `base_dir` when it is a relative local path; URLs, absolute paths and "" unchanged."""
    if not value or "://" in value or os.path.isabs(value):
        return value
    return os.path.normpath(os.path.join(base_dir, os.path.expanduser(value)))


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


__all__ = [
    "ConfigError", "MAX_CONFIG_BYTES", "MAX_YAML_VALUES", "MAX_YAML_DEPTH", "MAX_INCLUDE_DEPTH",
    "MAX_INCLUDED_FILES", "PATH_KEYS", "CHOICE_SET_KEYS", "load_yaml_with_includes", "safe_load_bounded",
    "deep_merge", "merge_files", "resolve_paths", "resolve_path", "path_origin",
]
