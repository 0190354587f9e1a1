"""The privacy ledger: epsilon against an independent Opacus replay, and tamper detection."""

from __future__ import annotations

import json

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from common.ledger import Ledger, LedgerEntry, LedgerError
from common.messages import Mechanism, Split

HISTORIES = [
    [(1.1, 0.06, 16)] * 5,
    [(4.0, 0.25, 4), (2.0, 0.1, 10), (4.0, 0.25, 4), (8.0, 1.0, 1)],
    [(0.8, 1.0, 1), (0.9, 0.5, 2)],
]


KEY = b"k" * 32


def _ledger(history, delta=1e-5):
    ledger = Ledger("h", delta)
    for r, (sigma, q, steps) in enumerate(history, start=1):
        ledger.record(LedgerEntry("run-a", r, Mechanism.DP_SGD, "weights", noise_multiplier=sigma, sample_rate=q,
                                  steps=steps, max_grad_norm=1.0, examples=100))
        ledger.record(LedgerEntry("run-a", r, Mechanism.NONE, "count", examples=100))
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
            mine = _ledger(history[: k + 1]).epsilon(Split.TRAIN, name)
            assert mine == pytest.approx(replay, abs=1e-9)
            eps.append(mine)
        assert all(b > a for a, b in zip(eps, eps[1:]))


def test_groups_of_patients_compose_separately():
    """Training, validation and test patients are different people: each group's
    epsilon composes only the releases about it (a noisy histogram is a Gaussian
    release at sample rate 1)."""
    ledger = _ledger(HISTORIES[0])
    for r, sigma in ((1, 20.0), (2, 20.0), (3, 5.0)):
        ledger.record(LedgerEntry("run-a", r, Mechanism.GAUSSIAN, "histogram", split=Split.VAL, noise_multiplier=sigma,
                                  sample_rate=1.0, steps=1, max_grad_norm=1.0, examples=20))
    acc = RDPAccountant()
    for sigma in (20.0, 20.0, 5.0):
        acc.step(noise_multiplier=sigma, sample_rate=1.0)
    assert ledger.epsilon(Split.VAL) == pytest.approx(acc.get_epsilon(delta=1e-5), abs=1e-9)
    assert ledger.epsilon(Split.TRAIN) == pytest.approx(_ledger(HISTORIES[0]).epsilon(Split.TRAIN), abs=1e-12)
    assert ledger.epsilon(Split.TEST) == 0.0


def test_the_seal_detects_any_edit_and_the_coordinator_checks_every_value():
    ledger = _ledger(HISTORIES[1])
    sealed = ledger.to_json(KEY)
    again = Ledger.from_json(sealed, key=KEY)
    assert again.entries == ledger.entries and again.epsilon() == ledger.epsilon()
    data = json.loads(sealed)
    data["entries"][0]["noise_multiplier"] = 100.0  # someone "improves" their epsilon
    with pytest.raises(LedgerError, match="seal does not match"):
        Ledger.from_json(json.dumps(data), key=KEY)
    with pytest.raises(LedgerError, match="seal does not match"):  # a checksum anyone could recompute is not enough
        Ledger.from_json(ledger.to_json(b"another key"), key=KEY)
    with pytest.raises(LedgerError, match="not valid JSON"):
        Ledger.from_json(sealed[:-10], key=KEY)
    # the coordinator has no key: it checks that every value can be accounted
    assert Ledger.from_json(ledger.to_json()).epsilon() == ledger.epsilon()
    for field, bad in (("noise_multiplier", 0.0), ("noise_multiplier", "2.0"), ("sample_rate", 1.5), ("steps", 0),
                       ("noise_multiplier", float("nan")), ("mechanism", "magic")):
        data = json.loads(ledger.to_json())
        data["entries"][0][field] = bad
        with pytest.raises(LedgerError):
            Ledger.from_json(json.dumps(data).replace("NaN", "NaN"))
