"""The hourly monitor's flag: raised at the first hour a stay's risk passes that hour's
threshold by the run's margin, and kept on.

Each hour has its own threshold (``server.results``: the risk that flags the run's flag
rate of the validation patients after that hour), so a risk means the same at hour 6 as at
hour 48. Flagging every hour by its own threshold alone churns: different stays cross at
different hours, and about 0.6 of stays were flagged at some hour of 48 where 0.2 were at
any one hour (README "Flags at the bedside"). A stay's *excess* at hour h is how far its
risk is above that hour's threshold, in log-odds; its *onset score* up to hour h is the
highest excess so far. The monitor flags a stay from the first hour its onset score
reaches the margin, and the flag stays on, so the share of stays flagged only grows with
the hours and at the window's end is the share ever flagged. The margin is read from a DP
histogram of the validation patients' onset scores over the whole window, so that the
configured share of them is flagged (``evaluation.monitor_rate``): released with the test
release, once the hour thresholds are known (``client.evaluation``).
"""

from __future__ import annotations

import numpy as np

from .metrics import logit


def excess(hourly_logits: np.ndarray, hour_thresholds: np.ndarray) -> np.ndarray:
    """Each stay's logit after each hour minus that hour's threshold in logit (stays x hours)."""
    return np.asarray(hourly_logits, dtype=np.float64) - logit(hour_thresholds)[None, :]


def onset_scores(hourly_logits: np.ndarray, hour_thresholds: np.ndarray) -> np.ndarray:
    """Each stay's highest excess over the whole window (what the onset histogram counts)."""
    found = excess(hourly_logits, hour_thresholds)
    return found.max(axis=1) if found.shape[1] else np.full(len(found), -np.inf)


def raising_levels(hour_thresholds: np.ndarray, margin: float) -> np.ndarray:
    """The risk after each hour at which the monitor raises a stay's flag: that hour's
    threshold moved up by ``margin`` in log-odds."""
    return 1 / (1 + np.exp(-(logit(hour_thresholds) + margin)))


def monitor_flags(risks: np.ndarray, levels: np.ndarray, latched: bool) -> np.ndarray:
    """Whether the monitor shows each stay flagged after each hour (stays x hours): its risk
    has reached that hour's level, and with ``latched`` any earlier hour's (the flag stays
    on). A highest excess over the thresholds of at least the margin is the same test."""
    flags = np.asarray(risks) >= np.asarray(levels)[None, :]
    return np.logical_or.accumulate(flags, axis=1) if latched else flags
