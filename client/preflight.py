"""A hospital's answer to a run's whole plan (``common.preflight``).

It fits the noise it will train with over the whole planned run (``client.noise``, with
its ledger: what is left of its training budget counts), and checks that every
evaluation release the run plans (every validation, the test release with its parts)
fits the per-run counts, the resolution limits and each group's remaining budget, or
refuses the plan with the policy line it breaks and the change that would fit. It reads
its ledger and no patient value.
"""

from __future__ import annotations

import dataclasses
import math

from common.config import ExperimentConfig
from common.ledger import Ledger, LedgerEntry
from common.messages import Item, Split, evaluation_mechanism
from common.preflight import PreflightAnswer

from .hospital import Node
from .noise import NoiseFit, budget_left, evaluation_noise, fit_noise, training_entry
from .policy import Policy, PolicyRefusal
from .request import check_model_size
from .secure import NOMINAL_UNITS, SecureAsk, release_entry, required_variance, settings_of


def planned_evaluation_entries(cfg: ExperimentConfig, policy: Policy, split: Split) -> list[LedgerEntry]:
    """The DP releases of ``split`` the run plans, as ledger entries: every validation
    during the run, the final one's parts; the test release's parts."""
    noise = evaluation_noise(cfg.to_json(), policy.delta)
    planned = [(item, sigma) for (s, final, item), sigma in noise.items() if s == split and final]
    if split == Split.VAL:
        planned += [(Item.HISTOGRAM, noise[(Split.VAL, False, Item.HISTOGRAM)])] * len(cfg.validation_rounds())
    return [LedgerEntry("plan", 0, evaluation_mechanism(cfg, item), "planned", split=split, item=item,
                        noise_multiplier=s, sample_rate=1.0, steps=1, max_grad_norm=1.0, examples=1)
            for item, s in planned if math.isfinite(s)]


def evaluation_outlook(cfg: ExperimentConfig, policy: Policy, ledger: Ledger) -> dict[str, tuple[float, float]]:
    """Every evaluation release the run plans fits the policy and each group's remaining
    budget (else :class:`PolicyRefusal` with the change that would fit); returns each
    group's epsilon after them, and if a second run of the same plan followed (composed,
    not added: the second costs less than the first), so the coordinator can say before
    anything is spent that a second such run would not fit."""
    planned = cfg.planned_evaluations()
    after = {}
    for split in (Split.VAL, Split.TEST):
        policy.check_evaluation(cfg, split, planned[split.value])
        if not cfg.evaluation.dp:
            continue  # a comparison simulation's exact histograms (its policy allows them): outside DP, no budget
        entries = planned_evaluation_entries(cfg, policy, split)
        spent = ledger.epsilon_with(entries)
        if spent > policy.eval_max_epsilon:
            key = f"evaluation.{split.value}_epsilon"
            fits = _largest_evaluation_epsilon(cfg, policy, ledger, split)
            fix = f"use {key} <= {math.floor(fits * 1000) / 1000:g}" if fits > 0 else "it can take part in no run that scores them"
            raise PolicyRefusal(key, f"plans {split.value} releases that would take those patients to epsilon {spent:.3f}; "
                                     f"this hospital's budget for them is {policy.eval_max_epsilon:g} "
                                     f"({budget_left(ledger, policy.eval_max_epsilon, split)} left): {fix}")
        after[split.value] = (spent, ledger.epsilon_with(entries + entries))
    return after


def _largest_evaluation_epsilon(cfg: ExperimentConfig, policy: Policy, ledger: Ledger, split: Split) -> float:
    key = "val_epsilon" if split == Split.VAL else "test_epsilon"

    def spent(eps: float) -> float:
        trial = dataclasses.replace(cfg, evaluation=dataclasses.replace(cfg.evaluation, **{key: eps}))
        try:
            return ledger.epsilon_with(planned_evaluation_entries(trial, policy, split))
        except PolicyRefusal:  # so small no noise reaches it
            return math.inf

    high = getattr(cfg.evaluation, key)
    low = high / 1024  # the least epsilon the accountant can certify at all: found by doubling
    while low < high and math.isinf(spent(low)):
        low *= 2
    if low >= high or spent(low) > policy.eval_max_epsilon:
        return 0.0
    for _ in range(30):
        mid = (low + high) / 2
        low, high = (mid, high) if spent(mid) <= policy.eval_max_epsilon else (low, mid)
    return low


def answer_plan(cfg: ExperimentConfig, node: Node) -> PreflightAnswer:
    """Accept the run's whole plan, with the noise this hospital will train with, or
    refuse it with the policy line it breaks and the change that would fit."""
    policy, declared = node.policy, node.declared
    ledger = node.store(policy).read()
    budget = policy.training_budget(cfg, node.name)
    remaining = {"train": max(0.0, budget - ledger.epsilon(Split.TRAIN)),
                 "val": max(0.0, policy.eval_max_epsilon - ledger.epsilon(Split.VAL)),
                 "test": max(0.0, policy.eval_max_epsilon - ledger.epsilon(Split.TEST))}
    # the hospital's own budgets (a run may cap the training one lower: that is in "remaining")
    budgets = {"train": policy.max_epsilon, "val": policy.eval_max_epsilon, "test": policy.eval_max_epsilon}
    try:
        node.check_reads_as_defined(cfg)
        check_model_size(cfg, policy)
        if cfg.privacy.enabled:
            policy.check_clipping(cfg.privacy.max_grad_norm)
            if cfg.privacy.aggregation == "secure":
                fit, planned = _secure_plan(cfg, node, ledger)
            else:
                fit = fit_noise(cfg, policy, declared.train, ledger.accountant, ledger, budget)
                run = training_entry(fit.noise_multiplier, fit.sample_rate, fit.steps * cfg.run.rounds)
                planned = {"train": ledger.epsilon_with([run])}
        elif policy.allow_without_dp:
            fit, planned = NoiseFit(0.0, "without DP (a comparison simulation)", 0.0, 0), {"train": ledger.epsilon()}
        else:
            raise PolicyRefusal("privacy.enabled", "is false; this hospital trains only with differential privacy: "
                                                   "set it true")
        outlook = evaluation_outlook(cfg, policy, ledger)
        planned.update({split: after for split, (after, _) in outlook.items()})
        again = {split: twice for split, (_, twice) in outlook.items()}
    except PolicyRefusal as exc:
        return PreflightAnswer(node.name, False, str(exc), remaining=remaining, budgets=budgets)
    secure = cfg.privacy.aggregation == "secure"
    return PreflightAnswer(node.name, True, "", fit.noise_multiplier, fit.set_by, planned, remaining, budgets,
                           again=again, declared_train=declared.train if secure else 0,
                           min_honest=policy.min_honest if secure else 0,
                           max_colluding=policy.max_colluding if secure else 0, delta=policy.delta)


def _secure_plan(cfg: ExperimentConfig, node: Node, ledger: Ledger) -> tuple[NoiseFit, dict[str, float]]:
    """Secure aggregation's plan (client.secure): the noise it will need for the whole run,
    as a noise multiplier counted with ``min_honest`` hospitals, at the nominal scale (the
    coordinator's scale changes the rounding term only)."""
    ask = SecureAsk(cfg, node.policy, node.name, node.declared.train, "plan", 1)
    settings = settings_of(ask, NOMINAL_UNITS / cfg.privacy.max_grad_norm)
    run = release_entry(ask, settings, required_variance(ask, ledger, settings), cfg.run.rounds)
    alone = ledger.epsilon_with([run], alone=True)
    fit = NoiseFit(run.noise_multiplier, f"secure aggregation counting {settings.min_honest} hospitals' noise, "
                   f"its own alone epsilon {alone:.2f}", settings.sample_rate, 1)
    return fit, {"train": ledger.epsilon_with([run])}
