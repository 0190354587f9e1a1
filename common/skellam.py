"""Distributed DP with the Skellam mechanism: integer noise that adds up across hospitals.

Under secure aggregation the coordinator sees only the sum of the hospitals' vectors, so
each hospital needs to add only a share of the noise, as long as enough of the others add
theirs. Secure aggregation works on integers modulo 2**32, so the noise must be integer:
the symmetric Skellam distribution ``Sk(mu)`` (the difference of two independent Poisson
variables of mean ``mu / 2``; variance ``mu``) is, and the sum of independent Skellams is
Skellam, so K hospitals each adding ``Sk(mu_h)`` put exactly ``Sk(K mu_h)`` on the sum
(Agarwal, Kairouz & Liu, "The Skellam Mechanism for Differentially Private Federated
Learning", NeurIPS 2021).

What a hospital releases in one round (``client.secure``): a Poisson sample (rate ``q``)
of its training patients; each patient's gradient clipped to L2 norm ``C``, scaled by
``scale`` and rounded coordinate by coordinate at random (up or down, unbiased), so one
patient's integer vector has L2 norm at most ``l2 = scale C + sqrt(d)`` (each coordinate
moves by less than 1) and L1 norm at most ``l2 min(sqrt(d), l2)`` (an integer vector's
coordinates are 0 or at least 1 in size); the vectors summed; ``Sk(mu_h)`` added to every
coordinate. Removing or adding one patient changes the sum by one such vector, so these
are the mechanism's sensitivities.

Accounting (all in Renyi DP, composed by adding, converted to (epsilon, delta) as the
rest of fedgru does):

- Skellam RDP, Agarwal et al. 2021, Corollary 3.6 (integer order ``a``):
  ``eps(a) <= a l2^2 / (2 mu) + min(((2a - 1) l2^2 + 6 l1) / (4 mu^2), 3 l1 / (2 mu))``.
  The first term is the Gaussian mechanism's; the rest is what integer noise costs.
- Poisson subsampling: the general upper bound of Zhu & Wang, "Poisson Subsampled Renyi
  Differential Privacy", ICML 2019, Theorem 6, valid for any mechanism given its RDP at
  integer orders. Opacus's fractional orders take the bound at the next integer order
  (RDP grows with the order, so this is an upper bound).

A hospital counts on ``min_honest`` hospitals' noise (itself included): the epsilon it
records is of ``Sk(min_honest mu_h)``; the epsilon "alone" is of ``Sk(mu_h)``, what its
own noise gives if every other hospital colluded with the coordinator. Modular wrap-around
of the sum is post-processing (it can spoil utility, never privacy); the scale is chosen
so that it does not happen (``common.secagg``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import special

from .privacy import RDP_ORDERS, epsilon_of_rdp


@dataclass(frozen=True)
class SkellamSensitivity:
    """One patient's largest effect on the integer sum: L2 and L1 norms of its rounded
    vector, in integer units (after ``scale``)."""

    l2: float
    l1: float

    @classmethod
    def of(cls, clip_norm: float, scale: float, dim: int) -> SkellamSensitivity:
        """Clip norm ``clip_norm``, scaled by ``scale``, rounded in ``dim`` coordinates."""
        if clip_norm <= 0 or scale <= 0 or dim < 1:
            raise ValueError("the clip norm and the scale must be positive and the dimension at least 1")
        l2 = clip_norm * scale + math.sqrt(dim)
        return cls(l2=l2, l1=l2 * min(math.sqrt(dim), l2))


def skellam_rdp(order: int, mu: float, sens: SkellamSensitivity) -> float:
    """RDP at integer ``order`` of adding ``Sk(mu)`` to every coordinate (Agarwal et al.
    2021, Corollary 3.6)."""
    if order < 2 or mu <= 0:
        raise ValueError("the order must be an integer >= 2 and mu positive")
    a, l2sq, l1 = order, sens.l2 ** 2, sens.l1
    return a * l2sq / (2 * mu) + min(((2 * a - 1) * l2sq + 6 * l1) / (4 * mu ** 2), 3 * l1 / (2 * mu))


def subsampled_rdp(order: int, q: float, rdp) -> float:
    """Upper bound on the RDP at integer ``order`` of a mechanism with RDP ``rdp(a)`` run
    on a Poisson sample of rate ``q`` (Zhu & Wang 2019, Theorem 6); never above the
    mechanism's own RDP."""
    if not 0 < q <= 1:
        raise ValueError("the sample rate must be in (0, 1]")
    plain = rdp(order)
    if q == 1:
        return plain
    a = order
    log_terms = [(a - 1) * math.log1p(-q) + math.log1p((a - 1) * q),
                 math.log(special.comb(a, 2, exact=True)) + 2 * math.log(q) + (a - 2) * math.log1p(-q) + rdp(2)]
    weights = [1.0, 1.0]
    for j in range(3, a + 1):
        log_terms.append(float(special.gammaln(a + 1) - special.gammaln(j + 1) - special.gammaln(a - j + 1))
                         + j * math.log(q) + (a - j) * math.log1p(-q) + (j - 1) * rdp(j))
        weights.append(3.0)
    bound = float(special.logsumexp(log_terms, b=weights)) / (a - 1)
    return min(bound, plain)


@lru_cache(maxsize=1024)
def _rdp_vector(q: float, mu: float, l2: float, l1: float) -> np.ndarray:
    sens = SkellamSensitivity(l2, l1)
    cache: dict[int, float] = {}

    def base(order: int) -> float:
        if order not in cache:
            cache[order] = skellam_rdp(order, mu, sens)
        return cache[order]

    integer = {a: subsampled_rdp(a, q, base) for a in sorted({math.ceil(o) for o in RDP_ORDERS} | {2})}
    return np.array([integer[max(2, math.ceil(o))] for o in RDP_ORDERS])


def rdp_vector(q: float, mu: float, sens: SkellamSensitivity, steps: int) -> np.ndarray:
    """RDP of ``steps`` subsampled Skellam releases at fedgru's orders (``common.privacy``),
    to add to a ledger's running sum."""
    return _rdp_vector(float(q), float(mu), float(sens.l2), float(sens.l1)) * steps


def skellam_epsilon(q: float, mu: float, sens: SkellamSensitivity, steps: int, delta: float) -> float:
    """Epsilon at ``delta`` of ``steps`` subsampled Skellam releases."""
    return epsilon_of_rdp(rdp_vector(q, mu, sens, steps), delta) if steps else 0.0


def calibrate_mu(target_epsilon: float, delta: float, q: float, steps: int, sens: SkellamSensitivity,
                 tolerance: float = 1e-3) -> float:
    """The smallest total variance ``mu`` (to ``tolerance`` relative) whose ``steps``
    releases cost at most ``target_epsilon``; bisection on log mu (epsilon falls as mu grows)."""
    if target_epsilon <= 0 or steps < 1:
        raise ValueError("the target epsilon must be positive and there must be at least one step")
    low, high = math.log(sens.l2 ** 2 * 1e-4), math.log(sens.l2 ** 2 * 1e6)
    if skellam_epsilon(q, math.exp(high), sens, steps, delta) > target_epsilon:
        raise ValueError(f"epsilon {target_epsilon:g} cannot be reached with {steps} steps at rate {q:g}")
    while high - low > tolerance:
        mid = (low + high) / 2
        if skellam_epsilon(q, math.exp(mid), sens, steps, delta) > target_epsilon:
            low = mid
        else:
            high = mid
    return math.exp(high)


def skellam_noise(mu: float, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` draws of ``Sk(mu)`` (int64): Poisson(mu/2) - Poisson(mu/2)."""
    return rng.poisson(mu / 2, size).astype(np.int64) - rng.poisson(mu / 2, size).astype(np.int64)


def randomized_round(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each value rounded down or up at random, up with probability its fractional part
    (unbiased); every coordinate moves by less than 1, which the sensitivity counts."""
    floor = np.floor(x)
    return (floor + (rng.random(x.shape) < (x - floor))).astype(np.int64)
