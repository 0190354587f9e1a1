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
deviation, ``sqrt(2 r) / (1 - r)``, for a count of sensitivity exactly 1 (on the integers
the formula holds for that sensitivity only: the ledger refuses another), as a Gaussian
entry's is its standard deviation per unit of L2 sensitivity: every reader of a
release's noise sd (the coordinator's readings and range checks) reads both the same way.

Caveats: numpy's geometric sampler inverts in floating point, so the noise follows the
mechanism's distribution to double rounding, not exactly (an exact integer sampler is
Canonne, Kamath & Steinke, NeurIPS 2020); the epsilons are those of the idealised
mechanism. Opacus's PRV accountant has no analysis of it, so a group holding one is read
by RDP under either accountant (as with secure aggregation's Skellam shares).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from .privacy import MAX_NOISE, RDP_ORDERS, InfeasibleTarget, epsilon_of_rdp, smallest_noise


def privacy_loss(noise_multiplier: float) -> float:
    """``1/t = -log r``, the privacy loss of every outcome, of the discrete Laplace whose
    standard deviation is ``noise_multiplier``: ``sd^2 = 2 r / (1 - r)^2`` gives
    ``sinh(1/(2t)) = 1 / (sqrt(2) sd)``, stable at any noise."""
    return 2.0 * math.asinh(1.0 / (math.sqrt(2.0) * float(noise_multiplier)))


def decay(noise_multiplier: float) -> float:
    """``r = exp(-1/t)`` of the discrete Laplace whose standard deviation is ``noise_multiplier``."""
    return math.exp(-privacy_loss(noise_multiplier))


def sample(noise_multiplier: float, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Discrete Laplace noise of sd ``noise_multiplier``: the difference of two geometric
    variables of success probability ``1 - r`` (integers, as floats to add to counts).
    numpy's geometric draws by floating-point inversion, so the distribution is the
    mechanism's to double rounding, not exactly; the counts it gives are whole numbers."""
    p = -math.expm1(-privacy_loss(noise_multiplier))
    return (rng.geometric(p, shape) - rng.geometric(p, shape)).astype(np.float64)


def reach(noise_multiplier: float, chance: float) -> float:
    """The least whole ``k`` with ``P(|X| >= k) <= chance``: ``P(|X| >= k) = 2 r^k / (1 + r)``
    for ``k >= 1`` (the coordinator's range check reads the tails by it)."""
    loss = privacy_loss(noise_multiplier)
    return float(max(1, math.ceil((math.log(2.0 / chance) - math.log1p(math.exp(-loss))) / loss)))


def _log_cosh(y: float) -> float:
    """log cosh y without overflow, and without cancellation near 0 (cosh y = 1 + 2 sinh^2(y/2))."""
    y = abs(y)
    return y - math.log(2.0) + math.log1p(math.exp(-2.0 * y)) if y > 1.0 else math.log1p(2.0 * math.sinh(y / 2.0) ** 2)


@lru_cache(maxsize=1024)
def _rdp(noise_multiplier: float, orders: tuple[float, ...]) -> np.ndarray:
    # p e^((a-1)l) + (1-p) e^(-(a-1)l) with p = 1/(1+e^-l) is cosh((a-1/2) l) / cosh(l/2)
    loss = privacy_loss(noise_multiplier)
    out = [min(max((_log_cosh((a - 0.5) * loss) - _log_cosh(loss / 2.0)) / (a - 1), 0.0), loss) for a in orders]
    return np.asarray(out)  # the clamps only guard rounding: pure (1/t)-DP bounds every order, and RDP is >= 0


def laplace_rdp(noise_multiplier: float, steps: int = 1, orders: tuple[float, ...] = RDP_ORDERS) -> np.ndarray:
    """The Renyi DP of ``steps`` discrete Laplace releases of sensitivity 1 and noise sd
    ``noise_multiplier``, at ``orders`` (fedgru's, Opacus's defaults; every order above 1)."""
    if not noise_multiplier > 0:
        raise ValueError("a Laplace release needs noise: noise_multiplier must be positive")
    if any(a <= 1 for a in orders):
        raise ValueError("the Laplace RDP formula holds for orders above 1")
    return _rdp(float(noise_multiplier), tuple(orders)) * steps


def calibrate_laplace(target_epsilon: float, delta: float, others: np.ndarray) -> float:
    """The least discrete Laplace noise (its sd, sensitivity 1, to 1e-6 relative) whose one
    release, composed with ``others`` (the group's other releases, an RDP vector at
    fedgru's orders), keeps the group within ``target_epsilon`` at ``delta``.
    :class:`InfeasibleTarget` where ``others`` alone, or any noise, passes it."""

    def spent(sigma: float) -> float:
        return epsilon_of_rdp(others + laplace_rdp(sigma), delta)

    sigma = smallest_noise(spent, target_epsilon, tolerance=1e-6)
    if not math.isfinite(sigma):
        raise InfeasibleTarget(target_epsilon, spent(MAX_NOISE), delta, "rdp")
    return sigma
