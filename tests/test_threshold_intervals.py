"""The monitor's thresholds carry intervals: each checkpoint hour's and the margin, both
quantiles read from noisy one-row releases (server.threshold_intervals). Checked against a
slow reference: fresh synthetic releases of known patients, whose exact quantile each
interval must hold about as often as it says."""

import math

import numpy as np
import pytest

from common.messages import Item, Mechanism, Split
from common.metrics import ScoreGrid, ScoreSummary, pooled, threshold_for_rate
from server.threshold_intervals import RateDraws, ReleaseNoise, quantile_interval, rate_draws
from tests.conftest import small_cfg

GRID = ScoreGrid(-7.0, 3.0, 10)  # the default's validation grid (evaluation.logit_range, score_bins)


def _logit(risk: float) -> float:
    return math.log(risk) - math.log1p(-risk)


def _row(logits: np.ndarray, noise: ReleaseNoise, rng: np.random.Generator) -> ScoreSummary:
    counts = np.bincount(GRID.index(logits), minlength=GRID.bins).astype(np.float64)
    return ScoreSummary((counts + noise.draw(counts.shape, rng))[None, None, :], None, len(logits), GRID)


def _read(row: ScoreSummary, noise: ReleaseNoise, rate: float) -> float:
    from common.estimates import for_metrics

    return _logit(threshold_for_rate(for_metrics(row, "skewnormal", True, noise.sd), rate))


@pytest.mark.parametrize("noise", [ReleaseNoise(gaussian_sd=30.0), ReleaseNoise(laplace_sds=(8.0,) * 4)],
                         ids=["gaussian hourly", "laplace onset"])
def test_a_quantiles_interval_holds_its_patients_exact_quantile(noise):
    """The default's hourly releases (about 30 per cell, 400 validation stays) and the
    onset histogram's discrete Laplace (four hospitals): over fresh releases of skewed
    scores the fit can take, the interval holds the patients' exact quantile about as
    often as its nominal 99% says, and is no wider than it needs (not all of the grid).
    This checks the redraw (the noise, each mechanism, the reading); a shape the fit cannot
    take is what the coverage measured on real models (THRESHOLD_INTERVAL_COVERAGE) covers:
    survivors and 14% deaths pooled, each its own shape, held 14 of these 16 (Gaussian)."""
    from scipy.stats import skewnorm

    rng = np.random.default_rng(11)
    held, widths = 0, []
    releases = 16
    for _ in range(releases):
        # skewed towards high risks, as the default models' validation scores are (their fits' shape 1-4)
        logits = skewnorm.rvs(2.5, loc=-3.0, scale=1.6, size=400, random_state=rng)
        row = _row(logits, noise, rng)
        estimate = _read(row, noise, 0.3)
        found = quantile_interval(row, noise, estimate, RateDraws.fixed(0.3, 1), 0.99, 100, rng, "skewnormal")
        low, high = found.low, found.high
        assert low <= estimate <= high
        held += low <= float(np.quantile(logits, 0.7)) <= high
        widths.append(high - low)
    # rough, as the metrics' intervals are without their truths' widening (common.intervals.TRUTH_STEPS): 13
    # (Gaussian) and 16 (Laplace) of 16 here; on a finer grid (40 bins), drawing each release's truth from a refit
    # of its fit to fresh noise held 22 of 24 at 2.5 times the width, so it was not taken
    assert held >= releases - 3
    # no wider than it needs: most span well under the grid's 10 log-odds (median 1.5 and 0.9 here; a release the
    # noise threw far reads far, and says so), so an interval of a fixed width that held everything would fail
    assert np.median(widths) < 2.5


def test_the_share_a_clinical_level_aims_at_is_redrawn_into_the_hours_intervals():
    """Under a clinical level each hour aims at the share the level flags, itself read from
    the pooled validation release (55 deaths, about 18 per cell of noise: the default's):
    its reading's error is in the hours' intervals, which are wider for it."""
    rng = np.random.default_rng(4)
    y = (rng.random(400) < 0.14).astype(np.int64)
    z = -2.3 + rng.normal(size=400) + 1.5 * y
    p = 1 / (1 + np.exp(-z))
    val = ScoreSummary.from_predictions(y, np.stack([1 - p, p], axis=1), GRID).noised(18.0, rng)
    rates = rate_draws(val, ReleaseNoise(18.0), 0.17, 40, rng, "skewnormal")
    assert np.isfinite(rates.read).all() and np.isfinite(rates.exact).all()
    assert 0.1 < float(np.mean(rates.exact)) < 0.5 and float(np.std(rates.read - rates.exact)) > 0.01
    row = _row(z, ReleaseNoise(30.0), rng)
    estimate = _read(row, ReleaseNoise(30.0), float(np.mean(rates.read)))
    drawn = quantile_interval(row, ReleaseNoise(30.0), estimate, rates, 0.99, 100, rng, "skewnormal")
    fixed = quantile_interval(row, ReleaseNoise(30.0), estimate, RateDraws.fixed(float(np.mean(rates.read)), 1), 0.99,
                              100, rng, "skewnormal")
    assert drawn.high - drawn.low > fixed.high - fixed.low


def test_a_row_no_fit_takes_is_drawn_from_its_clipped_counts():
    """The deaths' row of a small validation release is often noise past any fit: its
    patients are then drawn from its counts clipped at zero, as the reading takes them,
    within each bin, as many as it is given."""
    from common.estimates import grid_edges
    from server.threshold_intervals import BinnedRow, _generator

    counts = np.zeros(GRID.bins)
    counts[[2, 6]] = [30.0, 10.0]
    noisy = counts.copy()
    noisy[8] = -12.0  # a cell the noise took below zero
    edges = grid_edges(GRID)
    row = BinnedRow(np.maximum(noisy, 0.0), edges, 400.0)
    drawn = row.sample(np.random.default_rng(0))
    assert len(drawn) == 400
    assert set(np.unique(GRID.index(drawn))) == {2, 6}
    assert float((GRID.index(drawn) == 2).mean()) == pytest.approx(0.75, abs=0.06)
    assert isinstance(_generator(np.full(GRID.bins, -1.0), edges, "skewnormal"), BinnedRow)


def _validated(rng: np.random.Generator, hours: list[int], hourly_noise: float, val_noise: float):
    """Two hospitals' final validation releases (the hour-48 histogram and the hourly
    ones) and their exact logits: (releases, hour-48 logits, hourly logits)."""
    from server.validation import Evaluations

    out, ends, early = {}, [], []
    for name, n in (("a", 250), ("b", 200)):
        y = (rng.random(n) < 0.14).astype(np.int64)
        end = -2.3 + rng.normal(size=n) + 1.3 * y
        hourly = np.stack([end + 1.0 * (1 - h / 48) + 0.3 * rng.normal(size=n) for h in hours], axis=1)
        p = 1 / (1 + np.exp(-end))
        val = ScoreSummary.from_predictions(y, np.stack([1 - p, p], axis=1), GRID).noised(val_noise, rng)
        counts = np.stack([np.bincount(GRID.index(hourly[:, k]), minlength=GRID.bins) for k in range(len(hours))])
        out[name] = Evaluations(summaries={Split.VAL: val}, histogram_noise={Split.VAL: val_noise},
                                hourly=counts + rng.normal(0.0, hourly_noise * math.sqrt(len(hours)), counts.shape),
                                noise={Item.HOURLY_HISTOGRAMS: hourly_noise})
        ends.append(end)
        early.append(hourly)
    return out, np.concatenate(ends), np.concatenate(early)


def test_the_runs_hour_thresholds_carry_intervals_that_hold_the_exact_ones():
    """What a run prints: each checkpoint threshold with an interval, under the default
    clinical level; over fresh releases they hold the threshold these validation stays'
    exact risks give (the share the level flags of their exact hour-48 risks, at each
    hour); exact releases (a comparison simulation) get none."""
    from server.results import Reader, pooled_noise, risk_interval

    cfg = small_cfg("evaluation.threshold=0.17", "evaluation.hourly_checkpoints=[1,12]")
    hours = cfg.checkpoint_hours
    rng = np.random.default_rng(8)
    held = total = 0
    for seed in range(5):
        reader = Reader(small_cfg("evaluation.threshold=0.17", "evaluation.hourly_checkpoints=[1,12]",
                                  f"run.seed={seed}"))
        validated, end, early = _validated(rng, hours, hourly_noise=5.0, val_noise=6.0)
        parts = {n: e.summaries[Split.VAL] for n, e in validated.items()}
        raw = pooled(list(parts.values()))
        sd = pooled_noise(parts, {n: e.histogram_noise[Split.VAL] for n, e in validated.items()})
        val = reader.read(raw, noise_sd=sd)
        threshold = reader.threshold(val, GRID, None)
        rate = reader.flag_rate(val, threshold)
        checkpoints = reader.hour_thresholds(validated, rate, GRID, None)
        found = reader.hour_threshold_intervals(validated, checkpoints, rate, raw, sd, threshold, GRID)
        assert sorted(found) == sorted(checkpoints) == hours
        exact_rate = float((end >= _logit(threshold)).mean())
        for k, hour in enumerate(hours):
            low, high = risk_interval(found[hour], None)
            assert low <= checkpoints[hour] <= high
            total += 1
            held += low <= 1 / (1 + math.exp(-float(np.quantile(early[:, k], 1 - exact_rate)))) <= high
    assert held >= total - 1
    exact = Reader(small_cfg("evaluation.dp=false", "evaluation.hourly_checkpoints=[1,12]"))
    assert exact.hour_threshold_intervals(validated, checkpoints, rate, raw, 0.0, threshold, GRID) == {}


def test_the_margins_interval_redraws_each_hospitals_own_mechanism(monkeypatch):
    """The margin's interval redraws the onset histogram's noise as each hospital drew it:
    a Laplace hospital's as discrete Laplace (whole numbers, heavier tails), a Gaussian
    one's as Gaussian, at the monitor's rate."""
    import server.results
    from server.results import Reader
    from server.validation import Evaluations

    asked = []
    real = server.results.quantile_interval
    monkeypatch.setattr(server.results, "quantile_interval",
                        lambda row, noise, estimate, rates, *args: asked.append((noise, rates))
                        or real(row, noise, estimate, rates, *args))

    cfg = small_cfg("evaluation.threshold=0.17")
    rng = np.random.default_rng(2)
    released = {}
    for name, mechanism in (("a", Mechanism.LAPLACE), ("b", Mechanism.GAUSSIAN)):
        scores = rng.normal(-1.0, 0.8, 300)
        counts = np.bincount(GRID.index(scores), minlength=GRID.bins).astype(np.float64)
        released[name] = Evaluations(onset=counts + np.round(rng.normal(0, 4, GRID.bins)), onset_n=300,
                                     onset_mechanism=mechanism, noise={Item.ONSET_HISTOGRAM: 4.0})
    reader = Reader(cfg)
    margin = reader.onset_margin(released, GRID)
    found = reader.margin_interval(released, GRID, margin)
    assert found.low <= margin <= found.high and found.high - found.low < 1.5
    (noise, rates), = asked
    assert noise.laplace_sds == (4.0,) and noise.gaussian_sd == pytest.approx(4.0)
    assert set(rates.read) == set(rates.exact) == {cfg.evaluation.monitor_rate}
    drawn = noise.draw((2000,), np.random.default_rng(0)) - np.random.default_rng(0).normal(0.0, 4.0, 2000)
    assert np.allclose(drawn, np.round(drawn)) and np.std(drawn) == pytest.approx(4.0, rel=0.1)  # the Laplace part
    assert reader.margin_interval(released, GRID, None) is None


@pytest.mark.parametrize("rule", ["auto", "0.17"])
def test_a_levels_share_is_redrawn_and_a_flag_rate_is_not(monkeypatch, rule):
    """What each hour's interval draws its shares from: under a clinical level, the share
    read anew from each redrawn validation release (it moves); under ``auto``, the
    configured flag rate (it does not)."""
    import server.results
    from server.results import Reader, pooled_noise

    asked = []
    real = server.results.quantile_interval
    monkeypatch.setattr(server.results, "quantile_interval",
                        lambda row, noise, estimate, rates, *args: asked.append(rates) or real(row, noise, estimate,
                                                                                                rates, *args))
    cfg = small_cfg(f"evaluation.threshold={rule}", "evaluation.hourly_checkpoints=[6]")
    reader = Reader(cfg)
    validated, _, _ = _validated(np.random.default_rng(1), cfg.checkpoint_hours, hourly_noise=5.0, val_noise=6.0)
    parts = {n: e.summaries[Split.VAL] for n, e in validated.items()}
    raw = pooled(list(parts.values()))
    sd = pooled_noise(parts, {n: e.histogram_noise[Split.VAL] for n, e in validated.items()})
    threshold = reader.threshold(reader.read(raw, noise_sd=sd), GRID, None)
    rate = reader.flag_rate(reader.read(raw, noise_sd=sd), threshold)
    checkpoints = reader.hour_thresholds(validated, rate, GRID, None)
    assert reader.hour_threshold_intervals(validated, checkpoints, rate, raw, sd, threshold, GRID)
    (rates,) = asked
    if rule == "auto":
        assert set(rates.read) == set(rates.exact) == {cfg.evaluation.flag_rate}
    else:
        assert np.std(rates.read - rates.exact) > 0.005 and len(rates.read) > 1


def test_a_row_of_no_positive_count_gets_no_interval_rather_than_an_error():
    """A noise-only onset release whose every cell came out below zero: nothing to draw
    from, so no interval (the run's results were written before; a crash would lose them)."""
    row = ScoreSummary(np.full((1, 1, GRID.bins), -3.0), None, 40, GRID)
    assert quantile_interval(row, ReleaseNoise(5.0), -1.0, RateDraws.fixed(0.3, 1), 0.99, 50,
                             np.random.default_rng(0), "skewnormal") is None


def test_a_run_at_other_settings_is_not_told_the_default_coverage():
    from common.config import load_config
    from common.intervals import THRESHOLD_INTERVAL_COVERAGE
    from server.report.sections import threshold_coverage_words
    from tests.conftest import DEFAULT_CONFIG

    assert threshold_coverage_words(load_config(DEFAULT_CONFIG, []), 4) == THRESHOLD_INTERVAL_COVERAGE
    for change in ("evaluation.calibrate=true", "evaluation.hourly_checkpoints=[1,6,12,24,36]",
                   "evaluation.val_epsilon=2", "evaluation.score_bins=20", "evaluation.estimator=binormal",
                   "evaluation.threshold=auto", "data.max_stays=500", "privacy.target_epsilon=8",
                   "evaluation.validate_every=20"):
        words = threshold_coverage_words(load_config(DEFAULT_CONFIG, [change]), 4)
        assert words.startswith("their coverage was not measured at this run's settings"), change
    assert threshold_coverage_words(load_config(DEFAULT_CONFIG, []), 3).startswith("their coverage was not measured")


def test_the_summary_prints_each_dp_threshold_with_its_interval():
    from types import SimpleNamespace

    from server.report.bedside import decision_lines

    test = SimpleNamespace(threshold=0.17, calibration=None, checkpoint_thresholds={"1": 0.428, "6": 0.261},
                           checkpoint_intervals={"1": [0.35, 0.52]}, onset_margin=0.67,
                           onset_margin_interval=[0.31, 1.02], hour_thresholds=[0.428] * 47 + [0.17],
                           monitor_rate=0.3, flag_level_intervals={"1": [0.51, 0.71], "48": [0.226, 0.291]})
    lines = decision_lines(test, True, level=0.17, coverage="measured somewhere")
    assert "after hour 1 0.428 (0.350-0.520), after hour 6 0.261 (risks" in lines[0]  # an hour without one prints none
    assert "by 0.67 (0.31 to 1.02) in log-odds" in lines[1]
    # the risks that raise the flag: DP readings too, each with its interval
    assert ": a risk of 0.594 (0.510-0.710) after hour 1, 0.286 (0.226-0.291) after hour 48" in lines[1]
    test.flag_level_intervals = {}  # a run before them: the levels alone
    assert ": a risk of 0.594 after hour 1, 0.286 after hour 48" in decision_lines(test, True, level=0.17)[1]
    assert lines[2] == ("  intervals: nominal 99% for the DP noise and the reading (not a range of patients' risks); "
                        "measured somewhere")
    # a caller that says nothing of the run's settings is not told the default's coverage was measured for it
    assert "not measured at this run's settings" in decision_lines(test, True, level=0.17)[2]
    # the report's paragraph on the monitor says the same levels, with the same intervals
    from server.report.sections import monitor_words

    test.flag_level_intervals = {"1": [0.51, 0.71], "48": [0.226, 0.291]}
    words = monitor_words(test, "measured somewhere")
    assert "flagged at some hour: a risk of 0.594 (0.510-0.710) after hour 1, 0.286 (0.226-0.291) after hour 48. " in words


def test_the_bundle_keeps_what_the_monitor_read_with_its_intervals():
    """The monitor page and predict --hourly say the run's readings from the bundle
    (common.bundle.monitor_readings): the coordinator writes them there, with the level."""
    from server.outputs import bundle_info
    from server.records import TestResult

    test = TestResult(pooled=None, hospitals={}, dropped=[], calibration=None, threshold=0.17,
                      checkpoint_thresholds={"1": 0.332}, checkpoint_intervals={"1": [0.242, 0.438]},
                      onset_margin=0.886, onset_margin_interval=[0.73, 1.03], hour_thresholds=[0.332] * 47 + [0.17])
    test.flag_level_intervals = {"1": [0.45, 0.66], "48": [0.30, 0.36]}
    info = bundle_info("run", 80, test)
    assert info["checkpoint_thresholds"] == {"1": 0.332} and info["checkpoint_intervals"] == {"1": [0.242, 0.438]}
    assert info["flag_level_intervals"] == {"1": [0.45, 0.66], "48": [0.30, 0.36]}
    assert info["onset_margin_interval"] == [0.73, 1.03] and info["interval_level"] == 0.99
    assert bundle_info("run", 80, None)["checkpoint_intervals"] == {}


def test_a_flag_levels_errors_are_its_hours_and_the_margins_less_the_margins_pull_as_a_slow_reference_has_them():
    """A flag level is an hour's threshold moved up by the margin. Its drawn error, draw by
    draw: the hour's threshold error (moved by the recalibration's slope) plus the margin's,
    less the pull (the mean over the window's hours of the thresholds' errors, joined
    between checkpoints, none at a clinical level's last hour), as a loop over the hours
    computes it; a draw an hour could not read drops out."""
    from server.threshold_intervals import flag_level_errors, flag_level_interval

    rng = np.random.default_rng(5)
    hour_errors = {1: rng.normal(0.1, 0.3, 50), 6: rng.normal(0.0, 0.4, 50)}
    hour_errors[6][7] = np.nan
    margin = rng.normal(0.0, 0.06, 60)  # more draws than the hours': paired as they came, the rest unused
    for scale in (1.0, 1.6):
        found = flag_level_errors(48, [1, 6], hour_errors, margin, True, scale)
        assert sorted(found) == [1, 6, 48]
        for i in range(50):
            e1, e6 = scale * hour_errors[1][i], scale * hour_errors[6][i]
            joined = [e1 if h <= 1 else e1 + (e6 - e1) * (h - 1) / 5 if h <= 6 else e6 * (48 - h) / 42
                      for h in range(1, 49)]
            pull = sum(joined) / 48
            want = {1: e1 - pull + margin[i], 6: e6 - pull + margin[i], 48: -pull + margin[i]}
            for hour, value in want.items():
                if i == 7:
                    assert np.isnan(found[hour][i])
                else:
                    assert found[hour][i] == pytest.approx(value)
    # under ``auto`` the last hour's threshold is a reading whose errors are not drawn: no flag level there
    assert sorted(flag_level_errors(48, [1, 6], hour_errors, margin, False)) == [1, 6]
    # an hour read without errors leaves the pull undrawn: no flag level gets an interval (not one joined otherwise)
    assert flag_level_errors(48, [1, 6, 12], hour_errors, margin) == {}
    # no checkpoints: every hour's threshold is the level, so the margin's errors alone (under auto: none)
    assert flag_level_errors(48, [], {}, margin, True) == {48: margin}
    assert flag_level_errors(48, [], {}, margin, False) == {}
    # the interval: the errors' central quantiles, the unread draw left out, widened to hold the reading
    drawn = flag_level_errors(48, [1, 6], hour_errors, margin, True)[6]
    found = flag_level_interval(0.4, drawn, 0.99)
    low, high = np.quantile(drawn[np.isfinite(drawn)], [0.005, 0.995])
    assert (found.low, found.high) == pytest.approx((min(0.4 - high, 0.4), max(0.4 - low, 0.4)))


def test_the_runs_flag_levels_get_intervals_at_the_checkpoints_and_at_a_levels_last_hour():
    """Which flag levels a run gives an interval: each checkpoint hour whose threshold has
    one, and the last hour where its threshold is a clinical level (a setting); under
    ``auto`` the last hour's threshold is a reading with none of its own, so none; and
    none without the margin's."""
    from server.records import Calibration
    from server.results import flag_level_intervals
    from server.threshold_intervals import ReadingInterval

    rng = np.random.default_rng(6)
    hours = [0.33] * 5 + list(np.linspace(0.33, 0.17, 43))
    readings = {1: ReadingInterval(float(_logit(0.33)), -1.1, -0.2, rng.normal(0, 0.3, 200)),
                6: ReadingInterval(float(_logit(0.33)), -1.2, -0.1, rng.normal(0, 0.4, 200))}
    margin = ReadingInterval(0.9, 0.75, 1.05, rng.normal(0.0, 0.06, 200))
    found = flag_level_intervals(hours, [1, 6], readings, margin, True, None)
    assert sorted(found, key=int) == ["1", "6", "48"]
    for hour, (low, high) in found.items():
        level = 1 / (1 + math.exp(-(float(_logit(hours[int(hour) - 1])) + 0.9)))
        assert 0 < low <= level <= high < 1
    assert sorted(flag_level_intervals(hours, [1, 6], readings, margin, False, None), key=int) == ["1", "6"]
    assert flag_level_intervals(hours, [1, 6], readings, None, True, None) == {}
    assert flag_level_intervals(hours, [1, 6, 12], readings, margin, True, None) == {}  # hour 12 read, no interval
    steeper = flag_level_intervals(hours, [1, 6], readings, margin, True, Calibration(scale=1.5, shift=0.0))
    assert steeper["6"][1] - steeper["6"][0] > found["6"][1] - found["6"][0]


def test_the_coverage_study_checks_each_hour_the_margin_and_each_flag_level_against_exact_values():
    """simulations.threshold_coverage on synthetic validation stays (4 hospitals of 100,
    the default's settings and noise): every checkpoint hour, the margin and every flag
    level (the checkpoints', and the last hour's under the clinical level) are read from
    fresh releases with an interval and counted against the exact value, and most hold."""
    from common.config import load_config
    from common.evaluation_noise import calibrated_evaluation_noise
    from simulations.threshold_coverage import ValidationScores, study
    from tests.conftest import DEFAULT_CONFIG

    cfg = load_config(DEFAULT_CONFIG, [])
    rng = np.random.default_rng(3)
    every, ys = [], []
    for _ in range(4):
        y = (rng.random(100) < 0.14).astype(np.int64)
        drift = np.linspace(0.0, 1.0, 48)[None, :]
        every.append(-2.2 + rng.normal(0.0, 0.9, (100, 1)) + 1.6 * y[:, None] * drift
                     + rng.normal(0.0, 0.4, (100, 48)))
        ys.append(y)
    at = [h - 1 for h in cfg.checkpoint_hours]
    run = ValidationScores(name="synthetic", cfg=cfg, every=every, hourly=[e[:, at] for e in every],
                           end=[e[:, -1] for e in every], y=ys,
                           noise=calibrated_evaluation_noise(cfg.to_json(), 1e-5), onset_laplace=True)
    held = study([run], draws=1)
    hours = [f"hour {h}" for h in cfg.checkpoint_hours]
    flags = [f"flag {h}" for h in cfg.checkpoint_hours] + ["flag 48"]
    assert set(hours + flags + ["margin"]) <= set(held.held)
    for what in hours + flags + ["margin"]:
        assert len(held.held[what]) == 1 and np.isfinite(held.errors[what]).all(), what
    assert all(w > 0 for what in flags for w in held.widths[what])
    hits = [h for what in hours + flags + ["margin"] for h in held.held[what]]
    assert sum(hits) >= 0.8 * len(hits)


def test_a_forged_bundles_readings_are_left_unsaid_and_its_thresholds_refused_with_a_clear_error():
    """A bundle is the coordinator's text on a hospital's page and terminal: numbers past a
    float's range, hour keys too long to convert, and flag levels their intervals do not
    hold are left out, not raised; thresholds that are not risks stop the command with an
    error that says what is wrong and what to do."""
    from common.bundle import hour_thresholds, monitor_readings
    from common.data.records import DataError

    levels = np.array([0.544] * 47 + [0.332])
    info = {"onset_margin": 10**400, "checkpoint_thresholds": {"1": 10**400, "9" * 5000: 0.2, "6": 0.206},
            "checkpoint_intervals": {"6": [10**400, 1]},
            "flag_level_intervals": {"1": [10**400, 1.0], "9" * 5000: [0.1, 0.2], "48": [0.9, 0.95], "6": [0.45, 0.6]}}
    said = monitor_readings(info, levels)
    assert said == "The run read its monitor from DP releases: each hour's threshold after hour 6 0.206."
    good = {**info, "onset_margin": 0.886}
    assert ("so the flag levels (each hour's threshold moved up by the margin) after hour 6 0.544 (0.450-0.600)"
            in monitor_readings(good, levels))  # hour 48's interval does not hold its level: not said
    for forged in ({"hour_thresholds": [10**400] + [0.2] * 47}, {"hour_thresholds": [1.5] * 48},
                   {"threshold": float("nan")}, {"threshold": "x"}, {"threshold": 7.0}):
        with pytest.raises(DataError, match="not risks between 0 and 1: the bundle is damaged"):
            hour_thresholds(forged, 48)
    assert hour_thresholds({"threshold": 0.17}, 3).tolist() == [0.17] * 3
    assert hour_thresholds({"hour_thresholds": 5, "threshold": 0.2}, 2).tolist() == [0.2, 0.2]
    assert hour_thresholds({}, 2).tolist() == [0.5, 0.5]
    # plain predict's decision reads the same checked threshold
    from common.bundle import bundle_threshold

    assert bundle_threshold({"threshold": None}) == 0.5 and bundle_threshold({"threshold": 0.17}) == 0.17
    with pytest.raises(DataError, match="not risks between 0 and 1"):
        bundle_threshold({"threshold": "x"})
