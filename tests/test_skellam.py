"""The Skellam accounting (common.skellam) against slow references and the Gaussian it
approaches: the bound is never below the exact Renyi divergence, the subsampling bound
never below Opacus's exact subsampled Gaussian, and the calibration spends what it says."""

from __future__ import annotations

import math

import numpy as np
import pytest
from opacus.accountants.analysis import rdp as opacus_rdp
from opacus.accountants.utils import get_noise_multiplier
from scipy import special, stats

from common.skellam import (
    SkellamSensitivity,
    calibrate_mu,
    randomized_round,
    skellam_epsilon,
    skellam_noise,
    skellam_rdp,
    subsampled_rdp,
)


def exact_skellam_divergence(order: int, mu: float, shift: int) -> float:
    """The Renyi divergence of Sk(mu) shifted by ``shift`` from Sk(mu), both ways, by
    summing the probability mass function (log domain): the slow reference."""
    k = np.arange(-int(60 * math.sqrt(mu)) - 60 - shift, int(60 * math.sqrt(mu)) + 60 + shift)
    p = stats.skellam.logpmf(k, mu / 2, mu / 2)
    q = stats.skellam.logpmf(k - shift, mu / 2, mu / 2)
    kept = np.isfinite(p) & np.isfinite(q)  # far tails underflow; their mass is below 1e-300
    p, q = p[kept], q[kept]
    one = special.logsumexp(order * q + (1 - order) * p) / (order - 1)
    other = special.logsumexp(order * p + (1 - order) * q) / (order - 1)
    return float(max(one, other))


@pytest.mark.parametrize("mu", [2.0, 10.0, 50.0, 400.0])
@pytest.mark.parametrize("shift", [1, 3])
@pytest.mark.parametrize("order", [2, 5, 10, 40])
def test_the_skellam_bound_holds_against_the_exact_divergence(mu, shift, order):
    exact = exact_skellam_divergence(order, mu, shift)
    bound = skellam_rdp(order, mu, SkellamSensitivity(l2=shift, l1=shift))
    assert exact <= bound * (1 + 1e-9)
    assert bound >= order * shift ** 2 / (2 * mu)  # never below the Gaussian's


def test_the_skellam_bound_approaches_the_gaussian_as_the_noise_grows():
    sens = SkellamSensitivity(l2=900.0, l1=6900.0)
    for sigma in (1.0, 5.0, 20.0):
        mu = (sigma * sens.l2) ** 2
        for order in (2, 16, 64):
            gaussian = order / (2 * sigma ** 2)
            assert gaussian <= skellam_rdp(order, mu, sens) <= gaussian * 1.001


@pytest.mark.parametrize("q,sigma", [(0.01, 1.0), (0.05, 0.8), (0.1, 1.0), (0.3, 2.0)])
def test_the_subsampling_bound_is_never_below_the_exact_subsampled_gaussian(q, sigma):
    for order in (2, 3, 8, 32):
        bound = subsampled_rdp(order, q, lambda a: a / (2 * sigma ** 2))
        exact = opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=[order])[0]
        assert bound >= exact * (1 - 1e-9)
    # at order 2 the general bound is exact (Zhu & Wang 2019, the j = 2 term)
    assert subsampled_rdp(2, q, lambda a: a / (2 * sigma ** 2)) == pytest.approx(
        opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=[2])[0], rel=1e-6)


def test_without_subsampling_a_large_variance_costs_what_the_gaussian_costs():
    """q = 1 (every patient every round): Skellam at variance (sigma l2)^2 spends what
    Opacus's Gaussian at sigma spends, to within 0.5%: the integer noise costs nothing."""
    sens = SkellamSensitivity.of(clip_norm=3.0, scale=300.0, dim=58)
    mu = calibrate_mu(1.0, 1e-5, 1.0, 80, sens)
    sigma = get_noise_multiplier(target_epsilon=1.0, target_delta=1e-5, sample_rate=1.0, steps=80,
                                 accountant="rdp", epsilon_tolerance=0.001)
    assert skellam_epsilon(1.0, mu, sens, 80, 1e-5) <= 1.0
    assert math.sqrt(mu) / sens.l2 == pytest.approx(sigma, rel=0.005)


def test_the_sensitivity_counts_rounding():
    sens = SkellamSensitivity.of(clip_norm=2.0, scale=100.0, dim=16)
    assert sens.l2 == 200.0 + 4.0
    assert sens.l1 == sens.l2 * 4.0
    rng = np.random.default_rng(0)
    for _ in range(200):
        x = rng.normal(size=16)
        x *= 200.0 / np.linalg.norm(x)  # a gradient clipped to 2, scaled by 100
        r = randomized_round(x, rng)
        assert np.linalg.norm(r) <= sens.l2 and np.abs(r).sum() <= sens.l1
        assert np.all(np.abs(r - x) < 1)


def test_noise_shares_add_up_to_the_whole():
    rng = np.random.default_rng(1)
    total = sum(skellam_noise(250.0, 200_000, rng) for _ in range(4))
    assert total.dtype == np.int64
    assert total.var() == pytest.approx(1000.0, rel=0.02)
    assert abs(total.mean()) < 0.3
    rounded = randomized_round(np.full(100_000, 0.3), rng)
    assert rounded.mean() == pytest.approx(0.3, abs=0.01)


# The authors' own accountant (Agarwal, Kairouz & Liu 2021): google-research/federated,
# distributed_dp/accounting_utils.py at commit 5e27a86, skellam_epsilon with rounding
# (beta 0), its RDP orders 2-128 and 256, and TensorFlow Privacy's RDP-to-epsilon
# conversion (the same formula Opacus uses). Its Skellam functions were run once outside
# this project, with TensorFlow Privacy's conversion written out (the module imports
# TensorFlow Privacy for that alone); the numbers are pinned here: (clip norm, scale, dimension, central
# integer variance mu, sample rate, steps, delta) -> its RDP at orders 2, 8 and 32, its
# epsilon over orders up to 63 (fedgru's integer orders) and over all its orders.
AUTHORS = [
    ((1.0, 2 ** 16 / 3, 1000, 1e9, 1.0, 1, 1e-5),
     (0.4786012089960118, 1.914404836339885, 7.657619345715378), 3.1154561046078006, 3.1154561046078006),
    ((1.0, 2 ** 16 / 3, 10000, 2e9, 0.01, 1000, 1e-5),
     (0.027226135866503798, 0.14300737282835604, 1.0457277191094736), 0.8872551607871242, 0.8872551607871242),
    ((3.0, 2 ** 12, 65536, 2e10, 0.05, 200, 1e-6),
     (0.0039492748408531675, 0.3528542872729079, 2.4124424649424823), 1.6824048811816579, 1.4510518660013727),
    # a coarse scale, where rounding (sqrt(d) = 64 against a scaled clip of 50) and the
    # integer terms of the bound carry much of the cost
    ((0.5, 100.0, 4096, 4e5, 0.1, 50, 1e-5),
     (0.016509122411819538, 0.6465130909138689, 1.6870199475373346), 1.6249962909844766, 1.6215578721857968),
]


@pytest.mark.parametrize("setting, rdp_2_8_32, eps_to_63, eps_all_orders", AUTHORS)
def test_the_accounting_reproduces_the_authors_own_accountant(setting, rdp_2_8_32, eps_to_63, eps_all_orders):
    clip, scale, dim, mu, q, steps, delta = setting
    sens = SkellamSensitivity.of(clip, scale, dim)
    for order, expected in zip((2, 8, 32), rdp_2_8_32):
        got = subsampled_rdp(order, q, lambda a: skellam_rdp(a, mu, sens)) * steps
        assert got == pytest.approx(expected, rel=1e-9)
    epsilon = skellam_epsilon(q, mu, sens, steps, delta)
    assert epsilon == pytest.approx(eps_to_63, rel=1e-9)
    # fedgru's orders stop at 63 (Opacus's): where a higher order is better it counts more, never less
    assert epsilon >= eps_all_orders - 1e-12


@pytest.mark.parametrize("mu", [0.5, 7.0, 60.0, 5_000.0, 2e9])
def test_the_noise_follows_the_skellam_distribution_the_accounting_assumes(mu):
    """The accountant's bound holds for exact Sk(mu); the sampler draws two of numpy's
    Poisson variates (Hörmann's PTRS from mean 10 up, the multiplication method below),
    computed in floating point. Its draws are integers, so no low-order bits of a float
    can tell the input (Mironov 2012's attack on floating-point Laplace needs those): what
    remains to check is the distribution. Against scipy's Skellam pmf: 10^6 draws in up
    to 40 bins cut at a normal's equal-mass quantiles (4 at mu 0.5, 40 from mu 5000), by a
    chi-square test (seeded, so a fixed p-value). This checks the bulk, out to about 2 sd
    (the end bins hold the rest); it says nothing on the far tails' ratios."""
    rng = np.random.default_rng(11)
    draws = skellam_noise(mu, 1_000_000, rng)
    edges = np.unique(np.round(math.sqrt(mu) * stats.norm.ppf(np.linspace(0, 1, 41)[1:-1])))  # bin k: [edges[k-1], edges[k])
    observed = np.bincount(np.searchsorted(edges, draws, side="right"), minlength=len(edges) + 1)
    expected = np.diff(np.concatenate([[0.0], stats.skellam.cdf(edges - 1, mu / 2, mu / 2), [1.0]])) * len(draws)
    assert expected.min() > 50  # every bin's count is read, the tails' too
    assert stats.chisquare(observed, expected).pvalue > 1e-3
