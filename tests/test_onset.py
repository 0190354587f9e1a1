"""The hourly monitor's flag (common.onset): a flag raised at the first hour a stay's risk
passes that hour's threshold by the run's margin, and kept on; and the margin the
coordinator reads from the validation patients' onset histograms (server.results)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from common.bundle import monitor_levels
from common.messages import Item
from common.metrics import ScoreGrid
from common.onset import monitor_flags, onset_scores, raising_levels
from server.results import Reader
from server.validation import Evaluations
from tests.conftest import hospital_cfg

RISKS = st.floats(0.001, 0.999)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6).flatmap(lambda hours: st.tuples(
    arrays(np.float64, (5, hours), elements=RISKS), arrays(np.float64, (hours,), elements=RISKS), st.floats(-2, 2))))
def test_the_latched_flag_is_the_highest_excess_so_far_reaching_the_margin(case):
    risks, thresholds, margin = case
    logits = np.log(risks) - np.log1p(-risks)
    levels = raising_levels(thresholds, margin)
    flags = monitor_flags(risks, levels, latched=True)
    for i in range(risks.shape[0]):  # the slow reference: hour by hour, the highest excess so far
        best = -math.inf
        for h in range(risks.shape[1]):
            best = max(best, logits[i, h] - math.log(thresholds[h] / (1 - thresholds[h])))
            assert flags[i, h] == (best >= margin - 1e-9) or abs(best - margin) < 1e-9
        assert abs(onset_scores(logits, thresholds)[i] - best) < 1e-9
    assert (np.diff(flags.astype(int), axis=1) >= 0).all()  # once on, on
    plain = monitor_flags(risks, thresholds, latched=False)
    assert np.array_equal(plain, risks >= thresholds[None, :])  # without a margin: each hour alone


def test_a_bundle_without_a_margin_flags_each_hour_alone_and_with_one_keeps_the_flag():
    thresholds = np.array([0.4, 0.3, 0.2])
    assert monitor_levels({}, thresholds) == (pytest.approx(thresholds), False)
    levels, latched = monitor_levels({"onset_margin": 0.5}, thresholds)
    assert latched and np.allclose(np.log(levels / (1 - levels)), np.log(thresholds / (1 - thresholds)) + 0.5)
    assert monitor_levels({"onset_margin": 0.5}, thresholds, own=False)[1] is False  # thresholds the user set
    assert monitor_levels({"onset_margin": float("nan")}, thresholds)[1] is False


def _released(scores: np.ndarray, grid: ScoreGrid, noise: float = 0.0) -> Evaluations:
    out = Evaluations()
    out.onset = np.bincount(grid.index(scores), minlength=grid.bins).astype(np.float64)
    out.onset_n = len(scores)
    out.noise[Item.ONSET_HISTOGRAM] = noise
    return out


@pytest.mark.parametrize("rate", [0.2, 0.3, 0.45])
def test_the_margin_flags_the_monitor_rate_of_the_validation_stays(rate):
    cfg = hospital_cfg("evaluation.dp=false", f"evaluation.monitor_rate={rate}")
    grid = ScoreGrid(*cfg.evaluation.logit_range, cfg.evaluation.score_bins)
    rng = np.random.default_rng(3)
    scores = [rng.normal(-0.5, 1.2, 300), rng.normal(0.2, 1.0, 250)]  # two hospitals' validation stays
    released = {"a": _released(scores[0], grid), "b": _released(scores[1], grid)}
    margin = Reader(cfg).onset_margin(released, grid)
    flagged = float((np.concatenate(scores) >= margin).mean())
    # read within a bin of one log-odds, interpolated: a few patients either way
    assert flagged == pytest.approx(rate, abs=0.04)


def test_no_margin_is_read_from_releases_the_noise_drowns_or_from_none():
    cfg = hospital_cfg()
    grid = ScoreGrid(*cfg.evaluation.logit_range, cfg.evaluation.score_bins)
    few = {"a": _released(np.zeros(5), grid, noise=20.0)}
    assert Reader(cfg).onset_margin(few, grid) is None
    assert Reader(cfg).onset_margin({"a": Evaluations()}, grid) is None
    off = hospital_cfg("evaluation.monitor_rate=0", "evaluation.onset_share=0")
    assert Reader(off).onset_margin({"a": _released(np.zeros(500), grid)}, grid) is None
