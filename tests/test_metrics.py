"""Metrics against scikit-learn, and the released score summaries against exact metrics."""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from common.metrics import ScoreGrid, ScoreSummary, exact_metrics, pooled


def _binary(n=500, seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.15).astype(int)
    p1 = 1 / (1 + np.exp(-(rng.normal(size=n) + 1.5 * y - 1.8)))
    return y, np.stack([1 - p1, p1], axis=1)


def test_exact_binary_metrics_match_sklearn_and_definitions():
    y, probs = _binary()
    m = exact_metrics(y, probs)
    assert m.auroc == pytest.approx(roc_auc_score(y, probs[:, 1]), abs=1e-12)
    assert m.auprc == pytest.approx(average_precision_score(y, probs[:, 1]), abs=1e-12)
    pred = probs[:, 1] >= 0.5
    tp, fn = int((pred & (y == 1)).sum()), int((~pred & (y == 1)).sum())
    fp, tn = int((pred & (y == 0)).sum()), int((~pred & (y == 0)).sum())
    assert m.sensitivity == pytest.approx(tp / (tp + fn))
    assert m.specificity == pytest.approx(tn / (tn + fp))
    assert m.accuracy == pytest.approx((tp + tn) / len(y))
    assert m.f1 == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert m.event1_score == pytest.approx(min(tp / (tp + fn), tp / (tp + fp)))
    assert m.brier == pytest.approx(np.mean((probs[:, 1] - y) ** 2))
    assert m.n == 500


def test_exact_multiclass_matches_sklearn_macro_ovr():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 300)
    logits = rng.normal(size=(300, 4)) + np.eye(4)[y] * 1.2
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    m = exact_metrics(y, probs)
    assert m.auroc == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"), abs=1e-12)
    assert m.accuracy == pytest.approx((probs.argmax(1) == y).mean())
    assert m.brier == pytest.approx(((probs - np.eye(4)[y]) ** 2).sum(1).mean())


def test_summary_is_additive_and_close_to_exact():
    parts = [_binary(400, seed) for seed in range(4)]
    grid = ScoreGrid(-8.0, 8.0, 400)  # fine bins: only ties within a bin and bin-centre risks differ
    summaries = [ScoreSummary.from_predictions(y, p, grid) for y, p in parts]
    total = pooled(summaries)
    y_all = np.concatenate([y for y, _ in parts])
    p_all = np.concatenate([p for _, p in parts])
    exact = exact_metrics(y_all, p_all)
    approx = total.metrics()  # decisions at the edge nearest risk 0.5: here exactly logit 0
    assert approx.n == exact.n == 1600
    assert approx.auroc == pytest.approx(exact.auroc, abs=2e-3)
    assert approx.auprc == pytest.approx(exact.auprc, abs=1e-2)  # ties within a bin
    for key in ("accuracy", "sensitivity", "specificity", "f1", "event1_score"):
        assert getattr(approx, key) == pytest.approx(getattr(exact, key), abs=1e-9)
    assert approx.brier == pytest.approx(exact.brier, abs=2e-3)  # risks read at bin centres
    again = ScoreSummary.from_arrays(total.to_arrays())
    assert again.metrics() == approx


def test_multiclass_summary_matches_exact_metrics():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 3, 600)
    logits = rng.normal(size=(600, 3)) + np.eye(3)[y] * 1.5
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    summary = ScoreSummary.from_predictions(y, probs, ScoreGrid(-8.0, 8.0, 400))
    exact, approx = exact_metrics(y, probs), summary.metrics()
    assert approx.auroc == pytest.approx(exact.auroc, abs=3e-3)
    assert approx.accuracy == pytest.approx(exact.accuracy, abs=1e-12)  # from the released confusion matrix
    assert approx.brier == pytest.approx(exact.brier, abs=5e-3)


def test_the_gaussian_mechanism_adds_noise_of_the_declared_scale():
    y, probs = _binary(4000, seed=9)
    exact = ScoreSummary.from_predictions(y, probs, ScoreGrid(-7.0, 3.0, 20))
    rng = np.random.default_rng(0)
    diffs = np.concatenate([(exact.noised(3.0, rng).histogram - exact.histogram).ravel() for _ in range(200)])
    assert exact.sensitivity == 1.0  # one cell per patient: the histogram of p(death) per true class
    assert diffs.mean() == pytest.approx(0.0, abs=0.05) and diffs.std() == pytest.approx(3.0, rel=0.02)
    noisy = exact.noised(3.0, np.random.default_rng(1))
    assert noisy.n == exact.n and (noisy.histogram != exact.histogram).all()
    assert abs(noisy.metrics().auroc - exact.metrics().auroc) < 0.02  # 4000 patients: noise of 3 per bin is small


def test_undefined_auroc_is_nan_not_an_error():
    y = np.zeros(10, dtype=int)
    probs = np.tile([0.9, 0.1], (10, 1))
    m = exact_metrics(y, probs)
    assert np.isnan(m.auroc) and m.specificity == 1.0


def test_auto_threshold_is_the_best_event1_threshold_among_bin_edges():
    """Reference: exact event-1 at every bin edge, one by one."""
    from common.metrics import choose_threshold

    y, probs = _binary(n=700, seed=3)
    grid = ScoreGrid(-8.0, 8.0, 60)
    summary = ScoreSummary.from_predictions(y, probs, grid)
    chosen = choose_threshold(summary)
    scores = [exact_metrics(y, probs, grid.edge_risk(j)).event1_score for j in range(1, grid.bins)]
    assert exact_metrics(y, probs, grid.edge_risk(chosen)).event1_score == pytest.approx(max(scores), abs=1e-12)
    assert chosen == 1 + int(np.argmax(scores))
    # decisions at that edge, read off the summary, agree with the exact metrics
    at, exact = summary.metrics(chosen), exact_metrics(y, probs, grid.edge_risk(chosen))
    for key in ("accuracy", "sensitivity", "specificity", "f1", "event1_score"):
        assert getattr(at, key) == pytest.approx(getattr(exact, key), abs=1e-12), key
    # at 15% prevalence the best event-1 threshold lies well below 0.5
    assert grid.edge_risk(chosen) < 0.5 and exact.sensitivity > exact_metrics(y, probs).sensitivity


@pytest.mark.parametrize("use", ["binary_counts", "choose_threshold", "fit_logistic_calibration"])
def test_histogram_fits_need_a_binary_summary_with_both_outcomes(use):
    """The auto threshold and the recalibration read the same binary counts: no answer
    without deaths and survivors both, or for a multi-class task."""
    from common.metrics import choose_threshold
    from server.calibration import fit_logistic_calibration

    fn = {"binary_counts": ScoreSummary.binary_counts, "choose_threshold": choose_threshold,
          "fit_logistic_calibration": fit_logistic_calibration}[use]
    y, probs = _binary()
    grid = ScoreGrid(-8.0, 8.0, 40)
    assert fn(ScoreSummary.from_predictions(np.zeros_like(y), probs, grid)) is None
    rng = np.random.default_rng(0)
    p3 = rng.dirichlet(np.ones(3), size=50)
    assert fn(ScoreSummary.from_predictions(rng.integers(0, 3, 50), p3, grid)) is None
    assert fn(ScoreSummary.from_predictions(y, probs, grid)) is not None


def test_a_nan_score_counts_once_in_the_lowest_bin():
    """A model that overflows on a patient gives a NaN risk; the patient still counts once
    (the histogram's sensitivity holds) and nothing fails: a failure would tell the
    coordinator that some patient made the model NaN."""
    probs = np.array([[0.9, 0.1], [np.nan, np.nan], [0.2, 0.8]])
    summary = ScoreSummary.from_predictions(np.array([0, 1, 1]), probs, ScoreGrid(-4.0, 4.0, 8))
    assert summary.histogram.sum() == 3
    assert summary.histogram[1, 0, 0] == 1  # the NaN death, in the lowest bin


def test_a_dp_reading_shows_a_number_only_with_an_interval_that_says_something():
    from common.metrics import with_interval

    assert with_interval(0.8123, [0.761, 0.858]) == "0.812 (0.761-0.858)"
    assert with_interval(0.8, None) == "cannot be estimated"
    assert with_interval(float("nan"), [0.1, 0.2], what="why") == "cannot be estimated (why)"
    # "AUPRC 0.487 (0.000-1.000)" read like a number; it is no information
    assert with_interval(0.487, [0.0, 1.0]) == "cannot be estimated (its interval is all of 0-1)"
    assert with_interval(0.487, [0.0004, 0.9996]) == "cannot be estimated (its interval is all of 0-1)"
    # nearly all of it is no better: a hospital's row read "AUROC 0.785 (0.008-1.000)"
    assert with_interval(0.785, [0.008, 1.0]) == ("cannot be estimated (its interval, 0.008-1.000, spans nearly all "
                                                  "of 0-1)")
    assert "cannot be estimated" in with_interval(0.487, [0.0, 0.97])
    assert with_interval(0.758, [0.553, 0.923]) == "0.758 (0.553-0.923)"
    assert with_interval(0.5, [0.06, 0.95]) == "0.500 (0.060-0.950)"  # just under the span: a number, with its width
    assert "cannot be estimated" in with_interval(0.5, [0.05, 0.95])  # 0.900 as printed (0.8999... in floats)
    # an exact value on a hospital's own stays is a number whatever its sampling interval's width
    assert with_interval(0.667, [0.0, 1.0], dp=False) == "0.667 (0.000-1.000)"


def test_sampling_intervals_hold_the_metrics_and_narrow_with_more_stays():
    """evaluate's intervals for a hospital's own exact metrics: a percentile bootstrap over
    stays. Each holds its metric, it narrows about as 1/sqrt(n), and over fresh samples of
    one population the AUROC's 95% interval holds the population's AUROC most of the time."""
    from common.metrics import sampling_intervals

    def sample(rng, n):
        y = (rng.random(n) < 0.15).astype(np.int64)
        risk = 1 / (1 + np.exp(-(-2.0 + rng.normal(size=n) + 1.2 * y)))
        return y, np.stack([1 - risk, risk], axis=1)

    rng = np.random.default_rng(0)
    widths = {}
    for n in (400, 3600):
        y, probs = sample(rng, n)
        found = sampling_intervals(y, probs, 0.2, draws=200, rng=rng)
        m = exact_metrics(y, probs, 0.2)
        for key, (low, high) in found.items():
            assert low <= getattr(m, key) <= high, key
        widths[n] = found["auroc"][1] - found["auroc"][0]
    assert 2 < widths[400] / widths[3600] < 4.5  # sqrt(9) = 3
    truth = exact_metrics(*sample(np.random.default_rng(1), 200_000)).auroc
    held = sum(low <= truth <= high for low, high in
               (sampling_intervals(*sample(rng, 400), 0.2, draws=100, rng=rng)["auroc"] for _ in range(40)))
    assert held >= 34  # nominal 95% of 40 is 38
