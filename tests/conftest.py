"""Shared fixtures. Tests read the real PhysioNet 2012 set A from ../shared (read-only)
and cache derived tensors in a per-session folder, never inside ../shared."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict

from common import messages as M
from common.messages import ReplyState

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = ROOT.parent / "shared" / "data" / "physionet2012"
SET_A = DATA_DIR / "set-a.tar.gz"
OUTCOMES = DATA_DIR / "Outcomes-a.txt"
DEFAULT_CONFIG = ROOT / "configs" / "default.yaml"


# The files that hold most of the suite's time, longest first (seconds per file in CI on
# e799a70, one worker: 490, 428, 248, 195, 194, 144, 113, 100). CI runs the suite on two
# workers, each file whole on one worker (`-n 2 --dist loadfile --no-loadscope-reorder`,
# .ci/run); starting the long files first keeps one worker from being left with a long file
# at the end. Only the order changes; a file not named here runs after these, in the usual order.
LONGEST_FILES_FIRST = ("test_deployment.py", "test_simulation_e2e.py", "test_estimates.py", "test_audit.py",
                       "test_deploy_local.py", "test_install.py", "test_utility.py", "test_threshold_intervals.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: tests keep their order in a file


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


RUN_ID = "run-t"


def train_reply(
    node_id: int, arrays: dict[str, np.ndarray], n=100, hospital="h", metrics=None, cfg=None, rounds: int = 50,
) -> Message:
    """A hospital's training reply as node ``node_id`` would send it for run RUN_ID: its
    ledger records the DP-SGD release of every round up to ``rounds`` with the settings
    ``cfg`` (default: small_cfg) implies for ``n`` training examples."""
    from common.ledger import Ledger, LedgerEntry
    from common.messages import Mechanism
    from common.privacy import steps_per_round

    cfg = cfg or small_cfg()
    q, steps = steps_per_round(n, cfg.training.batch_size, cfg.training.local_epochs, cfg.training.sample_rate)
    ledger = Ledger(hospital, 1e-5)
    for r in range(1, rounds + 1):
        ledger.record(LedgerEntry(RUN_ID, r, Mechanism.DP_SGD, "weights", noise_multiplier=2.0, sample_rate=q,
                                  steps=steps, max_grad_norm=cfg.privacy.max_grad_norm, examples=n))
    request = Message(RecordDict({M.CONFIG: ConfigRecord({"x": 1})}), dst_node_id=node_id, message_type=MessageType.TRAIN)
    m = {M.NUM_EXAMPLES: n, M.UNIT_WEIGHT: 1.0, M.EPSILON: 0.5, M.DELTA: 1e-5, M.BUDGET: 1.0, M.STEPS: steps}
    m.update(metrics or {})
    content = RecordDict(
        {
            M.ARRAYS: ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()}),
            M.METRICS: MetricRecord(m),
            M.STATUS: ConfigRecord({M.HOSPITAL: hospital, M.STATE: ReplyState.TRAINED.value, M.LEDGER: ledger.to_json()}),
        }
    )
    return Message(content, reply_to=request)


def coordinator_for(cfg, replies: list[Message], tmp_path):
    """A coordinator for run RUN_ID that knows each replying node by the name its reply
    gives (as discovery would have registered it), talking to a ReplayGrid."""
    from server.coordinator import Coordinator, HospitalView
    from server.outputs import RunRecorder

    coord = Coordinator(cfg, ReplayGrid(replies), RunRecorder(tmp_path, cfg, RUN_ID), RUN_ID)
    coord.hospitals = {
        r.metadata.src_node_id: HospitalView(str(r.content[M.STATUS][M.HOSPITAL]), r.metadata.src_node_id) for r in replies
    }
    return coord


class ReplayGrid:
    """Answers every sending with prepared replies (no network): what a Grid's
    push_messages / pull_messages would give if these were the replies."""

    def __init__(self, replies: list[Message]):
        self.replies = replies

    def get_node_ids(self):
        return [r.metadata.src_node_id for r in self.replies]

    def push_messages(self, messages):
        return [r.metadata.reply_to_message_id for r in self.replies]

    def pull_messages(self, message_ids):
        return [r for r in self.replies if r.metadata.reply_to_message_id in set(message_ids)]

    def send_and_receive(self, messages, *, timeout=None):
        return list(self.replies)


# ----------------------------------------------------------------------------------------
# A real hospital on its own folder, called the way a SuperNode calls its ClientApp
# ----------------------------------------------------------------------------------------


def extract(tar, member, folder: Path) -> None:
    """``tar.extract`` with the "data" filter where this Python has it (3.10.12, 3.11.4 and
    later); the archives the tests open are PhysioNet's own, so older ones extract plainly."""
    if hasattr(tarfile, "data_filter"):
        tar.extract(member, folder, filter="data")
    else:  # pragma: no cover - Debian 12's Python 3.11.2, say
        tar.extract(member, folder)


@pytest.fixture(scope="module")
def hospital_data(tmp_path_factory, physionet_files):
    """160 stays of set A as one hospital's own export (a folder of PhysioNet files)."""
    set_a, outcomes = physionet_files
    folder = tmp_path_factory.mktemp("hospital")
    with tarfile.open(set_a) as tar:
        for m in [m for m in tar.getmembers() if m.name.endswith(".txt")][:160]:
            extract(tar, m, folder)
    return folder / "set-a", outcomes


def hospital_cfg(*extra):
    """A run config small enough for unit tests of the hospital's app."""
    from common.config import load_config

    return load_config(DEFAULT_CONFIG, ["model.architecture=per_variable", "model.gru_hidden=[2]", "model.head_hidden=0",
                                        "training.batch_size=32", "run.rounds=3", "privacy.max_epsilon=2.5", *extra])


def folder_ledger(folder: Path):
    """A hospital folder's ledger, read as the hospital reads it (its secret checks it)."""
    from client.folder import HospitalFolder
    from client.ledger_store import FileLedgerStore

    f = HospitalFolder(folder)
    return FileLedgerStore(f.ledger_file, f.secret("ledger")).read()


def make_hospital(root: Path, data: Path, outcomes: Path, max_epsilon: float = 2.5, name: str = "st-elsewhere",
                  eval_epsilon: float | None = None) -> Path:
    """``fedgru hospital init`` into ``root/name``; returns the folder."""
    from client.commands import init

    folder = root / name
    init(folder, name, str(data), str(outcomes), max_epsilon, eval_epsilon=eval_epsilon, cfg=hospital_cfg())
    return folder


def node_context(folder: Path, node_id: int = 7) -> Context:
    """A SuperNode's context for the hospital in ``folder`` (a fresh process: empty state)."""
    return Context(run_id=1, node_id=node_id, node_config={"hospital-dir": str(folder)}, state=RecordDict(), run_config={})


def hospital_message(cfg, run_id: str, server_round: int, kind=MessageType.TRAIN, evaluate: str = "", arrays=None,
                     **extra) -> Message:
    """A message from the coordinator (``extra``: more config fields, as a hostile one may send)."""
    from server.coordinator import initial_arrays

    config = ConfigRecord({M.EXPERIMENT_JSON: cfg.to_json(), M.RUN_ID: run_id, M.SERVER_ROUND: server_round,
                           M.EVALUATE: evaluate, **extra})
    return Message(RecordDict({M.ARRAYS: arrays or initial_arrays(cfg), M.CONFIG: config}), dst_node_id=7, message_type=kind)


def reply_status(reply: Message) -> dict:
    return dict(reply.content[M.STATUS])
