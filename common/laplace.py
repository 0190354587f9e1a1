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
hospital against the Gaussian's 5.72, every other part unchanged; ``common.evaluation_noise``).

Ledger convention: a Laplace entry's ``noise_multiplier`` is the noise's standard
deviation, ``sqrt(2 r) / (1 - r)``, for a count of sensitivity exactly 1 (on the integers
the formula holds for that sensitivity only: the ledger refuses another), as a Gaussian
entry's is its standard deviation per unit of L2 sensitivity: every reader of a
release's noise sd (the coordinator's readings and range checks) reads both the same way.

Sampling: a hospital's release draws with :func:`release_noise`, the exact integer sampler
of Canonne, Kamath & Steinke ("The Discrete Gaussian for Differential Privacy", NeurIPS
2020, Algorithm 2, with their Algorithm 1 for Bernoulli(exp(-gamma))), fed by the
operating system's entropy (``secrets``) and rational arithmetic only: no floating-point
step decides a count. Its scale is a fraction at or above the calibrated one
(:func:`exact_scale`), so a release is at least as private as its ledger entry says.
:func:`sample` (numpy's floating-point inversion, the distribution to double rounding) is
for studies that redraw the noise many times, never for a release. Opacus's PRV accountant
has no analysis of the mechanism, so a group holding one is read by RDP under either
accountant (as with secure aggregation's Skellam shares).
"""

from __future__ import annotations

import math
import secrets
from fractions import Fraction
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
    """Discrete Laplace noise of sd ``noise_multiplier`` for studies that redraw it many times:
    the difference of two geometric variables of success probability ``1 - r``. numpy's
    geometric draws by floating-point inversion, so the distribution is the mechanism's to
    double rounding, not exactly: a release draws with :func:`release_noise`."""
    p = -math.expm1(-privacy_loss(noise_multiplier))
    return (rng.geometric(p, shape) - rng.geometric(p, shape)).astype(np.float64)


# The exact sampler's scale is a fraction over this denominator: rounding it up adds less
# than 1e-8 of the scale wherever the scale is 0.1 or more (noise sd 0.1 and more: every
# calibration fedgru makes), and Python's integers keep the arithmetic exact at any size.
SCALE_DENOMINATOR = 2**32


def exact_scale(noise_multiplier: float) -> Fraction:
    """The scale ``t`` (``P(k)`` proportional to ``exp(-|k|/t)``) the exact sampler draws with
    for noise of sd ``noise_multiplier``: the least fraction over :data:`SCALE_DENOMINATOR`
    strictly above ``1 / privacy_loss``, so its privacy loss is at most the one the ledger
    accounts (one more than the floor: the float division may round either way)."""
    return Fraction(math.floor(SCALE_DENOMINATOR / privacy_loss(noise_multiplier)) + 1, SCALE_DENOMINATOR)


def _bernoulli(p: Fraction) -> bool:
    """True with probability exactly ``p`` (in [0, 1])."""
    return secrets.randbelow(p.denominator) < p.numerator


def bernoulli_exp(gamma: Fraction) -> bool:
    """True with probability exactly ``exp(-gamma)``, ``gamma >= 0`` rational (Canonne, Kamath
    & Steinke 2020, Algorithm 1: for gamma <= 1 the parity of the first failure of
    Bernoulli(gamma/k), k = 1, 2, ...; above 1, one exp(-1) trial per whole unit first)."""
    if gamma < 0:
        raise ValueError("bernoulli_exp needs gamma >= 0")
    while gamma > 1:
        if not bernoulli_exp(Fraction(1)):
            return False
        gamma -= 1
    k = 1
    while _bernoulli(gamma / k):
        k += 1
    return k % 2 == 1


def exact_draw(scale: Fraction) -> int:
    """One integer with ``P(k)`` proportional to ``exp(-|k| / scale)``, exactly (Canonne, Kamath
    & Steinke 2020, Algorithm 2, ``scale = t/s``): a geometric ``X`` of scale ``t`` built from a
    uniform remainder accepted with ``exp(-u/t)`` and whole units accepted with ``exp(-1)``,
    then ``floor(X/s)`` with a random sign (the doubled zero rejected)."""
    t, s = scale.numerator, scale.denominator
    while True:
        u = secrets.randbelow(t)
        if not bernoulli_exp(Fraction(u, t)):
            continue
        v = 0
        while bernoulli_exp(Fraction(1)):
            v += 1
        y = (u + t * v) // s
        negative = secrets.randbits(1) == 1
        if negative and y == 0:
            continue
        return -y if negative else y


def release_noise(noise_multiplier: float, shape: tuple[int, ...]) -> np.ndarray:
    """The noise a hospital adds to a release of sensitivity 1 (whole numbers, as floats to
    add to counts): exact discrete Laplace draws at :func:`exact_scale`, from the operating
    system's entropy, which the coordinator cannot know."""
    scale = exact_scale(noise_multiplier)
    return np.asarray([exact_draw(scale) for _ in range(math.prod(shape))], dtype=np.float64).reshape(shape)


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
