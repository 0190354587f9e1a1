"""Shared fixtures. Tests read the real PhysioNet 2012 set A from ../shared (read-only)
and cache derived tensors in a per-session folder, never inside ../shared."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = ROOT.parent / "shared" / "data" / "physionet2012"
SET_A = DATA_DIR / "set-a.tar.gz"
OUTCOMES = DATA_DIR / "Outcomes-a.txt"
DEFAULT_CONFIG = ROOT / "configs" / "default.yaml"


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory):
    """Derived data goes to a fresh cache folder for the test session."""
    os.environ.setdefault("FEDGRU_CACHE", str(tmp_path_factory.mktemp("fedgru-cache")))
    os.environ.setdefault("FEDGRU_PROJECT_ROOT", str(ROOT))
    yield


@pytest.fixture(scope="session")
def physionet_files() -> tuple[Path, Path]:
    if not SET_A.is_file() or not OUTCOMES.is_file():
        pytest.fail(
            f"PhysioNet 2012 set A not found at {DATA_DIR}; the tests read the real data "
            "from ../shared/data/physionet2012 beside the checkout"
        )
    return SET_A, OUTCOMES


@pytest.fixture(scope="session")
def default_cfg(physionet_files):
    from common.config import load_config

    return load_config(DEFAULT_CONFIG)


@pytest.fixture(scope="session")
def full_dataset(default_cfg):
    from common.data.dataset import load_dataset

    return load_dataset(default_cfg)


def small_spec(**changes):
    """A small GRUClassifier shape for unit tests (6 channels, 3 descriptors)."""
    from common.model import ModelSpec

    fields = dict(n_channels=6, n_static=3, n_outputs=1, gru_hidden=[5], dropout=0.0, head_hidden=0, pool="last",
                  input_skip=False, architecture="stacked", zero_init_head=False, n_variables=0)
    return ModelSpec(**{**fields, **changes})
