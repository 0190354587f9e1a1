"""A preprocessed :class:`Dataset` on disk, one ``.npy`` file per array.

A hospital keeps its stays this way inside its own folder (``client.folder``): read once
from its export when its staff register it, then opened memory-mapped for every message,
so neither a message nor a large export makes the hospital parse its files again or hold
every stay in memory. The folder is written beside the old one and swapped in with two
renames, so a reader sees the old tensors or the new ones, never half of either.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ..files import json_safe
from ..typed import build
from .dataset import Dataset, DataSummary

META = "meta.json"
ARRAYS = ("stay_ids", "X", "S", "y")


def save_dataset(ds: Dataset, folder: Path, meta: dict[str, Any]) -> None:
    """Write ``ds`` (and ``meta``, plain JSON) to ``folder`` (mode 0700), replacing it whole."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, 0o700)
        np.save(tmp / "stay_ids.npy", ds.stay_ids.astype(str))
        np.save(tmp / "X.npy", np.ascontiguousarray(ds.X, dtype=np.float32))
        np.save(tmp / "S.npy", np.ascontiguousarray(ds.S, dtype=np.float32))
        np.save(tmp / "y.npy", np.asarray(ds.y, dtype=np.int64))
        groups = sorted(ds.groups)
        for i, name in enumerate(groups):
            np.save(tmp / f"group-{i}.npy", np.asarray(ds.groups[name], dtype=np.float64))
        record = {"meta": json_safe(meta), "groups": groups, "summary": json_safe(ds.summary),
                  "fingerprint": ds.fingerprint}
        (tmp / META).write_text(json.dumps(record, indent=1))
        old = folder.with_name(f".{folder.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_meta(folder: Path) -> dict[str, Any] | None:
    """The ``meta`` a dataset folder was saved with; None when there is none (or it is damaged)."""
    try:
        return json.loads((Path(folder) / META).read_text())["meta"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_dataset_folder(folder: Path, memory_map: bool = True) -> Dataset:
    """The dataset saved in ``folder``; its arrays memory-mapped (read-only) by default."""
    folder = Path(folder)
    record = json.loads((folder / META).read_text())
    mode = "r" if memory_map else None
    arrays = {name: np.load(folder / f"{name}.npy", mmap_mode=mode, allow_pickle=False) for name in ARRAYS}
    groups = {name: np.load(folder / f"group-{i}.npy", mmap_mode=mode, allow_pickle=False)
              for i, name in enumerate(record["groups"])}
    summary = build(DataSummary, record["summary"], str(folder / META)) if record.get("summary") else None
    return Dataset(stay_ids=np.asarray(arrays["stay_ids"]), X=arrays["X"], S=arrays["S"], y=arrays["y"], groups=groups,
                   summary=summary, fingerprint=str(record.get("fingerprint", "")))
