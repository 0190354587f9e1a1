"""The noise of each kind of evaluation release of one run: a function of the run's config
and the hospital's delta alone (never of its data), so both sides compute it.

The hospital adds it and records it in its ledger (``client.evaluation``); the
coordinator checks that each release's ledger entry records exactly this noise at the
delta the hospital's preflight answer states (``server.validation``), so that no
hospital widens its own range check, or the pooled readings' noise, by recording more.
"""

from __future__ import annotations

import math
from functools import lru_cache

from .config import ExperimentConfig
from .laplace import calibrate_laplace
from .messages import Item, Mechanism, Split, evaluation_mechanism
from .privacy import calibrate_shares, rdp_of
from .secure_evaluation import test_items

# (split, whether of the final model, item) -> noise multiplier (per unit of the release's sensitivity)
EvaluationNoise = dict[tuple[Split, bool, Item], float]


@lru_cache(maxsize=64)
def calibrated_evaluation_noise(cfg_json: str, delta: float) -> EvaluationNoise:
    """The noise multiplier of each kind of evaluation release of one run, calibrated
    once: validation within val_epsilon (the releases during the run share 1 -
    final_share; the final model's histogram and, for binary tasks with checkpoints, its
    hourly histograms share final_share, hourly_share of it for the latter, and
    onset_share of it for the onset histogram the monitor's margin is read from); the test
    release's parts within test_epsilon (evaluation.subgroup_share and importance_share;
    the pooled histogram gets the rest). Shares are of rho (Bun & Steinke 2016), each
    multiplier per unit of its release's sensitivity (an sd).

    With ``evaluation.onset_noise: laplace`` the onset histogram is a discrete Laplace
    release instead (common.messages.evaluation_mechanism): the Gaussian parts keep the
    multipliers their shares give, and the Laplace takes the least noise that keeps the
    whole within val_epsilon (common.laplace), all read by the RDP accountant (Opacus's
    PRV accountant has no Laplace analysis)."""
    cfg = ExperimentConfig.from_json(cfg_json)
    ev = cfg.evaluation
    progress_count = len(cfg.validation_rounds())
    final = 1.0 if progress_count == 0 else ev.final_share
    hourly = ev.hourly_share if cfg.checkpoint_hours else 0.0
    onset = ev.onset_share if cfg.monitors_onset else 0.0
    laplace = onset > 0 and evaluation_mechanism(cfg, Item.ONSET_HISTOGRAM) == Mechanism.LAPLACE
    parts = [(1 - final, progress_count), (final * (1 - hourly - onset), 1), (final * hourly, 1), (final * onset, 1)]
    progress, final_histogram, hourly_histograms, onset_histogram = calibrate_shares(
        ev.val_epsilon, delta, parts, "rdp" if laplace else cfg.privacy.accountant)
    if laplace:
        gaussian = [(m, k) for m, (_, k) in zip((progress, final_histogram, hourly_histograms), parts)
                    if math.isfinite(m) and k > 0]
        others = sum((rdp_of(1.0, m, k) for m, k in gaussian), rdp_of(1.0, 1.0, 0))
        onset_histogram = calibrate_laplace(ev.val_epsilon, delta, others)
    items = test_items(cfg)
    shares = {Item.HISTOGRAM: 1 - ev.subgroup_share - ev.importance_share, Item.SUBGROUP_HISTOGRAMS: ev.subgroup_share,
              Item.IMPORTANCE: ev.importance_share}
    test = calibrate_shares(ev.test_epsilon, delta, [(shares[i], 1) for i in items], cfg.privacy.accountant)
    noise = {(Split.VAL, False, Item.HISTOGRAM): progress, (Split.VAL, True, Item.HISTOGRAM): final_histogram}
    if hourly > 0:
        noise[(Split.VAL, True, Item.HOURLY_HISTOGRAMS)] = hourly_histograms
    if onset > 0:  # made with the test release, charged to the validation patients
        noise[(Split.VAL, True, Item.ONSET_HISTOGRAM)] = onset_histogram
    noise.update({(Split.TEST, True, item): sigma for item, sigma in zip(items, test)})
    return noise
