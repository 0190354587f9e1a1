"""The evaluation releases' Gaussian noise: snapped to a grid, so no low bits of the sample
leave the hospital, and otherwise the Gaussian mechanism the ledger accounts."""

import math

import numpy as np
import pytest
from scipy import stats

from common.gaussian_noise import GRID_PER_SD, gaussian_release, snap_step


@pytest.mark.parametrize("sd", [0.37, 4.18, 18.1, 91.0])
def test_every_released_value_is_a_multiple_of_a_power_of_two_step_whatever_the_count(sd):
    """A neighbouring count shifts the noise's centre, not the grid: both counts' releases
    lie on the same multiples of one step, a power of two at most sd/256. The plain
    floating-point sum does not: its low bits below the step vary with the draw."""
    step = snap_step(sd)
    assert step <= sd / GRID_PER_SD < 2 * step and math.log2(step).is_integer()
    rng = np.random.default_rng(0)
    for count in (3.0, 4.0, 117.0):
        released = gaussian_release(np.full(20_000, count), sd, rng)
        assert np.array_equal(released / step, np.round(released / step))
        plain = count + rng.normal(0.0, sd, 20_000)
        assert not np.array_equal(plain / step, np.round(plain / step))


def test_the_snapped_release_is_the_gaussian_mechanism_to_a_thousandth_of_its_sd():
    """Against scipy's normal: the released noise passes a Kolmogorov-Smirnov test at its
    sd, and its mean and sd are the mechanism's (the snap adds at most step/2 to any value)."""
    sd, count = 18.1, 40.0
    noise = gaussian_release(np.full(200_000, count), sd, np.random.default_rng(1)) - count
    assert stats.kstest(noise / sd, "norm").pvalue > 0.01
    assert abs(noise.mean()) < 4 * sd / math.sqrt(len(noise)) and noise.std() == pytest.approx(sd, rel=0.01)
    values = np.random.default_rng(2).normal(0.0, sd, 1000) + count
    from common.gaussian_noise import snapped

    assert np.abs(snapped(values, sd) - values).max() <= snap_step(sd) / 2


@pytest.mark.parametrize("sd", [0.0, -1.0, float("nan"), float("inf")])
def test_a_release_without_a_positive_finite_sd_is_refused(sd):
    with pytest.raises(ValueError, match="positive, finite noise sd"):
        gaussian_release(np.zeros(3), sd, np.random.default_rng(0))


def test_a_noise_too_small_to_snap_its_values_is_refused_rather_than_released_unsnapped():
    """A grid finer than the doubles near the largest number a release may hold would leave
    low bits as they are, and one that underflows has no steps at all: both refused (no
    realistic release comes near: the default's sds are 4 to 100), whatever the values, so
    the refusal never depends on the patients."""
    with pytest.raises(ValueError, match="too small to snap"):
        snap_step(5e-324)
    for values in (np.array([1000.0]), np.array([0.0])):
        with pytest.raises(ValueError, match="too small to snap"):
            gaussian_release(values, 1e-12, np.random.default_rng(0))
    assert snap_step(1e-3) == 2.0**-18
