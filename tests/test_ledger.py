"""The privacy ledger, its file store, and the hospital's refusal to train without it.

The hospital-side tests call the real ClientApp handlers with real Flower Message and
Context objects, the way a SuperNode would, on stays cut from set A.
"""

from __future__ import annotations

import json
import tarfile

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from opacus.accountants import PRVAccountant, RDPAccountant

from client import app as client_app
from common import messages as M
from common.config import load_config
from common.ledger import DP_SGD, NO_DP, Ledger, LedgerEntry, LedgerError
from common.privacy import plan
from server.coordinator import initial_arrays
from tests.conftest import DEFAULT_CONFIG, ROOT

HISTORIES = [
    [(1.1, 0.06, 16)] * 5,
    [(4.0, 0.25, 4), (2.0, 0.1, 10), (4.0, 0.25, 4), (8.0, 1.0, 1)],
    [(0.8, 1.0, 1), (0.9, 0.5, 2)],
]


def _ledger(history, delta=1e-5):
    ledger = Ledger("h", "f" * 64, delta)
    for r, (sigma, q, steps) in enumerate(history, start=1):
        ledger.record(LedgerEntry("run-a", r, DP_SGD, "weights", noise_multiplier=sigma, sample_rate=q, steps=steps, max_grad_norm=1.0))
        ledger.record(LedgerEntry("run-a", r, NO_DP, "count and loss"))
    return ledger


@pytest.mark.parametrize("history", HISTORIES)
def test_ledger_epsilon_equals_an_opacus_replay_and_is_monotone(history):
    for name, cls in (("rdp", RDPAccountant), ("prv", PRVAccountant)):
        acc = cls()
        eps = []
        for k, (sigma, q, steps) in enumerate(history):
            for _ in range(steps):
                acc.step(noise_multiplier=sigma, sample_rate=q)
            replay = acc.get_epsilon(delta=1e-5)
            mine = _ledger(history[: k + 1]).epsilon(name)
            assert mine == pytest.approx(replay, abs=1e-9)
            eps.append(mine)
        assert all(b > a for a, b in zip(eps, eps[1:]))


def test_ledger_json_round_trip_and_tamper_detection():
    ledger = _ledger(HISTORIES[1])
    text = ledger.to_json()
    again = Ledger.from_json(text)
    assert again.entries == ledger.entries and again.epsilon() == ledger.epsilon()
    data = json.loads(text)
    data["entries"][0]["noise_multiplier"] = 100.0  # someone "improves" their epsilon
    with pytest.raises(LedgerError, match="checksum"):
        Ledger.from_json(json.dumps(data))
    with pytest.raises(LedgerError, match="not valid JSON"):
        Ledger.from_json(text[:-10])


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
@pytest.mark.parametrize("examples, batch, epochs, rounds, target", [(1000, 64, 1.0, 20, 1.0), (404, 256, 2.0, 10, 3.0), (5000, 128, 0.5, 5, 0.5)])
def test_plan_round_trips(examples, batch, epochs, rounds, target, accountant):
    forward = plan(examples, batch, epochs, rounds, 1e-5, accountant, target_epsilon=target)
    back = plan(examples, batch, epochs, rounds, 1e-5, accountant, noise_multiplier=forward.noise_multiplier)
    assert back.epsilon == pytest.approx(target, abs=1e-3)
    assert back.epsilon <= target  # never over the target
    assert all(b > a for a, b in zip(back.epsilon_per_round, back.epsilon_per_round[1:]))


# --------------------------------------------------------------------------------------
# The hospital side, with a ledger file on disk
# --------------------------------------------------------------------------------------


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
            assert _status(reply)[M.STATE] == "trained"
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
    assert last.mechanism == NO_DP and last.split == "test"


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
        eps.append(reply.content[M.METRICS][M.EPSILON] if states[-1] == "trained" else _status(reply)[M.EPSILON])
    assert "trained" in states and states[-1] == "budget-exhausted"
    first_stop = states.index("budget-exhausted")
    assert all(s == "budget-exhausted" for s in states[first_stop:])
    assert max(eps) <= 0.4
    assert Ledger.from_json(ledger_path.read_text()).epsilon() <= 0.4


def test_missing_or_corrupt_ledger_refuses_to_train(hospital_data, tmp_path):
    data, outcomes = hospital_data
    cfg = _cfg()
    missing = tmp_path / "nowhere.json"
    reply = client_app.train(_train_message(cfg, "run-c", 1), _node_context(data, outcomes, missing))
    status = _status(reply)
    assert status[M.STATE] == "refused" and "fedgru ledger init" in status[M.REASON]
    assert M.ARRAYS not in reply.content.array_records  # nothing released
    ledger_path = tmp_path / "ledger.json"
    _init_ledger(ledger_path, data, outcomes)
    client_app.train(_train_message(cfg, "run-c", 1), _node_context(data, outcomes, ledger_path))
    ledger_path.write_text(ledger_path.read_text().replace('"steps": ', '"steps": 1'))  # damage it
    reply = client_app.train(_train_message(cfg, "run-c", 2), _node_context(data, outcomes, ledger_path))
    assert _status(reply)[M.STATE] == "refused" and "checksum" in _status(reply)[M.REASON]


def test_ledger_bound_to_its_data(hospital_data, tmp_path, physionet_files):
    data, outcomes = hospital_data
    ledger_path = tmp_path / "ledger.json"
    _init_ledger(ledger_path, data, outcomes)
    other = tmp_path / "other"
    other.mkdir()
    for f in sorted(data.iterdir())[:100]:
        (other / f.name).write_bytes(f.read_bytes())
    reply = client_app.train(_train_message(_cfg(), "run-d", 1), _node_context(other, outcomes, ledger_path))
    assert _status(reply)[M.STATE] == "refused" and "belongs to other data" in _status(reply)[M.REASON]


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


def test_plan_cli_prints_sigma_and_epsilons(capsys):
    from fedgru.cli import main

    assert main(["plan", "--epsilon", "1", "--delta", "1e-5", "--rounds", "4", "--local-epochs", "1", "--batch-size", "64", "--examples", "1000", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["steps_per_round"] == 16 and len(out["epsilon_per_round"]) == 4
    assert out["epsilon_per_round"][-1] == pytest.approx(1.0, abs=1e-3)


def test_readme_mentions_the_two_commands():
    text = (ROOT / "README.md").read_text().splitlines()
    commands = [line for line in text[:25] if line.startswith("    ") and ("fedgru" in line or "pytest" in line)]
    assert len(commands) == 2
