"""The hospital ClientApp with a ledger file on disk: it composes its epsilon across runs,
never passes its budget, refuses to train without a sound ledger, and never pays twice.

The tests call the real ClientApp handlers with real Flower Message and Context objects,
the way a SuperNode would, on stays cut from set A.
"""

from __future__ import annotations

import tarfile

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from opacus.accountants import RDPAccountant

from client import app as client_app
from common import messages as M
from common.config import load_config
from common.ledger import Ledger
from common.messages import Mechanism, ReplyState, Split
from server.coordinator import initial_arrays
from tests.conftest import DEFAULT_CONFIG


@pytest.fixture(scope="module")
def hospital_data(tmp_path_factory, physionet_files):
    set_a, outcomes = physionet_files
    folder = tmp_path_factory.mktemp("hospital")
    with tarfile.open(set_a) as tar:
        members = [m for m in tar.getmembers() if m.name.endswith(".txt")][:160]
        for m in members:
            tar.extract(m, folder, filter="data")
    return folder / "set-a", outcomes


@pytest.fixture(autouse=True)
def _identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield


def _cfg():
    return load_config(
        DEFAULT_CONFIG,
        ["model.architecture=per_variable", "model.gru_hidden=[2]", "model.head_hidden=0",
         "training.batch_size=32", "run.rounds=3", "privacy.max_epsilon=2.5"],
    )


def _train_message(cfg, run_id: str, server_round: int) -> Message:
    config = ConfigRecord({M.EXPERIMENT_JSON: cfg.to_json(), M.RUN_ID: run_id, M.SERVER_ROUND: server_round})
    return Message(RecordDict({M.ARRAYS: initial_arrays(cfg), M.CONFIG: config}), dst_node_id=7, message_type=MessageType.TRAIN)


def _node_context(data, outcomes, ledger_path) -> Context:
    node_config = {"hospital": "st-elsewhere", "data-path": str(data), "outcomes-path": str(outcomes), "ledger-path": str(ledger_path)}
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


def _init_ledger(path, data, outcomes):
    from fedgru.cli import main

    assert main(["ledger", "init", "--ledger", str(path), "--data", str(data), "--outcomes", str(outcomes), "--hospital", "st-elsewhere"]) == 0


def _status(reply: Message) -> dict:
    return dict(reply.content[M.STATUS])


def test_ledger_survives_restart_and_composes_across_runs(hospital_data, tmp_path):
    data, outcomes = hospital_data
    ledger_path = tmp_path / "ledger.json"
    _init_ledger(ledger_path, data, outcomes)
    cfg = _cfg()
    eps = []
    for run_id in ("run-1", "run-2"):
        context = _node_context(data, outcomes, ledger_path)  # a fresh process: nothing in memory
        for r in (1, 2):
            reply = client_app.train(_train_message(cfg, run_id, r), context)
            assert _status(reply)[M.STATE] == ReplyState.TRAINED
            eps.append(reply.content[M.METRICS][M.EPSILON])
    assert all(b > a for a, b in zip(eps, eps[1:]))  # the second run continues from the first
    ledger = Ledger.from_json(ledger_path.read_text())
    assert ledger.runs() == ["run-1", "run-2"]
    assert eps[-1] == pytest.approx(ledger.epsilon(), abs=1e-12)
    acc = RDPAccountant()
    for e in ledger.dp_history():
        for _ in range(e.steps):
            acc.step(noise_multiplier=e.noise_multiplier, sample_rate=e.sample_rate)
    assert acc.get_epsilon(delta=ledger.delta) == pytest.approx(eps[-1], abs=1e-9)
    # evaluation releases are recorded too, as non-DP
    cfg_msg = ConfigRecord({M.EXPERIMENT_JSON: cfg.to_json(), M.RUN_ID: "run-2", M.SERVER_ROUND: 2, M.SPLIT: "test"})
    ev = client_app.evaluate(
        Message(RecordDict({M.ARRAYS: initial_arrays(cfg), M.CONFIG: cfg_msg}), dst_node_id=7, message_type=MessageType.EVALUATE),
        _node_context(data, outcomes, ledger_path),
    )
    assert ev.content[M.METRICS][M.NUM_EXAMPLES] > 0
    last = Ledger.from_json(ledger_path.read_text()).entries[-1]
    assert last.mechanism == Mechanism.NONE and last.split == Split.TEST


def test_budget_is_never_passed(hospital_data, tmp_path):
    data, outcomes = hospital_data
    ledger_path = tmp_path / "ledger.json"
    _init_ledger(ledger_path, data, outcomes)
    cfg = load_config(DEFAULT_CONFIG, ["model.architecture=per_variable", "model.gru_hidden=[2]", "model.head_hidden=0",
                                       "training.batch_size=32", "run.rounds=10", "privacy.max_epsilon=0.4"])
    context = _node_context(data, outcomes, ledger_path)
    states, eps = [], []
    for r in range(1, 11):
        reply = client_app.train(_train_message(cfg, "run-b", r), context)
        states.append(_status(reply)[M.STATE])
        eps.append(reply.content[M.METRICS][M.EPSILON] if states[-1] == ReplyState.TRAINED else _status(reply)[M.EPSILON])
    assert ReplyState.TRAINED in states and states[-1] == ReplyState.BUDGET_EXHAUSTED
    first_stop = states.index(ReplyState.BUDGET_EXHAUSTED)
    assert all(s == ReplyState.BUDGET_EXHAUSTED for s in states[first_stop:])
    assert max(eps) <= 0.4
    assert Ledger.from_json(ledger_path.read_text()).epsilon() <= 0.4


def test_missing_or_corrupt_ledger_refuses_to_train(hospital_data, tmp_path):
    data, outcomes = hospital_data
    cfg = _cfg()
    missing = tmp_path / "nowhere.json"
    reply = client_app.train(_train_message(cfg, "run-c", 1), _node_context(data, outcomes, missing))
    status = _status(reply)
    assert status[M.STATE] == ReplyState.REFUSED and "fedgru ledger init" in status[M.REASON]
    assert M.ARRAYS not in reply.content.array_records  # nothing released
    ledger_path = tmp_path / "ledger.json"
    _init_ledger(ledger_path, data, outcomes)
    client_app.train(_train_message(cfg, "run-c", 1), _node_context(data, outcomes, ledger_path))
    ledger_path.write_text(ledger_path.read_text().replace('"steps": ', '"steps": 1'))  # damage it
    reply = client_app.train(_train_message(cfg, "run-c", 2), _node_context(data, outcomes, ledger_path))
    assert _status(reply)[M.STATE] == ReplyState.REFUSED and "checksum" in _status(reply)[M.REASON]


def test_ledger_bound_to_its_data(hospital_data, tmp_path, physionet_files):
    data, outcomes = hospital_data
    ledger_path = tmp_path / "ledger.json"
    _init_ledger(ledger_path, data, outcomes)
    other = tmp_path / "other"
    other.mkdir()
    for f in sorted(data.iterdir())[:100]:
        (other / f.name).write_bytes(f.read_bytes())
    reply = client_app.train(_train_message(_cfg(), "run-d", 1), _node_context(other, outcomes, ledger_path))
    assert _status(reply)[M.STATE] == ReplyState.REFUSED and "belongs to other data" in _status(reply)[M.REASON]


def test_a_resent_round_is_not_charged_twice(hospital_data, tmp_path):
    data, outcomes = hospital_data
    ledger_path = tmp_path / "ledger.json"
    _init_ledger(ledger_path, data, outcomes)
    cfg = _cfg()
    context = _node_context(data, outcomes, ledger_path)
    first = client_app.train(_train_message(cfg, "run-e", 1), context)
    again = client_app.train(_train_message(cfg, "run-e", 1), context)  # a resumed server asks again
    assert again.content[M.METRICS][M.EPSILON] == first.content[M.METRICS][M.EPSILON]
    assert len(Ledger.from_json(ledger_path.read_text()).dp_history()) == 1
    for k, v in first.content[M.ARRAYS].items():
        assert (again.content[M.ARRAYS][k].numpy() == v.numpy()).all()
