"""The bedside study (simulations.bedside_study) on synthetic runs whose answers are
known: the oracle's feasible rates, a fixed level's share, and the margin redrawn from
noise (none: the exact quantile; more noise: more spread)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from common.metrics import ScoreGrid
from simulations.bedside_study import (
    RunScores,
    at_level,
    feasible_rates,
    fitted,
    flags_at,
    monitor_spread,
    one_count_margins,
    oracle,
    redrawn_margins,
)


def _run(name: str, seed: int, n: int = 4000, separation: float = 1.5) -> RunScores:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.14).astype(np.int64)
    end = -2.3 + rng.normal(size=n) + separation * y
    onset = end + 0.5 + 0.3 * rng.normal(size=n)  # the highest excess runs with the end risk
    val = [onset[: n // 4] + 0.1 * rng.normal(size=n // 4) for _ in range(4)]
    return RunScores(name, val, onset, end, y, 0.12, 9.05, 0.3, ScoreGrid(-7, 3, 10))


def test_flags_and_the_oracles_band_follow_their_definitions():
    y = np.array([1, 1, 0, 0, 0, 0, 0, 0, 0, 0])
    score = np.arange(10, 0, -1, dtype=float)  # the two events score highest
    assert flags_at(score, y, 9.0) == (0.2, 1.0, 1.0)
    assert flags_at(score, y, 10.0) == (0.1, 0.5, 1.0)
    # flagging the top r: at 0.1 one event of two (sensitivity 0.5); from 0.2 both; at 0.4
    # three survivors of eight flagged (specificity 0.75), at 0.45 five stays: three too many
    found = feasible_rates(score, y, np.array([0.1, 0.2, 0.3, 0.4, 0.45]))
    assert found.tolist() == [0.2, 0.3, 0.4]


def test_the_oracle_finds_a_band_for_a_useful_model_and_none_for_a_useless_one():
    runs = [_run(f"fold{k}", seed=k) for k in range(3)]
    bands, common = oracle(runs, "end")
    assert all(b is not None and b[0] < 0.3 < b[1] for b in bands) and 0.3 in common
    useless = [_run("fold0", seed=9, separation=0.0)]
    bands, common = oracle(useless, "end")
    assert bands == [None] and common == []


def test_a_fixed_level_flags_the_share_above_it_and_its_spread_within_folds():
    runs = [_run("fold0", 1), _run("fold0-run5", 2), _run("fold1", 3)]
    s = at_level(runs, 0.12)
    cut = math.log(0.12 / 0.88)
    shares = [float((r.test_end >= cut).mean()) for r in runs]
    assert s["share"] == pytest.approx(np.mean(shares)) and s["sd"] == pytest.approx(np.std(shares, ddof=1))
    assert (s["low"], s["high"]) == (min(shares), max(shares))
    assert s["within_fold_sd"] == pytest.approx(np.std(shares[:2], ddof=1))  # fold1 alone has no spread


def test_a_level_is_read_on_the_validation_stays_when_asked_not_on_the_test_stays():
    # A default level is chosen on validation stays and judged on test stays: the split
    # must really change which stays are scored.
    runs = [_run("fold0", 1), _run("fold1", 2)]
    for k, run in enumerate(runs):
        rng = np.random.default_rng(10 + k)
        run.y_val = (rng.random(800) < 0.14).astype(np.int64)
        run.val_end = np.where(run.y_val == 1, 0.0, -5.0)  # every death above 0.12, every survivor below
    val = at_level(runs, 0.12, "val")
    assert (val["share"], val["least_sensitivity"], val["least_specificity"]) == pytest.approx(
        (np.mean([r.y_val.mean() for r in runs]), 1.0, 1.0))
    test = at_level(runs, 0.12)
    assert test["least_specificity"] < 1.0 and test["share"] != pytest.approx(val["share"])


def test_a_margin_redrawn_without_noise_is_the_exact_quantile_and_noise_spreads_the_monitor():
    run = _run("fold0", 4)
    exact = float(np.quantile(np.concatenate(run.val_onset), 0.7))
    quiet = redrawn_margins(run, None, fitted, 5, np.random.default_rng(0), noise_sd=1e-9)
    assert all(m == pytest.approx(quiet[0]) for m in quiet) and abs(quiet[0] - exact) < 0.15  # the fit's own bias
    rng = np.random.default_rng(1)
    noisy = redrawn_margins(run, None, fitted, 50, rng)
    assert monitor_spread([run], [noisy])["sd"] > monitor_spread([run], [quiet])["sd"]
    share = monitor_spread([run], [[exact]])["share"]
    assert share == pytest.approx(float((run.test_onset >= exact).mean()))


def test_the_one_count_benchmark_moves_the_validation_share_by_the_counts_noise():
    """The benchmark's margin flags monitor_rate of the validation stays plus the count's
    noise over their number: without noise the exact quantile, with noise sigma per
    hospital a share spread of sigma * sqrt(hospitals) / stays."""
    run = _run("fold0", 4)
    pooled = np.concatenate(run.val_onset)
    run.one_count_noise = 0.0
    exact = one_count_margins(run, 3, np.random.default_rng(0))
    assert exact == [pytest.approx(float(np.quantile(pooled, 0.7)))] * 3
    run.one_count_noise = 40.0
    margins = one_count_margins(run, 400, np.random.default_rng(1))
    shares = np.array([(pooled >= m).mean() for m in margins])
    assert shares.mean() == pytest.approx(0.3, abs=0.01)
    assert shares.std() == pytest.approx(40.0 * 2 / len(pooled), rel=0.15)


def test_a_laplace_histogram_spreads_the_margin_as_its_epsilon_says():
    """Laplace noise of scale 1/epsilon per bin: a huge epsilon reads the exact histogram's
    margin, a small one spreads it more than a larger one."""
    run = _run("fold0", 5)
    exact = fitted(sum(np.bincount(run.grid.index(v), minlength=run.grid.bins).astype(float) for v in run.val_onset),
                   sum(len(v) for v in run.val_onset), run.grid, run.monitor_rate)
    near = redrawn_margins(run, None, fitted, 5, np.random.default_rng(0), laplace_epsilon=1e6)
    assert near == [pytest.approx(exact, abs=1e-3)] * 5
    spread = {eps: np.std(redrawn_margins(run, None, fitted, 200, np.random.default_rng(1), laplace_epsilon=eps))
              for eps in (0.05, 1.0)}
    assert spread[0.05] > 2 * spread[1.0] > 0


def test_a_run_that_released_discrete_laplace_noise_is_redrawn_with_it():
    """The run's own mechanism (its ledger's onset entry): near-zero discrete Laplace noise
    reads the exact margin, and at one sd the margins spread about as Gaussian ones do."""
    run = _run("fold0", 6)
    exact = redrawn_margins(run, None, fitted, 3, np.random.default_rng(0), noise_sd=1e-9)
    run.onset_laplace, run.onset_noise = True, 1e-9
    assert redrawn_margins(run, None, fitted, 3, np.random.default_rng(0)) == pytest.approx(exact, abs=1e-9)
    run.onset_noise = 6.0
    laplace = np.std(redrawn_margins(run, None, fitted, 300, np.random.default_rng(2)))
    gaussian = np.std(redrawn_margins(run, None, fitted, 300, np.random.default_rng(2), noise_sd=6.0))
    assert 0.6 < laplace / gaussian < 1.5
