"""The discrete Laplace mechanism (common.laplace) against slow references: its Renyi DP
against the divergence summed over the probability mass, its sampler against the mass
function, its calibration against the ledger that will account it; and what the two
sides do with it (the hospital's planned entries, the coordinator's range check)."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from scipy import special

from client.noise import calibrated_evaluation_noise
from client.policy import default_policy
from client.preflight import planned_evaluation_entries
from common import laplace
from common.config import DEFAULT_CONFIG, load_config
from common.laplace import bernoulli_exp, calibrate_laplace, decay, exact_scale, laplace_rdp, release_noise, sample
from common.ledger import Ledger, LedgerEntry, LedgerError
from common.messages import Item, Mechanism, Split
from common.privacy import RDP_ORDERS, epsilon_of_rdp, rdp_of


def log_pmf(k: np.ndarray, sd: float) -> np.ndarray:
    """log P(k) of the discrete Laplace of standard deviation ``sd``, from its definition
    (P(k) proportional to r^|k|, normalised by (1 - r) / (1 + r))."""
    r = decay(sd)
    return np.log1p(-r) - np.log1p(r) + np.abs(k) * math.log(r)


def summed_divergence(order: float, sd: float) -> float:
    """The Renyi divergence of order ``order`` between the noise on a count and on the count
    plus one, both ways, summed over the mass function far into the tails: the slow reference."""
    reach = int(80 * sd) + 80
    k = np.arange(-reach, reach + 1)
    p, q = log_pmf(k, sd), log_pmf(k - 1, sd)
    one_way = special.logsumexp(order * p + (1 - order) * q) / (order - 1)
    other_way = special.logsumexp(order * q + (1 - order) * p) / (order - 1)
    return float(max(one_way, other_way))


@pytest.mark.parametrize("sd", [0.7, 2.0, 4.18, 12.0])
def test_the_closed_form_equals_the_divergence_summed_over_the_mass(sd):
    closed = laplace_rdp(sd)
    for order, value in zip(RDP_ORDERS, closed):
        assert value == pytest.approx(summed_divergence(order, sd), rel=1e-9, abs=1e-12), order


def test_it_is_pure_dp_at_every_order_and_steps_compose_by_adding():
    for sd in (0.5, 4.18, 30.0):
        pure = -math.log(decay(sd))  # 1/t: the largest privacy loss of any outcome
        assert np.all(laplace_rdp(sd) <= pure + 1e-15) and np.all(np.diff(laplace_rdp(sd)) >= -1e-15)  # rises with the order
        assert np.allclose(laplace_rdp(sd, steps=3), 3 * laplace_rdp(sd))
    with pytest.raises(ValueError, match="needs noise"):
        laplace_rdp(0.0)


def test_the_study_sampler_draws_the_mass_function_and_whole_numbers():
    """The studies' fast sampler, 200,000 draws: the frequencies of -6..6 and of the two tails beyond match the mass
    function (a chi-square test that fails one honest sampler in 10^4), the sd matches."""
    from scipy import stats

    sd, n = 4.18, 200_000
    draws = sample(sd, (n,), np.random.default_rng(3))
    assert np.all(draws == np.round(draws)) and draws.std() == pytest.approx(sd, rel=0.01)
    k = np.arange(-6, 7)
    expected = np.exp(log_pmf(k, sd)) * n
    tail = (n - expected.sum()) / 2
    observed = np.array([np.sum(draws < -6), *[np.sum(draws == v) for v in k], np.sum(draws > 6)])
    chi2 = float(np.sum((observed - np.array([tail, *expected, tail])) ** 2 / np.array([tail, *expected, tail])))
    assert chi2 < stats.chi2.ppf(1 - 1e-4, len(observed) - 1)


def chi_square_against_the_mass(draws: np.ndarray, sd: float, reach: int) -> tuple[float, int]:
    """Pearson's statistic of the frequencies of -reach..reach and the two tails beyond
    against the mass function, and its degrees of freedom."""
    n, k = len(draws), np.arange(-reach, reach + 1)
    expected = np.exp(log_pmf(k, sd)) * n
    tail = (n - expected.sum()) / 2
    observed = np.array([np.sum(draws < -reach), *[np.sum(draws == v) for v in k], np.sum(draws > reach)])
    expected = np.array([tail, *expected, tail])
    return float(np.sum((observed - expected) ** 2 / expected)), len(observed) - 1


@pytest.mark.parametrize("sd", [0.7, 4.18, 25.0])
def test_the_release_sampler_draws_the_mass_function_exactly(sd):
    """The hospital's sampler (exact, rational arithmetic, the OS's entropy): 40,000 draws
    against the mass function of the sd its ledger records (a chi-square test failing one
    honest sampler in 10^4), whole numbers, symmetric."""
    from scipy import stats

    draws = release_noise(sd, (40_000,))
    assert np.all(draws == np.round(draws)) and draws.std() == pytest.approx(sd, rel=0.03)
    chi2, dof = chi_square_against_the_mass(draws, sd, reach=max(3, int(1.5 * sd)))
    assert chi2 < stats.chi2.ppf(1 - 1e-4, dof)


def test_the_release_sampler_is_never_less_private_than_its_ledger_entry():
    """Its scale is a fraction at or above the calibrated one (privacy loss at most the
    accounted one), and less than 1e-8 above it."""
    for sd in (0.1, 0.3, 0.7, 4.177101135253906, 25.0, 400.0):
        loss = laplace.privacy_loss(sd)
        scale = exact_scale(sd)
        assert scale >= Fraction(1 / loss) and 1 / float(scale) <= loss
        assert float(scale) * loss - 1 < 1e-8


@pytest.mark.parametrize("gamma", [Fraction(0), Fraction(3, 10), Fraction(1), Fraction(17, 7)])
def test_bernoulli_exp_comes_true_with_probability_exp_minus_gamma(gamma):
    from scipy import stats

    n = 20_000
    hits = sum(bernoulli_exp(gamma) for _ in range(n))
    p = math.exp(-float(gamma))
    if p == 1:
        assert hits == n
    else:
        assert stats.binomtest(hits, n, p).pvalue > 1e-4
    with pytest.raises(ValueError):
        bernoulli_exp(Fraction(-1, 2))


def test_the_calibration_spends_the_target_to_its_tolerance():
    others = rdp_of(1.0, 9.0, 1) + rdp_of(1.0, 7.4, 1)
    sd = calibrate_laplace(1.0, 1e-5, others)
    assert epsilon_of_rdp(others + laplace_rdp(sd), 1e-5) <= 1.0
    assert epsilon_of_rdp(others + laplace_rdp(sd * (1 - 1e-4)), 1e-5) > 1.0


def default_val_entries(*overrides: str) -> tuple[list[LedgerEntry], dict]:
    cfg = load_config(DEFAULT_CONFIG, list(overrides))
    return planned_evaluation_entries(cfg, default_policy(1.0, 1e-5, 1.0), Split.VAL), calibrated_evaluation_noise(cfg.to_json(), 1e-5)


def test_the_default_onset_histogram_is_laplace_with_less_noise_in_the_room_its_gaussian_would_take():
    """Every other part of the final validation release keeps its Gaussian noise; the
    validation patients' epsilon is still val_epsilon, read by RDP under either
    accountant (PRV has no Laplace analysis)."""
    laplace, with_laplace = default_val_entries()
    gaussian, with_gaussian = default_val_entries("evaluation.onset_noise=gaussian")
    onset = (Split.VAL, True, Item.ONSET_HISTOGRAM)
    assert [e.mechanism for e in laplace if e.item == Item.ONSET_HISTOGRAM] == [Mechanism.LAPLACE]
    assert [e.mechanism for e in gaussian if e.item == Item.ONSET_HISTOGRAM] == [Mechanism.GAUSSIAN]
    assert with_laplace[onset] < 0.75 * with_gaussian[onset]  # 4.18 against 5.72
    assert all(with_laplace[key] == with_gaussian[key] for key in with_gaussian if key != onset)
    for accountant in ("rdp", "prv"):
        ledger = Ledger("h", 1e-5, accountant)
        for entry in laplace:
            ledger.record(entry)
        assert ledger.epsilon(Split.VAL) == pytest.approx(1.0, abs=1e-4)
        assert ledger.epsilon(Split.VAL, "prv") == ledger.epsilon(Split.VAL, "rdp")
    # secure aggregation sums Skellam shares: its plan stays the Gaussian calibration's
    secure, _ = default_val_entries("privacy.aggregation=secure", "training.sample_rate=1.0")
    assert {e.mechanism for e in secure} == {Mechanism.GAUSSIAN}


@pytest.mark.parametrize("rate, sensitivity", [(0.5, 1.0), (1.0, 2.0)])
def test_a_laplace_entry_must_be_a_count_of_the_whole_split(rate, sensitivity):
    entry = LedgerEntry("r", 1, Mechanism.LAPLACE, "onset", split=Split.VAL, item=Item.ONSET_HISTOGRAM,
                        noise_multiplier=4.0, sample_rate=rate, steps=1, max_grad_norm=sensitivity, examples=10)
    with pytest.raises(LedgerError, match="sample rate 1, sensitivity 1"):
        Ledger("h", 1e-5).record(entry)


def test_the_coordinator_reads_laplace_tails_as_far_as_gaussian_ones_by_probability():
    from server.validation import REACH_CHANCE, ReplyRejected, within_reach

    sd = 4.0
    k = laplace.reach(sd, REACH_CHANCE)  # the least k an honest cell passes with at most that chance
    r = decay(sd)
    assert 2 * r ** k / (1 + r) <= REACH_CHANCE < 2 * r ** (k - 1) / (1 + r) and 30 * sd < k < 40 * sd
    cells = np.array([-(k - 1), 50.0])  # far below zero: a Laplace tail, never a Gaussian one
    within_reach(cells, 100, sd, "onset", Mechanism.LAPLACE)
    with pytest.raises(ReplyRejected):
        within_reach(cells, 100, sd, "onset", Mechanism.GAUSSIAN)
    with pytest.raises(ReplyRejected, match="can give"):
        within_reach(np.array([-(k + 1)]), 100, sd, "onset", Mechanism.LAPLACE)
    # an honest count plus discrete noise is a whole number: anything else is forged
    with pytest.raises(ReplyRejected, match="whole number"):
        within_reach(np.array([3.5, 7.0]), 100, sd, "onset", Mechanism.LAPLACE)
