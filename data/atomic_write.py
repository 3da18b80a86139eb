"""Writing a file so that a reader sees the old one or the new one, never a part of it."""
from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import BinaryIO, Callable, Union

Payload = Union[str, bytes, Callable[[BinaryIO], None]]


def write_atomic(path: Union[str, Path], payload: Payload) -> str:
    """Write `payload` (text as UTF-8, bytes, or a function given the open binary file) to a temporary
    file beside `path`, sync it and rename it over `path`. The temporary name is unique (pid and a
    random part), so writers of the same folder never share one; a failure (disk full, an interrupt) leaves neither a partial
    `path` nor the temporary file. Returns `path` as a string."""
    path = str(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    # O_EXCL: never another writer's file; mode 0o666 under the umask, as open() would (mkstemp's 0600
    # would hide a checkpoint's files from the other users of a shared cluster folder).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(payload):
                payload(f)
            else:
                f.write(payload.encode("utf-8") if isinstance(payload, str) else payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
