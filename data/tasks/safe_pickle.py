"""Reading a data pickle without running anything in it (the RefCOCO `refs(unc).p` files).

A pickle is a small program: its GLOBAL / STACK_GLOBAL / INST opcodes import any callable
(`os.system`) and REDUCE calls it. `RestrictedUnpickler.find_class` refuses every global, so
the only objects a pickle can build are those its opcodes make directly: dict, list, tuple,
set, frozenset, str, bytes, int, float, bool and None. Every way to call code goes
through `find_class` (REDUCE, BUILD, NEWOBJ and OBJ need a callable or class that only a global
provides; EXT1/2/4 also look up through `find_class`) or `persistent_load`, refused too.
A refs file holds only such plain data (lists of dicts of ids, strings and numbers).
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

DEFAULT_MAX_PICKLE_BYTES = 1 << 30
"""Largest pickle read (refs files are tens of MB); the file is read whole first, so a length
an opcode declares can never make the reader wait on or allocate past the file."""


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle asked for a global (a class or function): data pickles never need one."""


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler that loads builtin containers and scalars only (module docstring)."""

    def find_class(self, module: str, name: str) -> Any:
        raise RefusedGlobal(f"the pickle asks for the global {module}.{name}; only plain data (dict, list, "
                            "tuple, str, bytes, numbers, bool, None) is loaded, never classes or functions")

    def persistent_load(self, pid: Any) -> Any:
        raise RefusedGlobal("the pickle uses a persistent id; only plain data is loaded")


def loads_restricted(data: bytes, what: str = "pickle") -> Any:
    """The plain data pickled in `data`; ValueError naming `what` for a refused global or a pickle
    that does not load. Python 2 byte strings are decoded as UTF-8, undecodable bytes kept as lone
    surrogates (which the builders count as bad text rather than fail on)."""
    unpickler = RestrictedUnpickler(io.BytesIO(data), encoding="utf-8", errors="surrogateescape")
    try:
        return unpickler.load()
    except RefusedGlobal as e:
        raise ValueError(f"{what} refused: {e}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            MemoryError, OverflowError, RecursionError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} is not a readable pickle ({type(e).__name__}: {e})") from None


def load_restricted(path: str | Path, what: str = "pickle file",
                    max_bytes: int = DEFAULT_MAX_PICKLE_BYTES) -> Any:
    """`loads_restricted` of the regular file `path` (at most `max_bytes`); ValueError naming it
    when it is missing, too large or not plain-data pickle."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} not found (or not a regular file): {path}")
    size = path.stat().st_size
    if size > max_bytes:
        raise ValueError(f"{what} {path} is {size} bytes, over the {max_bytes}-byte limit")
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    return loads_restricted(data, f"{what} {path}")
