"""The discrete Laplace mechanism, accounted in the same Renyi-DP ledger as the Gaussian releases.

A histogram to which each patient adds 1 in one cell changes by 1 in one cell when a
patient is added or removed: L1 sensitivity 1. fedgru adds discrete Laplace noise (the
two-sided geometric: ``P(k)`` proportional to ``exp(-|k| / t)`` on the integers; Ghosh,
Roughgarden & Sundararajan, STOC 2009) to every cell: the counts stay integers, so the
low bits of a floating-point Laplace sample, which can give the count away (Mironov, CCS
2012), are never released. It is (1/t)-DP, and its Renyi DP has a closed form: moving one
patient multiplies the probability of every outcome by ``exp(1/t)`` (outcomes at or below
the count's old value) or ``exp(-1/t)`` (above), so with ``r = exp(-1/t)`` and ``p = 1 /
(1 + r)``, the mass at or below,

    eps(a) = 1/(a-1) * log( p exp((a-1)/t) + (1-p) exp(-(a-1)/t) )

for every order ``a > 1`` (the definition, Mironov, "Renyi Differential Privacy", CSF 2017,
Def. 3, summed over the two sets; the reverse direction is the same by symmetry), never
above 1/t. RDP composes by adding, so the release joins its group's RDP vector like any
Gaussian one and the group's epsilon is read from the sum as before (``common.ledger``).
tests/test_laplace.py checks the formula against the sum over the probability mass.

Why fedgru has it: the Laplace's RDP curve is flat at the high orders that decide the
conversion to (epsilon, delta) at delta 1e-5, where the Gaussian's grows with the order.
So in the room a Gaussian part of the final validation release would take, a Laplace
release carries less noise (the default's onset histogram: standard deviation 4.18 per
hospital against the Gaussian's 5.72, every other part unchanged; ``client.noise``).

Ledger convention: a Laplace entry's ``noise_multiplier`` is the noise's standard
deviation per unit of L1 sensitivity, ``sqrt(2 r) / (1 - r)``, as a Gaussian entry's is
its standard deviation per unit of L2 sensitivity: every reader of a release's noise sd
(the coordinator's readings and range checks) reads both the same way.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from .privacy import MAX_NOISE, RDP_ORDERS, InfeasibleTarget, epsilon_of_rdp


def decay(noise_multiplier: float) -> float:
    """``r = exp(-1/t)`` of the discrete Laplace whose standard deviation is
    ``noise_multiplier`` (the root in (0, 1) of ``sd^2 (1 - r)^2 = 2 r``)."""
    v = float(noise_multiplier) ** 2
    return v / (v + 1 + math.sqrt(2 * v + 1))  # (v + 1 - sqrt(2v + 1)) / v without the cancellation


def sample(noise_multiplier: float, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Discrete Laplace noise of sd ``noise_multiplier``: the difference of two geometric
    variables of success probability ``1 - r`` (integers, as floats to add to counts)."""
    p = 1.0 - decay(noise_multiplier)
    return (rng.geometric(p, shape) - rng.geometric(p, shape)).astype(np.float64)


@lru_cache(maxsize=1024)
def _rdp(noise_multiplier: float, orders: tuple[float, ...]) -> np.ndarray:
    r = decay(noise_multiplier)
    loss = -math.log(r)  # 1/t: the privacy loss of every outcome, up or down
    below = -math.log1p(r)  # log p, the mass at or below
    above = math.log(r) - math.log1p(r)  # log (1 - p)
    out = [min(float(np.logaddexp(below + (a - 1) * loss, above - (a - 1) * loss)) / (a - 1), loss) for a in orders]
    return np.asarray(out)  # the min only guards rounding: pure (1/t)-DP bounds every order


def laplace_rdp(noise_multiplier: float, steps: int = 1, orders: tuple[float, ...] = RDP_ORDERS) -> np.ndarray:
    """The Renyi DP of ``steps`` discrete Laplace releases of L1 sensitivity 1 and noise sd
    ``noise_multiplier``, at ``orders`` (fedgru's, Opacus's defaults; every order above 1)."""
    if not noise_multiplier > 0:
        raise ValueError("a Laplace release needs noise: noise_multiplier must be positive")
    if any(a <= 1 for a in orders):
        raise ValueError("the Laplace RDP formula holds for orders above 1")
    return _rdp(float(noise_multiplier), tuple(orders)) * steps


def calibrate_laplace(target_epsilon: float, delta: float, others: np.ndarray) -> float:
    """The least discrete Laplace noise (sd per unit of L1 sensitivity, to 1e-6 relative) whose one
    release, composed with ``others`` (the group's other releases, an RDP vector at
    fedgru's orders), keeps the group within ``target_epsilon`` at ``delta``.
    :class:`InfeasibleTarget` where ``others`` alone, or any noise, passes it."""

    def spent(sigma: float) -> float:
        return epsilon_of_rdp(others + laplace_rdp(sigma), delta)

    low, high = 1e-3, 1.0
    while spent(high) > target_epsilon:
        low, high = high, high * 2
        if high > MAX_NOISE:
            raise InfeasibleTarget(target_epsilon, spent(high), delta, "rdp")
    for _ in range(80):
        mid = (low + high) / 2
        low, high = (mid, high) if spent(mid) > target_epsilon else (low, mid)
        if high - low < 1e-6 * high:
            break
    return high
