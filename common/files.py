"""Writing files so that a crash or a concurrent reader never sees half of one.

Every file fedgru writes that someone may read while it is being replaced (ledgers,
checkpoints, model bundles, cached tensors, run results) goes through
:func:`atomic_open`: the bytes go to a temporary file in the same folder, are flushed to
disk, and the temporary file is renamed over the target, so readers see the old file or
the new one. Private files (keys, secrets) are created with :func:`write_private`, whose
mode is 0600 from the first byte.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_open(path: str | Path) -> Iterator[IO[bytes]]:
    """A binary handle whose contents replace ``path`` only when the block ends well."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def patient_output(path: str | Path) -> Iterator[IO[str]]:
    """A text handle for a file a user named that holds patients' data (risks, a monitor
    page): a new or regular file is written readable by its owner only and whole
    (:func:`atomic_open`: mkstemp makes it 0600); a device or a symbolic link the user
    named (``/dev/stdout``, a link into a shared folder) is written through as it is, since
    renaming over it would replace the device or the link itself (a review, 2026-12-06)."""
    import io

    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_file()):
        with open(path, "w", newline="", encoding="utf-8") as handle:
            yield handle
        return
    with atomic_open(path) as raw:
        handle = io.TextIOWrapper(raw, encoding="utf-8", newline="")
        yield handle
        handle.flush()
        handle.detach()  # atomic_open flushes, syncs and closes the file itself


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path) as handle:
        handle.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    import torch

    with atomic_open(path) as handle:
        torch.save(obj, handle)


def json_safe(value: Any) -> Any:
    """Plain JSON values: dataclasses become dicts, enums their values, NaN and
    infinities ``null`` (JSON has no spelling for them)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: json_safe(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return json_safe(value.item())
    return value


def to_json(value: Any, indent: int | None = 2) -> str:
    return json.dumps(json_safe(value), indent=indent)


def write_json(path: str | Path, value: Any) -> None:
    atomic_write_text(path, to_json(value) + "\n")


def write_private(path: str | Path, data: bytes) -> Path:
    """Create ``path`` readable by its owner only (mode 0600 from creation on, so no
    other user can open it even for an instant). An existing file is never replaced."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    return path
