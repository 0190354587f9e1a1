"""The noise of every release a hospital makes, from the run's config and its own
policy and declared counts (never from its data).

DP-SGD's noise is fitted here: a fixed ``privacy.noise_multiplier`` is taken as it is or
refused; a ``privacy.target_epsilon`` gives the largest of the noise that reaches the
target over the planned rounds, the noise that keeps one round under the policy's
per-round ceiling, the noise that keeps the whole run within what is left of the
training budget (at the preflight, with the ledger), and the policy's floor. So a
hospital with a small remaining budget, or a strict ceiling, trains with more noise
than another in the same run instead of stopping half-way; each hospital's epsilon
stays its own. The evaluation releases' noise is calibrated once per run from
``evaluation.val_epsilon`` and ``test_epsilon``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from common.config import ExperimentConfig
from common.evaluation_noise import calibrated_evaluation_noise
from common.ledger import Ledger, LedgerEntry
from common.messages import Item, Mechanism, Split
from common.privacy import (
    InfeasibleTarget,
    NoisyRelease,
    calibrate_noise,
    epsilon,
    smallest_noise,
    steps_per_round,
)

from .policy import Policy, PolicyRefusal

# A hospital whose remaining budget would need more than this many times the run's own
# noise would send updates that are mostly noise, which drag the federation's average
# down more than they add: it sits the run out instead (the report says why).
MAX_NOISE_OVER_RUN = 10.0


@dataclass(frozen=True)
class NoiseFit:
    noise_multiplier: float
    set_by: str  # "the run's setting", "the run's target epsilon", "its per-round ceiling", ...
    sample_rate: float
    steps: int


def fit_noise(cfg: ExperimentConfig, policy: Policy, declared_train: int, accountant: str,
              ledger: Ledger | None = None, budget: float = math.inf) -> NoiseFit:
    """The DP-SGD noise of one round of this run within ``policy``; with ``ledger`` and
    ``budget`` (the preflight), also within what is left of the training budget for the
    whole planned run. Raises :class:`PolicyRefusal` with the change that would fit."""
    pr, tr, rounds = cfg.privacy, cfg.training, cfg.run.rounds
    q, steps = steps_per_round(declared_train, tr.batch_size, tr.local_epochs, tr.sample_rate)
    delta, ceiling, floor = policy.delta, policy.max_epsilon_per_round, policy.min_noise_multiplier

    def one_round(sigma: float) -> float:
        return epsilon([NoisyRelease(0, sigma, q, steps, 1.0)], delta, accountant)

    def whole_run(sigma: float) -> float:
        return ledger.epsilon_with([training_entry(sigma, q, steps * rounds)])

    if ledger is not None and ledger.epsilon() >= budget - 1e-9:
        raise PolicyRefusal("privacy", f"asks to train, but the training patients' budget is spent (epsilon "
                                       f"{ledger.epsilon():.3f} of {budget:g}); only the hospital's staff can change it")
    if pr.noise_multiplier > 0:
        sigma = pr.noise_multiplier
        if sigma < floor:
            raise PolicyRefusal("privacy.noise_multiplier", f"is {sigma:.3g}; this hospital's floor is {floor:g}: "
                                                            f"use at least {floor:g}, or a target epsilon")
        if one_round(sigma) > ceiling:
            need = smallest_noise(one_round, ceiling)
            raise PolicyRefusal("privacy", f"settings would spend epsilon {one_round(sigma):.3g} in one round; this "
                                           f"hospital allows {ceiling:g} per round: use privacy.noise_multiplier >= "
                                           f"{at_least(need)}, or a target epsilon (the hospital then fits its noise)")
        if ledger is not None and whole_run(sigma) > budget:
            need = smallest_noise(whole_run, budget)
            fits = _most_rounds(ledger, sigma, q, steps, budget, rounds)
            raise PolicyRefusal("privacy", f"settings would take the training patients to epsilon "
                                           f"{whole_run(sigma):.3g} in {rounds} rounds; this hospital's budget is "
                                           f"{budget:g} ({budget_left(ledger, budget)} left): use privacy.noise_multiplier >= "
                                           f"{at_least(need)}" + (f", or at most {fits} rounds" if fits else ""))
        return NoiseFit(sigma, "the run's setting", q, steps)
    try:
        target = calibrate_noise(pr.target_epsilon, delta, q, steps * rounds, pr.accountant)
    except InfeasibleTarget as exc:
        raise PolicyRefusal("privacy.target_epsilon", f"is {pr.target_epsilon:g}: {exc}; use at least "
                                                      f"{math.ceil(exc.floor * 100) / 100:g}, a larger delta, or "
                                                      "the other accountant") from None
    candidates = [(target, "the run's target epsilon"), (floor, "its noise floor")]
    if math.isfinite(ceiling):
        candidates.append((_ceiling_noise(q, steps, delta, accountant, ceiling), "its per-round ceiling"))
    if ledger is not None:
        left = smallest_noise(whole_run, budget)
        if left > MAX_NOISE_OVER_RUN * target:
            raise PolicyRefusal("privacy.target_epsilon", f"is {pr.target_epsilon:g}, which plans noise multiplier "
                                f"{target:.3g}; this hospital's remaining training budget ({budget_left(ledger, budget)} "
                                f"of {budget:g}) would need {left:.3g}, over {MAX_NOISE_OVER_RUN:g} times as much, so its "
                                "updates would be mostly noise: use a smaller privacy.target_epsilon or fewer rounds, "
                                "or run without this hospital")
        candidates.append((left, "its remaining budget"))
    return NoiseFit(*_largest(candidates), q, steps)


def _largest(candidates: list[tuple[float, str]], tolerance: float = 2e-4) -> tuple[float, str]:
    """The largest noise of ``candidates`` and what set it. One within the searches'
    tolerance (``smallest_noise``: 1e-4 relative) of an earlier one is the same noise
    found twice: the larger number is kept, the earlier reason named. A budget left equal
    to the target had its noise credited to "its remaining budget" by a rounding tie."""
    sigma, set_by = candidates[0]
    for value, why in candidates[1:]:
        if value > sigma * (1 + tolerance):
            set_by = why
        sigma = max(sigma, value)
    return float(sigma), set_by


@lru_cache(maxsize=256)
def _ceiling_noise(q: float, steps: int, delta: float, accountant: str, ceiling: float) -> float:
    """The least noise whose one round costs at most ``ceiling`` (the same question every
    round of a run, and every hospital of one size: asked once)."""
    return smallest_noise(lambda sigma: epsilon([NoisyRelease(0, sigma, q, steps, 1.0)], delta, accountant), ceiling)


def training_entry(sigma: float, q: float, steps: int) -> LedgerEntry:
    return LedgerEntry("plan", 0, Mechanism.DP_SGD, "planned", noise_multiplier=sigma, sample_rate=q, steps=steps,
                       max_grad_norm=1.0, examples=1)


def _most_rounds(ledger: Ledger, sigma: float, q: float, steps: int, budget: float, rounds: int) -> int:
    fits = 0
    for r in range(1, rounds + 1):
        if ledger.epsilon_with([training_entry(sigma, q, steps * r)]) > budget:
            break
        fits = r
    return fits


def at_least(value: float) -> str:
    """A lower bound to print, rounded up to 3 significant digits (so what it says fits)."""
    if not math.isfinite(value) or value <= 0:
        return f"{value:g}"
    scale = 10 ** (math.floor(math.log10(value)) - 2)
    return f"{math.ceil(value / scale - 1e-9) * scale:.6g}"


def budget_left(ledger: Ledger, budget: float, split: Split = Split.TRAIN) -> str:
    return f"{max(0.0, budget - ledger.epsilon(split)):.3g}"


def evaluation_noise(cfg_json: str, delta: float) -> dict[tuple[Split, bool, Item], float]:
    """:func:`calibrated_evaluation_noise`, or a refusal naming the budget no noise reaches."""
    try:
        return calibrated_evaluation_noise(cfg_json, delta)
    except InfeasibleTarget as exc:
        cfg = ExperimentConfig.from_json(cfg_json)
        key = "val_epsilon" if exc.target == cfg.evaluation.val_epsilon else "test_epsilon"
        raise PolicyRefusal(f"evaluation.{key}", f"is {exc.target:g}: {exc}; use at least "
                                                 f"{math.ceil(exc.floor * 100) / 100:g}") from None


