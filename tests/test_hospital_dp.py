"""Optional hospital-level DP: Flower's server-side clipping wrapper and its accountant."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.supercore.task_identity import TaskIdentity

from tests.conftest import coordinator_for, small_cfg, train_reply


@pytest.fixture(autouse=True)
def _identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield


def _coordinator(tmp_path, replies, *extra):
    cfg = small_cfg("hospital_dp.enabled=true", "hospital_dp.noise_multiplier=0.5", "hospital_dp.clipping_norm=0.1", *extra)
    return coordinator_for(cfg, replies, tmp_path)


def test_updates_are_clipped_noised_and_accounted(tmp_path):
    from server.coordinator import initial_arrays

    cfg = small_cfg()
    base = {k: v.numpy().copy() for k, v in initial_arrays(cfg).items()}
    big = {k: v + 1.0 for k, v in base.items()}  # an update far beyond the clipping norm
    replies = [train_reply(1, big, n=10, hospital="h1"), train_reply(2, big, n=1000, hospital="h2")]
    coord = _coordinator(tmp_path, replies)
    record = coord.train_round(1)
    assert not record.skipped
    delta = np.concatenate([(coord.arrays[k].numpy() - base[k]).ravel() for k in base])
    # the mean of two updates clipped to 0.1, plus noise of std 0.5 * 0.1 / 2 per coordinate
    assert np.linalg.norm(delta) < 0.1 + 4 * 0.025 * np.sqrt(delta.size)
    spent = coord.aggregator.hospital_privacy()
    assert spent.releases == 1 and spent.epsilon > 0
    coord.train_round(2)
    assert coord.aggregator.hospital_privacy().epsilon > spent.epsilon


def test_a_dropped_reply_skips_the_round_without_charging(tmp_path):
    from server.coordinator import initial_arrays

    cfg = small_cfg()
    good = {k: v.numpy().copy() + 0.01 for k, v in initial_arrays(cfg).items()}
    bad = {k: v.copy() for k, v in good.items()}
    next(iter(bad.values())).flat[0] = np.nan
    coord = _coordinator(tmp_path, [train_reply(1, good, hospital="h1"), train_reply(2, good, hospital="h2"), train_reply(3, bad, hospital="h3")])
    record = coord.train_round(1)
    assert record.skipped  # with accounting, Flower's wrapper needs every sampled hospital's update
    assert coord.aggregator.hospital_privacy().releases == 0


def test_hospital_budget_ends_the_run(tmp_path):
    from server.coordinator import initial_arrays

    cfg = small_cfg()
    good = {k: v.numpy().copy() + 0.01 for k, v in initial_arrays(cfg).items()}
    coord = _coordinator(
        tmp_path, [train_reply(1, good, hospital="h1"), train_reply(2, good, hospital="h2")],
        "hospital_dp.max_epsilon=3", "hospital_dp.noise_multiplier=2.0",
    )
    rounds = 0
    for r in range(1, 50):
        coord.train_round(r)
        if coord.hospital_dp_exhausted:
            break
        rounds += 1
    assert coord.hospital_dp_exhausted and 0 < rounds < 49
    assert coord.aggregator.hospital_privacy().epsilon <= 3


def test_an_empty_update_is_dropped_not_a_crash(tmp_path):
    from server.coordinator import initial_arrays

    cfg = small_cfg()
    same = {k: v.numpy().copy() for k, v in initial_arrays(cfg).items()}
    moved = {k: v + 0.01 for k, v in same.items()}
    coord = _coordinator(tmp_path, [train_reply(1, same, hospital="h1"), train_reply(2, moved, hospital="h2"), train_reply(3, moved, hospital="h3")],
                         "strategy.min_hospitals=2")
    record = coord.train_round(1)
    assert [d.hospital for d in record.dropped] == ["h1"] and "empty" in record.dropped[0].reason
