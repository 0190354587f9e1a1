"""Platt scaling from released histograms, against a direct fit on the patients."""

import dataclasses

import numpy as np
import pytest
import torch

from common.metrics import ScoreGrid, ScoreSummary, exact_metrics
from common.model import GRUClassifier, output_layer_keys
from server.calibration import calibrate_risk, fit_logistic_calibration, fold_into_output_layer
from tests.conftest import DEFAULT_CONFIG, small_spec

GRID = ScoreGrid(-8.0, 8.0, 400)


def _miscalibrated(n=4000, seed=0):
    """True risk sigmoid(z); the model reports sigmoid((z - 2) / 3): ranked right, scaled wrong."""
    rng = np.random.default_rng(seed)
    z = rng.normal(-1.8, 1.2, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(int)
    reported = 1 / (1 + np.exp(-(z - 2.0) / 3.0))
    return y, np.stack([1 - reported, reported], axis=1)


def test_fit_from_histograms_recovers_the_true_scale():
    y, probs = _miscalibrated()
    fit = fit_logistic_calibration(ScoreSummary.from_predictions(y, probs, GRID))
    assert fit is not None
    scale, shift = fit
    assert scale == pytest.approx(3.0, rel=0.15) and shift == pytest.approx(2.0, abs=0.35)
    # Reference: the same two-parameter logistic fit on the exact logits (scikit-learn).
    from sklearn.linear_model import LogisticRegression

    logits = np.log(probs[:, 1]) - np.log1p(-probs[:, 1])
    ref = LogisticRegression(C=1e9, max_iter=1000).fit(logits[:, None], y)
    assert scale == pytest.approx(ref.coef_[0, 0], rel=0.02)
    assert shift == pytest.approx(ref.intercept_[0], abs=0.05)


def test_recalibration_keeps_the_ranking_and_improves_brier():
    y, probs = _miscalibrated(seed=1)
    scale, shift = fit_logistic_calibration(ScoreSummary.from_predictions(y, probs, GRID))
    p = np.array([calibrate_risk(r, scale, shift) for r in probs[:, 1]])
    after = exact_metrics(y, np.stack([1 - p, p], axis=1))
    before = exact_metrics(y, probs)
    assert after.auroc == pytest.approx(before.auroc, abs=1e-12)
    assert after.brier < before.brier
    assert abs(p.mean() - y.mean()) < 0.01  # calibrated in the large


@pytest.mark.parametrize("head_hidden", [0, 4])
def test_folding_into_the_output_layer_is_an_affine_map_of_the_logit(head_hidden):
    torch.manual_seed(0)
    spec = small_spec(head_hidden=head_hidden)
    model = GRUClassifier(spec, "torch").eval()
    x, s = torch.randn(8, 10, 6), torch.randn(8, 3)
    before = model(x, s)
    w, b = output_layer_keys(spec)
    model.load_state_dict(fold_into_output_layer(model.state_dict(), w, b, 2.5, -0.7))
    torch.testing.assert_close(model(x, s), 2.5 * before - 0.7)


def test_degenerate_histograms_are_left_uncalibrated():
    """Scores crammed into one or two bins identify no slope: no fit, no overflow."""
    y = np.array([0, 0, 1, 0, 1, 0])
    crammed = np.full(6, 0.3)
    assert fit_logistic_calibration(ScoreSummary.from_predictions(y, np.stack([1 - crammed, crammed], 1), GRID)) is None
    assert 0.0 <= calibrate_risk(1e-300, 40.0, 5.0) < 1e-100 and calibrate_risk(1 - 1e-16, 40.0, 5.0) == 1.0


def test_the_report_says_when_the_risks_run_low_or_high():
    from common.reliability import CalibrationPoint
    from server.report.groups import calibration_words

    def curve(factor):
        return [CalibrationPoint(predicted=p, observed=p * factor, patients=80.0) for p in (0.02, 0.1, 0.3)]

    assert "no clear sign either way" in calibration_words(curve(1.24), False)  # within the DP noise alone
    low = calibration_words(curve(1.6), False)
    assert "1.60 times" in low and "run low (a risk understates" in low
    # measured to make the risks worse at the default's size: named with that, not offered as the remedy
    assert "`evaluation.calibrate`, made the risks worse in a federation of 4,000 stays" in low
    high = calibration_words(curve(0.7), True)
    assert "run high (a risk overstates" in high and "even after the recalibration" in high
    assert calibration_words([], False) == ""
    # with the reading's interval (a run since 2026-12-06): the interval, not a fixed band, decides
    held = calibration_words(curve(1.6), False, [1.6, 0.9, 2.4])
    assert "1.60 (0.90-2.40) times" in held and "its interval holds 1, so no clear sign" in held
    above = calibration_words(curve(1.6), False, [1.6, 1.2, 2.1])
    assert "1.60 (1.20-2.10) times" in above and "run low (a risk understates" in above
    below = calibration_words(curve(1.0), False, [0.6, 0.45, 0.8])  # the interval's reading is the one shown
    assert "0.60 (0.45-0.80) times" in below and "run high (a risk overstates" in below
    # an interval that leaves out 1 but stays within a fifth of it: a size, not an alarm
    slight = calibration_words(curve(1.05), False, [1.05, 1.01, 1.10])
    assert "the observed rate is about 5% above the mean predicted risk (1% to 10%)" in slight
    assert "run low by a small but clear margin" in slight
    assert "understates" not in slight and "ranking" not in slight
    # an interval that leaves out 1 but reaches from a small difference to a large one (a
    # default run's 0.70, 0.37-0.943, whose exact ratio was 0.94): its size, no bedside alarm
    unsized = calibration_words(curve(0.7), False, [0.704, 0.374, 0.943])
    assert "0.70 (0.37-0.94) times" in unsized and "6% to 63% below the mean predicted risk" in unsized
    assert "cannot tell a small difference from a large one" in unsized and "fedgru evaluate" in unsized
    assert "ranking" not in unsized and "overstates" not in unsized


def test_an_observed_over_predicted_interval_is_read_by_one_rule_with_its_size():
    from common.reliability import calibration_lean, ratio_text

    assert calibration_lean(0.9, 1.2).way == "none"
    slight = calibration_lean(0.87, 0.996)
    assert (slight.way, slight.proven, slight.size) == ("high", "slight", "0.4% to 13%")
    assert (calibration_lean(0.45, 0.8).way, calibration_lean(0.45, 0.8).proven) == ("high", "large")
    assert calibration_lean(1.2, 2.1).proven == "large" and calibration_lean(1.05, 2.0).proven == "unsized"
    assert calibration_lean(0.374, 0.943).proven == "unsized"
    # an end two decimals would print as 1.00 gets a third: the interval must not read as holding 1
    assert ratio_text(0.93, 0.87, 0.996) == "0.93 (0.87-0.996)" and ratio_text(1.1, 1.004, 1.2) == "1.10 (1.004-1.20)"
    assert ratio_text(0.98, 0.9, 1.0) == "0.98 (0.90-1.00)" and ratio_text(float("nan"), 0.9, 1.1) == "cannot be estimated"
    # the reading too, and as many digits as it takes: never a 1.00 outside its own interval
    assert ratio_text(0.997, 0.993, 0.9996) == "0.997 (0.99-0.9996)"
    assert calibration_lean(0.5, 0.9).proven == "large"  # an end exactly a tenth off (1 - 0.9 is 0.0999... in floats)
    assert calibration_lean(0.5, 0.9).side == "below" and calibration_lean(1.2, 2.1).side == "above"


def test_the_observed_over_predicted_interval_holds_the_exact_ratio_most_of_the_time():
    """The calibration reading's interval (metric_intervals, with_calibration) from the same
    draws as the metrics': over 16 default-sized noisy releases it holds the exact
    observed/predicted of their patients in most (nominal 99%; measured in the closing
    note of 2026-12-06), and the reading is near the exact ratio on average."""
    from common.estimates import for_metrics, observed_over_predicted
    from common.intervals import OBSERVED_OVER_PREDICTED, metric_intervals

    grid = ScoreGrid(-7.0, 3.0, 10)  # the default's test grid, and its noise (tests/test_estimates.py)
    rng = np.random.default_rng(12)
    held, readings = 0, []
    for _ in range(16):
        y = (rng.random(800) < 0.14).astype(np.int64)
        logit = -2.3 + rng.normal(size=800) + 1.3 * y
        risk = 1 / (1 + np.exp(-logit))
        exact = y.mean() / risk.mean()
        summary = ScoreSummary.from_predictions(y, np.stack([1 - risk, risk], 1), grid).noised(4.835, rng)
        found = metric_intervals(summary, 4.835, None, 0.99, 60, rng, "skewnormal", with_calibration=True)
        low, high = found[OBSERVED_OVER_PREDICTED]
        reading = observed_over_predicted(for_metrics(summary, "skewnormal", True))
        assert low <= reading <= high
        held += low <= exact <= high
        readings.append(reading - exact)
    assert held >= 13, held  # nominal 99%; rough, as the metrics' intervals are
    assert abs(np.mean(readings)) < 0.15


def test_a_simulations_exact_calibration_is_said_in_bedside_words():
    """A clinician's try: set A's observed deaths were 1.35 times the predicted and nothing
    they saw said so; the simulation's report now says it from the exact test patients."""
    from server.report.groups import exact_calibration_words

    low = exact_calibration_words(1.35)
    assert "1.35 times" in low and "run low" in low and "0.20 stands for about 0.27" in low
    assert "run high" in exact_calibration_words(0.8) and "about 0.16" in exact_calibration_words(0.8)
    assert "within a tenth" in exact_calibration_words(1.05)


def test_the_report_says_what_the_risk_is_and_where_not_to_trust_it(tmp_path):
    """A clinician's try found no statement of what the number predicts, from what time,
    or when not to use it: the report's bedside section says it, with the run's numbers."""
    from types import SimpleNamespace

    from common.config import load_config
    from server.records import RunMetrics, TestResult
    from server.report.bedside import bedside_section
    from server.report.run_folder import RunFolder

    cfg = load_config(DEFAULT_CONFIG, [])
    test = TestResult(pooled=None, hospitals={}, dropped=[], calibration=None, threshold=0.12,
                      calibration_ratio=[1.43, 0.84, 1.86], exact_calibration_ratio=1.35,
                      subgroups=[SimpleNamespace(metrics=None)] * 3)
    run = RunFolder(tmp_path, cfg, RunMetrics(run_id="r", test=test), None, None, None, None)
    (bullets,) = bedside_section(run).blocks
    text = "\n".join(bullets.items)
    assert "probability of `died`" in text and "after hour 48" in text and "15 charted variables" in text
    assert "Read from the DP releases, the observed rate is 1.43 (0.84-1.86)" in text and "1.35 times" in text
    assert "risk of 0.120 or more" in text and "No group (sex, age, ICU type) could be read" in text
    assert "no charted value in the window" in text and "`fedgru evaluate`" in text
    assert "above" not in text  # the report holds no decision lines to point to
    # the monitor's own levels, as the console gives them (the report gave only the decision's 0.120)
    test.hour_thresholds, test.onset_margin, test.monitor_rate = [0.3] + [0.2] * 46 + [0.12], 1.33, 0.3
    test.checkpoint_thresholds = {6: 0.196, 48: 0.12}
    test.hospitals = dict.fromkeys(["a", "b", "c", "d"])  # the default's 4: its measured spread applies
    (bullets,) = bedside_section(run).blocks
    flag = next(item for item in bullets.items if item.startswith("**The flag.**"))
    assert ("flags a stay from the first hour its risk passes that hour's threshold by 1.33 in log-odds: a risk of "
            "0.618 after hour 1, 0.340 after hour 48 and keeps the flag on (the margin read from a DP release, aiming at 30% "
            "of the validation stays") in flag
    from server.report.bedside import MONITOR_SHARE_MEASURED

    assert f"The release's noise moves that share: {MONITOR_SHARE_MEASURED}" in flag
    # a run aiming elsewhere is not told the default's spread
    aiming = dataclasses.replace(cfg, evaluation=dataclasses.replace(cfg.evaluation, monitor_rate=0.1))
    (bullets,) = bedside_section(RunFolder(tmp_path, aiming, RunMetrics(run_id="r", test=test), None, None, None,
                                           None)).blocks
    flag = next(item for item in bullets.items if item.startswith("**The flag.**"))
    assert MONITOR_SHARE_MEASURED not in flag and "measured only at the default's settings" in flag
    # nor a run trained at another clipping norm (its risks, so its hour thresholds, sit elsewhere), nor at another level
    for changed in (dataclasses.replace(cfg, privacy=dataclasses.replace(cfg.privacy, max_grad_norm=3.0)),
                    dataclasses.replace(cfg, evaluation=dataclasses.replace(cfg.evaluation, threshold=0.12)),
                    dataclasses.replace(cfg, evaluation=dataclasses.replace(cfg.evaluation, threshold="auto")),
                    dataclasses.replace(cfg, evaluation=dataclasses.replace(cfg.evaluation, hourly_share=0.4)),
                    dataclasses.replace(cfg, evaluation=dataclasses.replace(cfg.evaluation, onset_noise="gaussian"))):
        (bullets,) = bedside_section(RunFolder(tmp_path, changed, RunMetrics(run_id="r", test=test), None, None, None,
                                               None)).blocks
        flag = next(item for item in bullets.items if item.startswith("**The flag.**"))
        assert MONITOR_SHARE_MEASURED not in flag and "measured only at the default's settings" in flag
    assert bedside_section(RunFolder(tmp_path, cfg, RunMetrics(run_id="r"), None, None, None, None)) is None


def test_the_exact_reliability_diagram_splits_the_patients_into_tenths_by_risk():
    """A simulation's exact curve, drawn beside the DP reading (a DP curve alone looked
    exact to a new user): ten groups of about equal size, in order of risk, whose
    observed rates average to the outcome's rate."""
    from common.reliability import exact_reliability

    rng = np.random.default_rng(0)
    risk = rng.beta(1, 6, 803)
    outcome = rng.random(803) < 1.3 * risk  # risks that run low, as the default's
    points = exact_reliability(outcome, risk)
    sizes = [p.patients for p in points]
    assert len(points) == 10 and sum(sizes) == 803 and max(sizes) - min(sizes) <= 1
    assert [p.predicted for p in points] == sorted(p.predicted for p in points)
    assert sum(p.observed * p.patients for p in points) / 803 == pytest.approx(outcome.mean())
    assert sum(p.predicted * p.patients for p in points) / 803 == pytest.approx(risk.mean())
    assert len(exact_reliability(outcome[:12], risk[:12])) == 2  # at least 5 patients a point


def test_a_dp_reliability_diagram_has_no_hook_and_keeps_the_observed_rate():
    """Two fitted classes whose spreads differ meet again in a far tail: a default run's
    lowest tenth read a death rate of 0.38 (exact 0.00). The curve is made non-decreasing
    (PAV, as the CORP diagram) without moving the observed over predicted ratio."""
    from common.estimates import observed_over_predicted
    from common.reliability import reliability

    deaths = np.array([30, 1, 2, 3, 5, 8, 12, 20, 30, 60], dtype=float)
    survivors = np.array([50, 100, 100, 90, 80, 70, 60, 40, 20, 10], dtype=float)
    summary = ScoreSummary(np.stack([survivors, deaths])[:, None, :], None, int(deaths.sum() + survivors.sum()),
                           ScoreGrid(-7, 3, 10))
    points = reliability(summary)
    observed = [p.observed for p in points]
    assert observed == sorted(observed) and observed[0] < 30 / 80  # the hook is pooled away
    assert all(0 <= o <= 1 for o in observed)
    kept = sum(p.observed * p.patients for p in points) / sum(p.predicted * p.patients for p in points)
    assert kept == pytest.approx(observed_over_predicted(summary))
    # a curve already in order is left as it is
    from common.reliability import CalibrationPoint, non_decreasing

    rising = [CalibrationPoint(0.01 * k, 0.012 * k, 80.0) for k in range(1, 11)]
    assert [p.observed for p in non_decreasing(rising)] == pytest.approx([p.observed for p in rising])


def test_the_reliability_diagram_draws_the_exact_curve_and_says_what_it_draws(tmp_path):
    """The exact curve (simulation only) is drawn beside the DP reading, or alone where no
    curve could be read; the caption says which, and that a DP point carries noise."""
    from common.reliability import CalibrationPoint
    from server.report.groups import reliability_caption
    from server.report.plots import plot_reliability

    read = [CalibrationPoint(0.02 * k, 0.025 * k, 80.0) for k in range(1, 11)]
    exact = [CalibrationPoint(0.02 * k, 0.03 * k, 80.0) for k in range(1, 11)]
    assert plot_reliability({"all test patients (DP reading)": read}, tmp_path / "both.png", exact)
    assert plot_reliability({"all test patients (DP reading)": []}, tmp_path / "exact.png", exact)
    assert not plot_reliability({"all test patients (DP reading)": []}, tmp_path / "none.png", [])
    assert (tmp_path / "both.png").stat().st_size > 10_000 and not (tmp_path / "none.png").exists()
    both = reliability_caption(dp=True, read=True, exact=True)
    assert "each point carries the noise" in both and "pool-adjacent-violators" in both and "dashed black" in both
    assert "no curve could be read from the DP releases" in reliability_caption(dp=True, read=False, exact=True)
    # a DP reading's points with their bands: drawn as bars, and the caption gives their measured coverage
    from common.intervals import RELIABILITY_BAND_COVERAGE

    banded = [CalibrationPoint(p.predicted, p.observed, p.patients, max(0.0, p.observed - 0.05), p.observed + 0.1)
              for p in read]
    import matplotlib.axes

    bars = []
    real_errorbar = matplotlib.axes.Axes.errorbar

    def spy(self, x, y, *args, **kwargs):
        bars.append((list(x), list(y), kwargs.get("yerr")))
        return real_errorbar(self, x, y, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(matplotlib.axes.Axes, "errorbar", spy)
        assert plot_reliability({"all test patients (DP reading)": banded}, tmp_path / "bars.png", exact)
        assert plot_reliability({"all test patients (DP reading)": read}, tmp_path / "plain.png", exact)
    ((xs, ys, (below, above)),) = bars  # one call, for the banded curve only; each bar from low to high
    assert xs == [p.predicted for p in banded] and ys == [p.observed for p in banded]
    assert below == pytest.approx([p.observed - p.low for p in banded]) and above == pytest.approx([0.1] * 10)
    with_bars = reliability_caption(dp=True, read=True, exact=True, bands=RELIABILITY_BAND_COVERAGE)
    assert "its bar is its interval" in with_bars and RELIABILITY_BAND_COVERAGE in with_bars and "99%" in with_bars
    assert "bar" not in both
    plain = reliability_caption(dp=False, read=True, exact=False)
    assert "exact counts" in plain and "noise" not in plain.replace("no DP noise", "")


def test_the_summary_says_which_thresholds_are_settings_and_which_dp_readings():
    """A new user read 'decision threshold 0.170, after hour 1 0.428' as five settings: the
    hour thresholds are read from DP releases (so is an 'auto' threshold); a configured
    level is not."""
    from types import SimpleNamespace

    from server.report.bedside import decision_lines

    test = SimpleNamespace(threshold=0.17, calibration=None, checkpoint_thresholds={"1": 0.428, "6": 0.261},
                           onset_margin=None, hour_thresholds=None)
    line = decision_lines(test, True, level=0.17)[0]
    assert line.startswith("decision threshold 0.170 (a configured level); each hour's, read from the DP validation "
                           "releases: after hour 1 0.428, after hour 6 0.261")
    auto = decision_lines(test, True, level=None)[0]
    assert auto.startswith("decision threshold 0.170 (read from the DP validation releases)")
    exact = decision_lines(test, True, level=None, dp=False)[0]  # a comparison simulation without DP
    assert "DP" not in exact.replace("(no DP)", "") and "read from the exact validation histograms (no DP)" in exact
    test.checkpoint_thresholds = {}
    assert decision_lines(test, True, level=0.17)[0] == ("decision threshold 0.170 (a configured level) (risks on the "
                                                         "final model's own scale)")


def test_the_bedside_calibration_item_follows_the_same_rule():
    """The report's 'Before using these risks' item said 'where this is far from 1 ... read
    it as a ranking' whatever the reading; it now follows calibration_lean."""
    from types import SimpleNamespace

    from server.report.bedside import _calibration_item

    def item(ratio):
        return _calibration_item(SimpleNamespace(calibration_ratio=ratio, exact_calibration_ratio=None, calibration=None))

    assert item([0.96, 0.53, 1.31]).endswith("0.96 (0.53-1.31) times the mean predicted risk: the DP reading's "
                                             "interval holds 1.")
    unsized = item([0.704, 0.374, 0.943])
    assert "may run high, by 6% to 63%" in unsized and "fedgru evaluate" in unsized and "ranking" not in unsized
    assert "read it as a ranking" in item([0.6, 0.45, 0.8])


def test_a_threshold_that_fell_back_to_one_half_is_not_called_a_reading():
    """A federation too small for its validation releases keeps 0.5 under `auto` (a warning
    in the log); the summary said 'read from the DP validation releases' of it."""
    from types import SimpleNamespace

    from server.report.bedside import decision_lines
    from server.results import Reader
    from tests.conftest import small_cfg

    grid = ScoreGrid(-7.0, 3.0, 10)
    assert Reader(small_cfg("evaluation.threshold=auto")).threshold_and_source(None, grid, None, False) == (0.5, "fallback")
    assert Reader(small_cfg("evaluation.threshold=auto")).threshold_and_source(None, grid, None, True) == (0.5, "fallback")
    assert Reader(small_cfg("evaluation.threshold=0.17")).threshold_and_source(None, grid, None, True) == (0.17, "level")
    test = SimpleNamespace(threshold=0.5, calibration=None, checkpoint_thresholds={}, onset_margin=None,
                           hour_thresholds=None, threshold_source="fallback")
    line = decision_lines(test, True, level=None)[0]
    assert "(a fallback: the validation releases could not choose one" in line and "DP" not in line
    test.threshold_source = "read"
    assert "(read from the DP validation releases)" in decision_lines(test, True, level=None)[0]
