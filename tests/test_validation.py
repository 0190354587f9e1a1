"""Reply validation: bad replies are rejected with a reason and never reach the model.

These are unit tests on real Flower Message objects. A grid that replays prepared
replies stands in for the network; the end-to-end test with a real simulation and a
hospital that sends NaN lives in test_simulation_e2e.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.supercore.task_identity import TaskIdentity

from common import messages as M
from server.coordinator import initial_arrays
from server.validation import ReplyRejected, check_train_reply, expected_layout, read_ledger
from tests.conftest import RUN_ID, coordinator_for, small_cfg, train_reply


@pytest.fixture(autouse=True)
def _identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield


def _bad_variants(good: dict[str, np.ndarray]):
    key = next(iter(good))
    nan = {k: v.copy() for k, v in good.items()}
    nan[key].flat[0] = np.nan
    inf = {k: v.copy() for k, v in good.items()}
    inf[key].flat[-1] = np.inf
    shape = {k: v.copy() for k, v in good.items()}
    shape[key] = np.zeros(shape[key].shape[:-1] + (shape[key].shape[-1] + 1,), np.float32)
    missing = {k: v for k, v in good.items() if k != key}
    huge = {k: v + 1e29 for k, v in good.items()}
    return {
        "nan": (nan, {}, "NaN or infinite"),
        "inf": (inf, {}, "NaN or infinite"),
        "shape": (shape, {}, "has shape"),
        "missing": (missing, {}, "missing"),
        "huge update": (huge, {}, "L2 norm"),
        "count": (good, {M.NUM_EXAMPLES: 10**9}, "example count"),
        "zero count": (good, {M.NUM_EXAMPLES: 0}, "example count"),
        "count not in ledger": (good, {M.NUM_EXAMPLES: 101}, "its ledger says it sampled from 100"),
        "nan epsilon": (good, {M.EPSILON: float("nan")}, "finite"),
        "extra metric": (good, {"train-loss": 0.3}, "metric keys differ"),
    }


def test_each_kind_of_bad_reply_is_rejected_with_a_reason():
    cfg = small_cfg()
    arrays = initial_arrays(cfg)
    layout = expected_layout(arrays)
    good = {k: v.numpy().copy() for k, v in arrays.items()}

    def check(reply):
        return check_train_reply(reply, layout, arrays, cfg, read_ledger(reply, "h"), RUN_ID, 1)

    assert check(train_reply(1, good)) == 100  # the good one passes, weighted by its 100 examples
    for name, (weights, metrics, reason) in _bad_variants(good).items():
        with pytest.raises(ReplyRejected, match=reason):
            check(train_reply(1, weights, metrics=metrics))


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox", "fedavgm", "fedadam"])
def test_bad_replies_never_reach_the_global_model(tmp_path, strategy):
    cfg = small_cfg(f"strategy.name={strategy}", "strategy.proximal_mu=0.1")
    arrays = initial_arrays(cfg)
    good = {k: v.numpy().copy() for k, v in arrays.items()}
    rng = np.random.default_rng(0)
    replies, node = [], 10
    good_updates = []
    for _ in range(2):
        update = {k: v + rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in good.items()}
        good_updates.append(update)
        replies.append(train_reply(node, update, n=100, hospital=f"good{node}", cfg=cfg))
        node += 1
    for name, (weights, metrics, _) in _bad_variants(good).items():
        replies.append(train_reply(node, weights, metrics=metrics, hospital=f"bad-{name}", cfg=cfg))
        node += 1
    coord = coordinator_for(cfg, replies, tmp_path)
    record = coord.train_round(1)
    assert not record.skipped
    assert {d.hospital for d in record.dropped} == {f"bad-{n}" for n in _bad_variants(good)}
    assert set(record.hospitals) == {"good10", "good11"}
    result = {k: v.numpy() for k, v in coord.arrays.items()}
    assert all(np.isfinite(v).all() for v in result.values())
    if strategy in ("fedavg", "fedprox"):
        for k in good:
            np.testing.assert_allclose(result[k], (good_updates[0][k] + good_updates[1][k]) / 2, rtol=1e-5, atol=1e-6)


def test_round_is_skipped_when_too_few_valid_replies(tmp_path):
    cfg = small_cfg("strategy.min_hospitals=2")
    arrays = initial_arrays(cfg)
    good = {k: v.numpy().copy() for k, v in arrays.items()}
    bad = {k: v.copy() for k, v in good.items()}
    next(iter(bad.values())).flat[0] = np.nan
    coord = coordinator_for(cfg, [train_reply(1, good, hospital="a"), train_reply(2, bad, hospital="b")], tmp_path)
    before = {k: v.numpy().copy() for k, v in coord.arrays.items()}
    record = coord.train_round(1)
    assert record.skipped
    for k, v in coord.arrays.items():
        np.testing.assert_array_equal(v.numpy(), before[k])


def test_initial_model_is_seeded():
    cfg = small_cfg()
    a, b = initial_arrays(cfg), initial_arrays(cfg)
    assert all(torch.equal(torch.as_tensor(a[k].numpy()), torch.as_tensor(b[k].numpy())) for k in a)


def test_a_superlink_error_is_matched_to_the_hospital_it_is_about():
    """A crashed hospital's "node unavailable" error comes from the SuperLink's own id:
    the coordinator pairs it with the node its instruction went to."""
    from types import SimpleNamespace

    from server.coordinator import node_of

    sent = {"m-a": 11, "m-c": 13}
    from_hospital = SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id="m-a", src_node_id=11))
    from_superlink = SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id="m-c", src_node_id=1))
    unknown = SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id="other", src_node_id=42))
    unmarked = SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id="", src_node_id=12))
    replies = (from_hospital, from_superlink, unknown, unmarked)
    assert [node_of(r, {**sent, "": 99}) for r in replies] == [11, 13, 42, 12]


def test_server_momentum_moves_the_model_by_the_momentum_of_averaged_updates(tmp_path):
    """fedavgm: the global model moves by server_lr x (momentum x previous step + this
    round's averaged update), and the momentum survives a checkpoint."""
    from server.strategies import Aggregator

    cfg = small_cfg("strategy.name=fedavgm", "strategy.server_lr=0.5", "strategy.server_momentum=0.9")
    start = {k: v.numpy().copy() for k, v in initial_arrays(cfg).items()}
    rng = np.random.default_rng(0)
    steps = [{k: rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in start.items()} for _ in range(2)]
    coord = coordinator_for(cfg, [], tmp_path)
    expected, momentum = dict(start), None
    for server_round, step in enumerate(steps, start=1):
        current = {k: v.numpy().copy() for k, v in coord.arrays.items()}
        # two hospitals, 100 and 300 examples: their average moves by `step`
        replies = [train_reply(10, {k: current[k] + 2 * step[k] for k in current}, n=100, hospital="a", cfg=cfg),
                   train_reply(11, {k: current[k] + step[k] * 2 / 3 for k in current}, n=300, hospital="b", cfg=cfg)]
        coord.grid.replies = replies
        coord.hospitals = {10: coord._view(10), 11: coord._view(11)}
        coord.hospitals[10].name, coord.hospitals[11].name = "a", "b"
        record = coord.train_round(server_round)
        assert not record.skipped and set(record.hospitals) == {"a", "b"}
        momentum = {k: step[k] if momentum is None else 0.9 * momentum[k] + step[k] for k in step}
        expected = {k: expected[k] + 0.5 * momentum[k] for k in expected}
        for k, v in coord.arrays.items():
            np.testing.assert_allclose(v.numpy(), expected[k], rtol=1e-4, atol=1e-6)
    saved = coord.aggregator.state_dict()
    restored = Aggregator(cfg.strategy)
    restored.load_state_dict(saved)
    for mine, theirs in zip(restored.base.momentum_vector, coord.aggregator.base.momentum_vector, strict=True):
        np.testing.assert_array_equal(mine, theirs)
    assert list(restored.base.current_arrays.keys()) == list(coord.arrays.keys())


@pytest.mark.parametrize("forged", [b"", b"PK\x03\x04 not a zip", b"\x93NUMPY garbage"])
def test_weights_whose_bytes_numpy_cannot_read_are_rejected_not_raised(forged):
    """A hostile hospital's array bytes make numpy's reader raise EOFError, BadZipFile or
    ValueError; the reply is rejected with a reason and the coordinator carries on."""
    from flwr.app import Array

    cfg = small_cfg()
    arrays = initial_arrays(cfg)
    layout = expected_layout(arrays)
    reply = train_reply(1, {k: v.numpy().copy() for k, v in arrays.items()})
    key = next(iter(layout))
    good = reply.content[M.ARRAYS][key]
    reply.content[M.ARRAYS][key] = Array(dtype=good.dtype, shape=good.shape, stype=good.stype, data=forged)
    with pytest.raises(ReplyRejected, match="cannot be read as an array"):
        check_train_reply(reply, layout, arrays, cfg, read_ledger(reply, "h"), RUN_ID, 1)
