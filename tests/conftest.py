"""Shared fixtures. Tests read the real PhysioNet 2012 set A from ../shared (read-only)
and cache derived tensors in a per-session folder, never inside ../shared."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from common import messages as M
from common.messages import ReplyState

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


def small_cfg(*extra):
    """The default config with a tiny stacked model (fast unit tests)."""
    from common.config import load_config

    return load_config(DEFAULT_CONFIG, ["model.gru_hidden=[4]", "model.head_hidden=0", *extra])


def train_reply(node_id: int, arrays: dict[str, np.ndarray], n=100, hospital="h", metrics=None) -> Message:
    """A hospital's training reply as node ``node_id`` would send it."""
    request = Message(RecordDict({M.CONFIG: ConfigRecord({"x": 1})}), dst_node_id=node_id, message_type=MessageType.TRAIN)
    m = {M.NUM_EXAMPLES: n, M.UNIT_WEIGHT: 1.0, M.TRAIN_LOSS: 0.3, M.EPSILON: 0.5, M.DELTA: 1e-5, M.BUDGET: 1.0, M.STEPS: 4}
    m.update(metrics or {})
    content = RecordDict(
        {
            M.ARRAYS: ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()}),
            M.METRICS: MetricRecord(m),
            M.STATUS: ConfigRecord({M.HOSPITAL: hospital, M.STATE: ReplyState.TRAINED.value}),
        }
    )
    return Message(content, reply_to=request)


class ReplayGrid:
    """Answers each send_and_receive with prepared replies (no network)."""

    def __init__(self, replies: list[Message]):
        self.replies = replies

    def get_node_ids(self):
        return [r.metadata.src_node_id for r in self.replies]

    def send_and_receive(self, messages, *, timeout=None):
        return list(self.replies)
