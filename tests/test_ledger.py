"""The privacy ledger: epsilon against an independent Opacus replay, and tamper detection."""

from __future__ import annotations

import json

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from common.ledger import Ledger, LedgerEntry, LedgerError
from common.messages import Mechanism

HISTORIES = [
    [(1.1, 0.06, 16)] * 5,
    [(4.0, 0.25, 4), (2.0, 0.1, 10), (4.0, 0.25, 4), (8.0, 1.0, 1)],
    [(0.8, 1.0, 1), (0.9, 0.5, 2)],
]


def _ledger(history, delta=1e-5):
    ledger = Ledger("h", "f" * 64, delta)
    for r, (sigma, q, steps) in enumerate(history, start=1):
        ledger.record(LedgerEntry("run-a", r, Mechanism.DP_SGD, "weights", noise_multiplier=sigma, sample_rate=q, steps=steps, max_grad_norm=1.0))
        ledger.record(LedgerEntry("run-a", r, Mechanism.NONE, "count and loss"))
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


