"""Accounting: epsilon from a DP history equals an independent Opacus replay."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import PRVAccountant, RDPAccountant

from common.privacy import NoisyRelease, calibrate_noise, epsilon, plan, steps_per_round


def _replay(history, delta, accountant="rdp"):
    acc = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    for e in history:  # step by step, as Opacus's optimizer hook would
        for _ in range(e.steps):
            acc.step(noise_multiplier=e.noise_multiplier, sample_rate=e.sample_rate)
    return acc.get_epsilon(delta=delta)


HISTORIES = [
    [NoisyRelease(r, 1.1, 0.06, 16, 1.0) for r in range(1, 6)],
    [NoisyRelease(1, 4.0, 0.25, 4, 1.0), NoisyRelease(2, 2.0, 0.1, 10, 0.5), NoisyRelease(3, 4.0, 0.25, 4, 1.0)],
    [NoisyRelease(1, 0.8, 1.0, 1, 1.0)],
]


@pytest.mark.parametrize("history", HISTORIES)
@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_epsilon_equals_independent_replay_and_is_monotone(history, accountant):
    delta = 1e-5
    assert epsilon(history, delta, accountant) == pytest.approx(_replay(history, delta, accountant), abs=1e-9)
    eps = [epsilon(history[: k + 1], delta, accountant) for k in range(len(history))]
    assert all(b > a for a, b in zip(eps, eps[1:]))


def test_no_release_means_zero_epsilon():
    assert epsilon([], 1e-5) == 0.0


def test_calibrated_sigma_meets_the_target_for_the_whole_run():
    q, steps = steps_per_round(1000, 64, 1.0)
    assert q == 0.064 and steps == 16
    sigma = calibrate_noise(1.0, 1e-5, q, steps * 20)
    run = [NoisyRelease(r, sigma, q, steps, 1.0) for r in range(1, 21)]
    final = epsilon(run, 1e-5)
    assert 0.99 <= final <= 1.0
    # per-round calibration (the mistake this project avoids) would spend far more
    per_round_sigma = calibrate_noise(1.0, 1e-5, q, steps)
    assert epsilon([NoisyRelease(r, per_round_sigma, q, steps, 1.0) for r in range(1, 21)], 1e-5) > 3.0


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
@pytest.mark.parametrize("examples, batch, epochs, rounds, target", [(1000, 64, 1.0, 20, 1.0), (404, 256, 2.0, 10, 3.0), (5000, 128, 0.5, 5, 0.5)])
def test_plan_round_trips(examples, batch, epochs, rounds, target, accountant):
    forward = plan(examples, batch, epochs, rounds, 1e-5, accountant, target_epsilon=target)
    back = plan(examples, batch, epochs, rounds, 1e-5, accountant, noise_multiplier=forward.noise_multiplier)
    assert back.epsilon == pytest.approx(target, abs=1e-3)
    assert back.epsilon <= target  # never over the target
    assert all(b > a for a, b in zip(back.epsilon_per_round, back.epsilon_per_round[1:]))


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.floats(0.3, 30.0), st.floats(0.001, 1.0), st.integers(1, 500)), min_size=1, max_size=4),
       st.sampled_from([1e-5, 1e-6, 1e-3]))
def test_the_remembering_accountant_gives_opacus_epsilon_exactly(history, delta):
    """The per-process memo of one step's RDP changes no bit of Opacus's epsilon, also
    asked twice (the second time from the memo)."""
    from common.privacy import MemoRDPAccountant

    reference = RDPAccountant()
    reference.history = list(history)
    for _ in range(2):
        memo = MemoRDPAccountant()
        memo.history = list(history)
        assert memo.get_epsilon(delta=delta) == reference.get_epsilon(delta=delta)


def test_prv_is_not_asked_where_its_domain_would_not_fit_in_memory():
    """A simulation with privacy.accountant prv killed every hospital: the per-round
    ceiling's noise search asked PRV about sigma 0.001 first, and Opacus allocated 7.5 GiB
    for one array. Above PRV_EPSILON_CAP the RDP bound (an upper bound on PRV's) is read;
    the noise fit then takes seconds and little memory."""
    import resource

    from client.noise import fit_noise
    from client.policy import default_policy
    from common.config import DEFAULT_CONFIG, load_config
    from common.ledger import Ledger
    from common.privacy import PRV_EPSILON_CAP

    tiny = [NoisyRelease(0, 1e-3, 0.63, 2, 1.0)]
    assert epsilon(tiny, 1e-5, "prv") == epsilon(tiny, 1e-5, "rdp") > PRV_EPSILON_CAP
    usual = [NoisyRelease(0, 1.0, 0.63, 2, 1.0)]
    assert epsilon(usual, 1e-5, "prv") < epsilon(usual, 1e-5, "rdp") < PRV_EPSILON_CAP  # PRV's own, tighter
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cfg = load_config(DEFAULT_CONFIG, ["privacy.accountant=prv", "run.rounds=10"])
    fit = fit_noise(cfg, default_policy(1.0, 1e-5, 1.0), 404, "prv", Ledger("h", 1e-5, "prv"), 1.0)
    assert fit.noise_multiplier > 1 and fit.set_by == "the run's target epsilon"
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 2_000_000  # KiB: under 2 GiB more
