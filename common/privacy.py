"""Privacy accounting at a hospital (the maths; the ledger builds on it).

Nearly everything a hospital releases under DP is a Gaussian mechanism, recorded as a
:class:`NoisyRelease` ``(noise_multiplier, sample_rate, steps)``: a DP-SGD round is
``steps`` subsampled Gaussian steps at rate ``sample_rate`` (Abadi et al., CCS 2016); a
noisy score histogram of the validation or test patients is one plain Gaussian release
(``sample_rate`` 1, ``steps`` 1). The monitor's onset histogram is a discrete Laplace
release (``common.laplace``) and secure aggregation's are Skellam shares
(``common.skellam``): both join the same RDP ledger. Epsilon is always computed from the *whole* history of
one group of patients by a fresh Opacus accountant, so it is the epsilon of everything
released about them so far, never of one round:

- RDP: Mironov, "Renyi Differential Privacy", CSF 2017; subsampled Gaussian analysis of
  Mironov, Talwar & Zhang, arXiv:1908.10530 (``opacus.accountants.RDPAccountant``).
- PRV: Gopi, Lee & Wutschitz, "Numerical Composition of Differential Privacy",
  NeurIPS 2021 (``opacus.accountants.PRVAccountant``).

Sigma for a target epsilon is calibrated once for the whole planned run
(``calibrate_noise``), never per round.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.accountant import IAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.utils import get_noise_multiplier

# Opacus warns when the best RDP order is its largest default one (63). For the
# settings fedgru uses, orders up to 1024 give the same epsilon to 4 decimals (checked
# when this filter was added), so the warning only alarms users.
warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
# ... and when it is the smallest (1.1), as for one evaluation release of epsilon near 1: the
# epsilon read is then an upper bound that smaller orders could tighten, so it errs on the
# safe side, and the warning (repeated in every hospital's log) asks for nothing it can do.
warnings.filterwarnings("ignore", message="Optimal order is the smallest alpha")



@lru_cache(maxsize=4096)
def _rdp_of_one_step(sample_rate: float, noise_multiplier: float, orders: tuple[float, ...]) -> np.ndarray:
    return np.asarray(rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
                                               orders=list(orders)))


class MemoRDPAccountant(RDPAccountant):
    """Opacus's RDP accountant, remembering the RDP of one step of each (sample rate,
    sigma) it has seen in this process.

    The RDP of ``steps`` steps is ``steps`` times that of one (Opacus computes exactly
    ``compute_rdp(q, sigma, 1) * steps``), so this returns Opacus's epsilon to the last
    bit, while a hospital that answers every round with the same settings computes the
    slow part (a series per fractional order) once instead of every round: simulating
    hundreds of hospitals spent most of its time here."""

    def get_privacy_spent(self, *, delta: float, alphas=None) -> tuple[float, float]:
        if not self.history:
            return 0, 0
        orders = tuple(self.DEFAULT_ALPHAS if alphas is None else alphas)
        rdp = sum([_rdp_of_one_step(q, sigma, orders) * steps for (sigma, q, steps) in self.history])
        eps, best_alpha = rdp_analysis.get_privacy_spent(orders=list(orders), rdp=rdp, delta=delta)
        return float(eps), float(best_alpha)


ACCOUNTANTS: dict[str, type[IAccountant]] = {"rdp": MemoRDPAccountant, "prv": PRVAccountant}
RDP_ORDERS: tuple[float, ...] = tuple(MemoRDPAccountant.DEFAULT_ALPHAS)


def rdp_of(sample_rate: float, noise_multiplier: float, steps: int) -> np.ndarray:
    """The Renyi DP of ``steps`` subsampled Gaussian steps at Opacus's orders. RDP composes
    by adding these vectors (Mironov 2017, Prop. 1), so a ledger can keep a running sum
    and check a budget in constant time, whatever its length."""
    return _rdp_of_one_step(sample_rate, noise_multiplier, RDP_ORDERS) * steps


def epsilon_of_rdp(rdp: np.ndarray, delta: float) -> float:
    """Epsilon at ``delta`` of a composed RDP vector (0 when nothing was released), as
    Opacus's RDP accountant reads it."""
    if not np.any(rdp > 0):
        return 0.0
    eps, _ = rdp_analysis.get_privacy_spent(orders=list(RDP_ORDERS), rdp=rdp, delta=delta)
    return float(eps)


@dataclass
class NoisyRelease:
    """A Gaussian mechanism used ``steps`` times on Poisson samples of rate ``sample_rate``
    (a DP-SGD round), or once on everyone (a noisy histogram: rate 1, one step)."""

    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    run_id: str = ""


def make_accountant(name: str) -> IAccountant:
    if name not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {name!r}; choose one of {', '.join(ACCOUNTANTS)}")
    return ACCOUNTANTS[name]()


def accountant_for(entries: list[NoisyRelease], name: str) -> IAccountant:
    """A fresh accountant whose history replays ``entries``.

    Entries with the same noise multiplier and sample rate are one Gaussian mechanism
    repeated: their steps add up into one history item (composition is additive in the
    number of steps, which is how Opacus's own accountants merge steps too). This keeps
    accounting O(distinct settings), not O(rounds).
    """
    merged: dict[tuple[float, float], int] = {}
    for e in entries:
        if e.steps > 0:
            key = (e.noise_multiplier, e.sample_rate)
            merged[key] = merged.get(key, 0) + e.steps
    acc = make_accountant(name)
    acc.history = [(sigma, q, steps) for (sigma, q), steps in merged.items()]
    return acc


# Above this epsilon (by RDP, an upper bound on PRV's) the PRV accountant is not asked: its domain
# grows with the epsilon, and the noise searches' first guess (sigma 0.001) made it allocate 7.5 GiB
# for one array, which killed every hospital of a simulation with privacy.accountant prv. No budget
# is near it, so every decision reads the same; the value returned is RDP's, still an upper bound.
PRV_EPSILON_CAP = 100.0


def epsilon(entries: list[NoisyRelease], delta: float, accountant: str = "rdp") -> float:
    """Epsilon at ``delta`` of all entries composed (0 when nothing was released)."""
    if not any(e.steps > 0 for e in entries):
        return 0.0
    if accountant == "prv":
        rdp = sum((rdp_of(e.sample_rate, e.noise_multiplier, e.steps) for e in entries if e.steps > 0),
                  np.zeros(len(RDP_ORDERS)))
        bound = epsilon_of_rdp(rdp, delta)
        if bound > PRV_EPSILON_CAP:
            return bound
    with np.errstate(divide="ignore"):  # PRV takes log(1 - q), -inf for a plain Gaussian release (q = 1)
        return float(accountant_for(entries, accountant).get_epsilon(delta=delta))


def steps_per_round(num_examples: int, batch_size: int, local_epochs: float, sample_rate: float = 0.0) -> tuple[float, int]:
    """Sample rate q (``sample_rate``, or B / n) and the Poisson steps for ``local_epochs`` passes."""
    if num_examples < 1:
        raise ValueError("a hospital needs at least one training example")
    q = sample_rate if sample_rate > 0 else min(1.0, batch_size / num_examples)
    steps = max(1, int(round(local_epochs / q)))
    return q, steps


class InfeasibleTarget(ValueError):
    """No noise level reaches the target: the accountant cannot certify an epsilon that
    small at this delta (RDP's orders end at 63), whatever the noise."""

    def __init__(self, target: float, floor: float, delta: float, accountant: str):
        super().__init__(f"epsilon {target:g} is below the least the {accountant.upper()} accountant can certify at "
                         f"delta {delta:g} with any noise ({floor:.3g})")
        self.target, self.floor, self.delta, self.accountant = target, floor, delta, accountant


MAX_NOISE = 1e6  # Opacus's own search limit


@lru_cache(maxsize=1024)
def calibrate_noise(
    target_epsilon: float, delta: float, sample_rate: float, total_steps: int, accountant: str = "rdp"
) -> float:
    """Smallest sigma (to Opacus's tolerance) that keeps the whole run within epsilon.
    Remembered per process: simulated hospitals of equal size ask the same question.
    Raises :class:`InfeasibleTarget` when no sigma does."""
    try:
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=total_steps,
                accountant=accountant,
                epsilon_tolerance=1e-4,
            )
        )
    except ValueError:
        floor = epsilon([NoisyRelease(0, MAX_NOISE, sample_rate, total_steps, 1.0)], delta, accountant)
        raise InfeasibleTarget(target_epsilon, floor, delta, accountant) from None


def smallest_noise(cost, limit: float, low: float = 1e-3, high: float = 1.0, tolerance: float = 1e-4) -> float:
    """The smallest noise multiplier whose ``cost(sigma)`` (an epsilon, falling as sigma
    grows) is at most ``limit``, by bisection to ``tolerance`` (relative); inf when even
    MAX_NOISE costs more."""
    if cost(low) <= limit:
        return low
    while cost(high) > limit:
        low, high = high, high * 2
        if high > MAX_NOISE:
            return math.inf
    while high - low > tolerance * high:
        mid = (low + high) / 2
        low, high = (mid, high) if cost(mid) > limit else (low, mid)
    return high


@dataclass
class Plan:
    """What a planned run costs one hospital (see ``fedgru plan``)."""

    sample_rate: float
    steps_per_round: int
    noise_multiplier: float
    epsilon_per_round: list[float]

    @property
    def epsilon(self) -> float:
        return self.epsilon_per_round[-1] if self.epsilon_per_round else 0.0


def plan(
    examples: int, batch_size: int, local_epochs: float, rounds: int, delta: float,
    accountant: str = "rdp", target_epsilon: float | None = None, noise_multiplier: float | None = None,
) -> Plan:
    """Sigma for a target epsilon over the whole run, or epsilon after each round for a sigma."""
    if (target_epsilon is None) == (noise_multiplier is None):
        raise ValueError("give exactly one of target_epsilon and noise_multiplier")
    q, steps = steps_per_round(examples, batch_size, local_epochs)
    sigma = noise_multiplier if noise_multiplier is not None else calibrate_noise(target_epsilon, delta, q, steps * rounds, accountant)
    entries = [NoisyRelease(r, sigma, q, steps, 1.0) for r in range(1, rounds + 1)]
    per_round = [epsilon(entries[:r], delta, accountant) for r in range(1, rounds + 1)]
    return Plan(q, steps, float(sigma), per_round)



def calibrate_shares(
    target_epsilon: float, delta: float, parts: list[tuple[float, int]], accountant: str = "rdp"
) -> list[float]:
    """Noise multipliers for several kinds of Gaussian release about one group of
    patients, together within ``target_epsilon`` (:class:`InfeasibleTarget` where no noise
    reaches it): part i, ``(share, releases)``, gets
    ``share`` of the budget in zero-concentrated DP terms (Bun & Steinke, TCC 2016: a
    Gaussian release of multiplier s costs rho = 1 / (2 s^2), and rhos add up), split
    equally among its releases. The common scale is found by bisection against the
    accountant, so the composed epsilon is the target's to 1e-6 (relative)."""
    live = [(share, k) for share, k in parts if share > 0 and k > 0]
    total = sum(share for share, _ in live)
    if not live or total <= 0:
        raise ValueError("nothing to calibrate")

    def multipliers(scale: float) -> list[float]:
        return [scale / np.sqrt(share / total / k) if share > 0 and k > 0 else float("inf") for share, k in parts]

    def spent(scale: float) -> float:
        history = [NoisyRelease(0, m, 1.0, k, 1.0) for m, (share, k) in zip(multipliers(scale), parts) if share > 0 and k > 0]
        return epsilon(history, delta, accountant)

    low, high = 1e-3, 1.0
    while spent(high) > target_epsilon:
        low, high = high, high * 2
        if high > MAX_NOISE:  # no noise gets there: the accountant cannot certify so small an epsilon
            raise InfeasibleTarget(target_epsilon, spent(high), delta, accountant)
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if spent(mid) > target_epsilon else (low, mid)
        if high - low < 1e-6 * high:
            break
    return multipliers(high)
