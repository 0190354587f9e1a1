"""Classification metrics, exact and from the score histograms hospitals release.

Exact metrics (``exact_metrics``) are for data at hand: a hospital scoring its own
patients, ``fedgru evaluate``. Federated evaluation instead has each hospital release a
:class:`ScoreSummary`: per true class, how many patients fall in each bin of predicted
risk, on a grid the config fixes (:class:`ScoreGrid`), usually with DP noise added.
Summaries add up across hospitals, so pooled metrics over all hospitals come out without
any patient-level prediction leaving a hospital. Bins are uniform in logit, so the AUROC
from an exact summary differs from the exact AUROC only by pairs that share a bin; the
Brier score is read at the bin centres.

Metrics (binary; multi-class: one-vs-rest per class, macro-averaged):
AUROC, AUPRC (average precision), accuracy, sensitivity, specificity, F1, Brier score,
and the PhysioNet/CinC 2012 event-1 score min(Se, +P).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np

from .gaussian_noise import gaussian_release


@dataclass
class Metrics:
    """The metrics fedgru reports for one set of patients (NaN where undefined, e.g. AUROC
    without a death). Decisions (accuracy ... event-1) are at the run's threshold."""

    auroc: float
    auprc: float
    accuracy: float
    sensitivity: float
    specificity: float
    f1: float
    brier: float
    event1_score: float  # PhysioNet/CinC 2012: min(sensitivity, positive predictive value)
    n: int

    @classmethod
    def from_parts(cls, ranking: dict, decisions: dict) -> Metrics:
        return cls(**{f.name: {**ranking, **decisions}[f.name] for f in fields(cls)})


def _auroc_from_counts(pos: np.ndarray, neg: np.ndarray) -> float:
    """AUROC from per-bin counts (bins in increasing score); ties count one half."""
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    neg_below = np.cumsum(neg) - neg
    return float((pos * (neg_below + 0.5 * neg)).sum() / (n_pos * n_neg))


def _ap_from_counts(pos: np.ndarray, neg: np.ndarray) -> float:
    """Average precision with a threshold at every bin (highest scores first)."""
    n_pos = pos.sum()
    if n_pos == 0:
        return float("nan")
    tp = np.cumsum(pos[::-1])
    fp = np.cumsum(neg[::-1])
    keep = (pos[::-1] + neg[::-1]) > 0
    tp, fp = tp[keep], fp[keep]
    precision = tp / np.maximum(tp + fp, 1)
    recall = tp / n_pos
    prev = np.concatenate([[0.0], recall[:-1]])
    return float(((recall - prev) * precision).sum())


def _threshold_metrics(confusion: np.ndarray) -> dict:
    """From a confusion matrix (rows: true class, columns: predicted class)."""
    total = confusion.sum()
    k = confusion.shape[0]
    classes = [1] if k == 2 else list(range(k))  # binary: positive class only
    se, sp, ppv, f1 = [], [], [], []
    for c in classes:
        tp = confusion[c, c]
        fn = confusion[c].sum() - tp
        fp = confusion[:, c].sum() - tp
        tn = total - tp - fn - fp
        se.append(tp / (tp + fn) if tp + fn else float("nan"))
        sp.append(tn / (tn + fp) if tn + fp else float("nan"))
        ppv.append(tp / (tp + fp) if tp + fp else 0.0)
        f1.append(2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else 0.0)
    sens, spec, prec = _nanmean(se), _nanmean(sp), _nanmean(ppv)
    return {
        "accuracy": float(np.trace(confusion) / total) if total else float("nan"),
        "sensitivity": float(sens),
        "specificity": float(spec),
        "f1": float(_nanmean(f1)),
        "event1_score": float(min(sens, prec)) if not math.isnan(sens) else float("nan"),
        "precision": float(prec),
    }


def _nanmean(values: list[float]) -> float:
    arr = np.asarray(values, dtype=np.float64)
    return float(np.nanmean(arr)) if np.isfinite(arr).any() else float("nan")


def predicted_class(probs: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Binary: positive when p1 >= threshold; multi-class: the most likely class."""
    if probs.shape[1] == 2:
        return (probs[:, 1] >= threshold).astype(np.int64)
    return probs.argmax(axis=1)


def exact_metrics(y: np.ndarray, probs: np.ndarray, threshold: float = 0.5) -> Metrics:
    """Exact metrics of class probabilities ``probs`` (N, K) against labels ``y``;
    binary decisions (accuracy ... event-1) at ``threshold`` on the risk."""
    y = np.asarray(y, dtype=np.int64)
    k = probs.shape[1]
    onehot = np.eye(k)[y]
    brier = float(((probs - onehot) ** 2).sum(axis=1).mean()) if k > 2 else float(((probs[:, 1] - y) ** 2).mean())
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (y, predicted_class(probs, threshold)), 1)
    classes = [1] if k == 2 else list(range(k))
    aurocs, aps = [], []
    for c in classes:
        score, is_pos = probs[:, c], y == c
        order = np.argsort(score, kind="mergesort")
        s_sorted = score[order]
        _, inverse, counts = np.unique(s_sorted, return_inverse=True, return_counts=True)
        pos = np.bincount(inverse, weights=is_pos[order], minlength=len(counts))
        neg = counts - pos
        aurocs.append(_auroc_from_counts(pos, neg))
        aps.append(_ap_from_counts(pos, neg))
    ranking = {"auroc": _nanmean(aurocs), "auprc": _nanmean(aps), "brier": brier, "n": int(len(y))}
    return Metrics.from_parts(ranking, _threshold_metrics(confusion))


def sampling_intervals(y: np.ndarray, probs: np.ndarray, threshold: float = 0.5, draws: int = 200,
                       level: float = 0.95, rng: np.random.Generator | None = None) -> dict[str, list[float]]:
    """Each metric's percentile bootstrap interval over the stays (Efron & Tibshirani 1993,
    ch. 13): how far the exact metrics of these stays may be from those of the population
    they were drawn from. For exact metrics a hospital computes on its own patients (no DP
    noise; the sampling error is what is left). Draws lacking a class are skipped; a metric
    defined in fewer than half the draws gets no interval."""
    rng = rng or np.random.default_rng(0)
    y = np.asarray(y, dtype=np.int64)
    values: dict[str, list[float]] = {key: [] for key in METRIC_NAMES}
    for _ in range(draws):
        idx = rng.integers(0, len(y), len(y))
        m = exact_metrics(y[idx], probs[idx], threshold)
        for key in values:
            v = getattr(m, key)
            if math.isfinite(v):
                values[key].append(v)
    tail = (1 - level) / 2
    return {key: [float(np.quantile(v, tail)), float(np.quantile(v, 1 - tail))]
            for key, v in values.items() if len(v) >= draws // 2}


def calibration_in_the_large(y: np.ndarray, risk: np.ndarray, draws: int = 200, level: float = 0.95,
                             rng: np.random.Generator | None = None) -> list[float] | None:
    """[the observed rate of the outcome over the mean predicted risk, and its percentile
    bootstrap interval over resamples of the stays] (1: calibrated in the large; above 1
    the risks run low): exact, for a hospital's own patients. None without stays or risk,
    or where fewer than half the resamples hold any risk."""
    y, risk = np.asarray(y, dtype=np.float64), np.asarray(risk, dtype=np.float64)
    if not len(y) or not risk.mean() > 0:
        return None
    rng = rng or np.random.default_rng(0)
    ratios = [y[i].mean() / risk[i].mean() for i in (rng.integers(0, len(y), len(y)) for _ in range(draws))
              if risk[i].mean() > 0]
    if len(ratios) < draws // 2 or not ratios:
        return None  # too few resamples held a risk to say how far the ratio may be
    tail = (1 - level) / 2
    low, high = np.quantile(ratios, [tail, 1 - tail])
    return [float(y.mean() / risk.mean()), float(low), float(high)]


@dataclass(frozen=True)
class ScoreGrid:
    """Bins of equal width in logit (log-odds of the predicted risk) over [low, high]; a
    logit below ``low`` joins the first bin, one above ``high`` the last. Fixed by the
    config, never by data, so every hospital's histogram has the same bins and they add up."""

    low: float
    high: float
    bins: int

    @property
    def width(self) -> float:
        return (self.high - self.low) / self.bins

    def index(self, logits: np.ndarray) -> np.ndarray:
        # A NaN score (a model that overflows on this patient) goes to the lowest bin: the
        # patient still counts once, so the histogram's sensitivity holds, and nothing
        # fails (a failure would tell the coordinator that some patient made the model NaN).
        logits = np.where(np.isnan(logits), self.low, logits)
        return np.clip(np.floor((logits - self.low) / self.width), 0, self.bins - 1).astype(np.int64)

    def edge_logit(self, j: int) -> float:
        """The lower edge of bin ``j`` (``j = bins`` is the upper edge of the last bin)."""
        return self.low + j * self.width

    def edge_risk(self, j: int) -> float:
        """A patient is in bin ``j`` or above exactly when their risk is at least this
        (for 0 < j < bins)."""
        return float(1.0 / (1.0 + math.exp(-self.edge_logit(j))))

    def edge_for_risk(self, risk: float) -> int:
        """The inner edge nearest a risk (a decision threshold drawn from the histogram
        is always an edge)."""
        logit = math.log(risk) - math.log1p(-risk)
        return int(np.clip(round((logit - self.low) / self.width), 1, self.bins - 1))

    def centre_logits(self) -> np.ndarray:
        return self.low + (np.arange(self.bins) + 0.5) * self.width

    def anchored(self, risk: float) -> ScoreGrid:
        """The same bins shifted (by under half a bin) so that a decision threshold is an
        edge: decisions at it then read off the histogram exactly."""
        logit = math.log(risk) - math.log1p(-risk)
        shift = logit - (self.low + round((logit - self.low) / self.width) * self.width)
        return ScoreGrid(self.low + shift, self.high + shift, self.bins)


def logit(probs: np.ndarray | float) -> np.ndarray:
    """Log-odds of risks, clipped to 1e-12 from 0 and 1 (a risk that rounds to 0 or 1 stays finite)."""
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1 - 1e-12)
    return np.log(p) - np.log1p(-p)


def sigmoid(z: float) -> float:
    """The risk of a log-odds, in a form that neither overflows nor rounds a far-out one to 0."""
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def noisy_total(counts: np.ndarray) -> int:
    """Patients counted by a release's own noisy cells: their unclipped sum (zero-mean
    noise leaves it unbiased; clipping each cell at zero first adds the positive half of
    the noise in every empty one), never below 0."""
    return int(round(max(float(np.sum(counts)), 0.0)))


@dataclass
class ScoreSummary:
    """What a hospital releases about its predictions on one split: per true class, how
    many patients fall in each bin of each class's predicted risk (binary tasks: of the
    risk of the positive class), and the split's size. Multi-class tasks add the
    confusion matrix of the most likely class, which the histograms cannot give.

    A summary released under DP carries Gaussian noise (:meth:`noised`): counts may be
    fractional or negative. Metrics read the counts clipped at zero, which is
    post-processing; the server reads a model fitted to them instead (common.estimates).
    Binary decisions (sensitivity, ...) are read at a bin edge, so a threshold chosen on
    one summary applies exactly to another on the same grid.
    """

    histogram: np.ndarray  # (K_true, K_score, bins); binary: K_score = 1
    confusion: np.ndarray | None  # (K, K) rows true, columns predicted; None for binary tasks
    n: int  # patients evaluated: an exact count, released outside DP
    grid: ScoreGrid
    # Never released: a model's estimate of the same counts on a finer grid (common.estimates),
    # which AUROC reads instead of the bins, whose ties lose the order within a bin.
    fine: ScoreSummary | None = None
    # Whether AUPRC reads ``fine`` too: only for a fit that follows the upper tail (below)
    fine_auprc: bool = False
    # Never released: on a fit's ``fine`` summary, the AUROC of a steadier pair than its
    # counts' (common.estimates.tied_auroc), read instead of them where set; kept on ``fine``
    # so that a summary without its fine grid reads its own counts again
    ranking_auroc: float | None = None

    @classmethod
    def from_predictions(cls, y: np.ndarray, probs: np.ndarray, grid: ScoreGrid) -> ScoreSummary:
        y = np.asarray(y, dtype=np.int64)
        k = probs.shape[1]
        score_cols = [1] if k == 2 else list(range(k))
        idx = grid.index(logit(probs[:, score_cols]))
        hist = np.zeros((k, len(score_cols), grid.bins), dtype=np.float64)
        for j in range(len(score_cols)):
            np.add.at(hist[:, j, :], (y, idx[:, j]), 1)
        confusion = None
        if k > 2:
            confusion = np.zeros((k, k), dtype=np.float64)
            np.add.at(confusion, (y, probs.argmax(axis=1)), 1)
        return cls(histogram=hist, confusion=confusion, n=int(len(y)), grid=grid)

    @property
    def sensitivity(self) -> float:
        """L2 norm of one patient's contribution: one cell per score column (and one
        confusion cell): the Gaussian mechanism's noise is this times its multiplier."""
        return math.sqrt(self.histogram.shape[1] + (1 if self.confusion is not None else 0))

    def noised(self, noise_multiplier: float, rng: np.random.Generator) -> ScoreSummary:
        """The Gaussian mechanism (Dwork & Roth 2014, Thm A.1; accounted in RDP, Mironov
        2017): every count plus N(0, (noise_multiplier x sensitivity)^2), snapped to a grid
        so no low bits of the sample are released (common.gaussian_noise)."""
        std = noise_multiplier * self.sensitivity
        confusion = None if self.confusion is None else gaussian_release(self.confusion, std, rng)
        return ScoreSummary(gaussian_release(self.histogram, std, rng), confusion, self.n, self.grid)

    def __add__(self, other: ScoreSummary) -> ScoreSummary:
        if self.grid != other.grid or self.histogram.shape != other.histogram.shape:
            raise ValueError("score summaries on different grids do not add up")
        confusion = None if self.confusion is None else self.confusion + other.confusion
        return ScoreSummary(self.histogram + other.histogram, confusion, self.n + other.n, self.grid)

    def counts(self) -> np.ndarray:
        return np.maximum(self.histogram, 0.0)

    def binary_counts(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Per score bin, how many deaths and how many survivors: (positives, negatives).
        None for a multi-class summary or one without both outcomes."""
        if self.confusion is not None or self.histogram.shape[0] != 2:
            return None
        counts = self.counts()
        pos, neg = counts[1, 0], counts[0, 0]
        if pos.sum() <= 0 or neg.sum() <= 0:
            return None
        return pos, neg

    def metrics(self, threshold_edge: int | None = None, calibration: tuple[float, float] | None = None) -> Metrics:
        """Metrics from the counts; binary decisions flag bins ``threshold_edge`` and above
        (default: the edge nearest a risk of 0.5). ``calibration`` (scale, shift): the
        scores were taken before a recalibration logit -> scale x logit + shift, which
        changes no rank and no decision at an edge, only the risks the Brier score reads."""
        counts = self.counts()
        ranking = self.fine if self.fine is not None else self
        ranked = ranking.counts()
        k = counts.shape[0]
        classes = [1] if k == 2 else list(range(k))
        aurocs, aps = [], []
        for j, c in enumerate(classes):
            pos = ranked[c, j]
            aurocs.append(_auroc_from_counts(pos, ranked[:, j].sum(axis=0) - pos))
            # AUPRC weighs the upper tail of the survivors' scores, where real models'
            # scores are not normal: under a normal fit it reads the bins (on 5 real models
            # the fine grid read it 0.035-0.15 high, the fitted bins -0.03 to +0.05); a
            # skew-normal fit follows that tail, and its fine grid reads it (fine_auprc).
            ap_counts = ranked if self.fine_auprc else counts
            pos = ap_counts[c, j]
            aps.append(_ap_from_counts(pos, ap_counts[:, j].sum(axis=0) - pos))
        centres = self.grid.centre_logits()
        if calibration is not None:
            centres = calibration[0] * centres + calibration[1]
        risks = 1.0 / (1.0 + np.exp(-centres))
        if k == 2:
            brier = counts[1, 0] @ (1 - risks) ** 2 + counts[0, 0] @ risks**2
            edge = self.grid.edge_for_risk(0.5) if threshold_edge is None else threshold_edge
            pos, neg = counts[1, 0], counts[0, 0]
            confusion = np.array([[neg[:edge].sum(), neg[edge:].sum()], [pos[:edge].sum(), pos[edge:].sum()]])
        else:
            brier = sum(counts[c, j] @ (risks - (j == c)) ** 2 for c in range(k) for j in range(k))
            confusion = np.maximum(self.confusion, 0.0)
        ranking = {
            "auroc": ranking.ranking_auroc if k == 2 and ranking.ranking_auroc is not None else _nanmean(aurocs),
            "auprc": _nanmean(aps),
            "brier": float(brier) / self.n if self.n else float("nan"),
            "n": int(self.n),
        }
        return Metrics.from_parts(ranking, _threshold_metrics(confusion))

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The arrays of an evaluation record (their names are messages.SUMMARY_FIELDS)."""
        arrays = {
            "histogram": self.histogram.astype(np.float64),
            "n": np.array([self.n], dtype=np.int64),
            "grid": np.array([self.grid.low, self.grid.high, self.grid.bins], dtype=np.float64),
        }
        if self.confusion is not None:
            arrays["confusion"] = self.confusion.astype(np.float64)
        return arrays

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> ScoreSummary:
        low, high, bins = (float(v) for v in np.asarray(arrays["grid"]).reshape(-1)[:3])
        confusion = arrays.get("confusion")
        return cls(
            histogram=np.asarray(arrays["histogram"], dtype=np.float64),
            confusion=None if confusion is None else np.asarray(confusion, dtype=np.float64),
            n=int(np.asarray(arrays["n"]).reshape(-1)[0]),
            grid=ScoreGrid(low, high, int(bins)),
        )


def choose_threshold(summary: ScoreSummary) -> int | None:
    """The bin edge with the best event-1 score, min(Se, +P), the PhysioNet/CinC 2012
    Challenge's score, on a (pooled validation) summary.

    Only bin edges are candidates, so the choice reads nothing but the released
    histogram, and decisions at it read off any other summary on the same grid exactly.
    Ties go to the lowest edge (more patients flagged). None for multi-class tasks or a
    summary without both outcomes.
    """
    counts = summary.binary_counts()
    if counts is None:
        return None
    pos, neg = counts
    tp = np.cumsum(pos[::-1])[::-1]  # positives at or above each bin edge
    fp = np.cumsum(neg[::-1])[::-1]
    sensitivity = tp / pos.sum()
    precision = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=(tp + fp) > 0)
    score = np.minimum(sensitivity, precision)
    # Edge 0 would flag everyone (its bin also holds every risk below it): not a choice.
    return 1 + int(np.argmax(score[1:]))


# An interval this wide (of metrics that live in 0-1) says no more than a guess: a new
# user's report showed a hospital's "AUROC 0.785 (0.008-1.000)", which a clinician reads as
# an AUROC near 0.8 and which the release cannot tell from a coin or its mirror image.
UNINFORMATIVE_SPAN = 0.9


def with_interval(value: float | None, interval: list[float] | tuple[float, float] | None, digits: int = 3,
                  what: str = "", dp: bool = True) -> str:
    """A metric read from DP releases as the console and the report show it: its value
    and its rough interval ("0.812 (0.761-0.858)"); no interval, no number: it could not
    be estimated (a fit that fails on counts the noise drowns gave numbers like 5e-185).
    ``dp`` False: an exact value with its sampling interval (a hospital's own stays), a
    number whatever its interval's width."""
    if value is None or interval is None or not math.isfinite(value):
        return "cannot be estimated" + (f" ({what})" if what else "")
    low, high = interval
    shown = f"{low:.{digits}f}-{high:.{digits}f}"
    if dp and round(low, digits) <= 0 and round(high, digits) >= 1:  # a share anywhere from 0 to 1: no information
        return "cannot be estimated (its interval is all of 0-1)"
    if dp and round(high, digits) - round(low, digits) >= UNINFORMATIVE_SPAN - 10 ** -(digits + 3):  # as printed
        return f"cannot be estimated (its interval, {shown}, spans nearly all of 0-1)"
    return f"{value:.{digits}f} ({shown})"


def threshold_for_rate(summary: ScoreSummary, rate: float) -> float | None:
    """The risk at or above which ``rate`` of a (pooled validation) summary's patients
    lie, both outcomes together: a target flag rate. Read from the finer grid a fitted
    summary carries (``common.estimates``: the fitted distributions, which smooth the DP
    noise) and interpolated in logit within its bin, so it is not tied to the release's
    coarse edges, where one edge more or less flagged 25% or 64% of patients. None for
    a summary with no patients in it."""
    read = summary.fine if summary.fine is not None else summary
    counts = read.counts()[:, 0, :].sum(axis=0)  # every patient's score, whatever the outcome (binary: one column)
    total = counts.sum()
    if not total > 0 or not 0 < rate < 1:
        return None
    above = np.cumsum(counts[::-1])[::-1]  # patients at or above each bin's lower edge
    want = rate * total
    j = int(np.flatnonzero(above >= want)[-1]) if (above >= want).any() else 0  # the bin the target falls in
    inside = above[j] - (above[j + 1] if j + 1 < len(above) else 0.0)
    reach = want - (above[j + 1] if j + 1 < len(above) else 0.0)  # of that bin's patients, how many from the top
    share = float(np.clip(reach / inside, 0.0, 1.0)) if inside > 0 else 0.0
    logit = read.grid.edge_logit(j + 1) - share * read.grid.width
    return float(1.0 / (1.0 + math.exp(-logit)))


def rate_at_risk(summary: ScoreSummary, risk: float) -> float | None:
    """The share of a (pooled validation) summary's patients at or above ``risk``, both
    outcomes together: the inverse of :func:`threshold_for_rate`, read from the same
    finer grid and interpolated in logit within its bin. None for a summary with no
    patients in it or a risk outside (0, 1)."""
    read = summary.fine if summary.fine is not None else summary
    counts = read.counts()[:, 0, :].sum(axis=0)
    total = counts.sum()
    if not total > 0 or not 0 < risk < 1:
        return None
    logit = math.log(risk) - math.log1p(-risk)
    position = (logit - read.grid.low) / read.grid.width  # in bins from the grid's low edge
    j = int(np.clip(math.floor(position), 0, len(counts) - 1))
    inside = float(np.clip(position - j, 0.0, 1.0))  # of bin j, the share below the risk (0 or 1 past the ends)
    above = counts[j + 1:].sum() + (1.0 - inside) * counts[j]
    return float(above / total)


def pooled(summaries: list[ScoreSummary]) -> ScoreSummary | None:
    if not summaries:
        return None
    total = summaries[0]
    for s in summaries[1:]:
        total = total + s
    return total


BUDGET_SPENT = 0.0005  # a budget with less left reads "less than 0.001 remains" at three decimals: spent


def format_budget_left(left: float | None) -> str:
    """A budget's remaining epsilon at the three decimals every epsilon prints with: a
    budget spent to its last 1e-5 reads "under 0.001", not 6.65e-05 or 0.000 beside 1.000
    (the report, the officer's statement and `fedgru status` say it alike)."""
    if left is not None and left < BUDGET_SPENT:  # a rounding error's -1e-06 too: spent
        return "under 0.001"
    return format_number(left, 3)


def format_number(value: float | int | None, digits: int = 3) -> str:
    """How fedgru prints a number: fixed digits, tiny values in g-notation, 'n/a' for
    missing, NaN and infinite values."""
    if value is None:
        return "n/a"
    if isinstance(value, bool) or isinstance(value, (int, np.integer)):
        return str(value)
    value = float(value)
    if not math.isfinite(value):
        return "n/a"
    return f"{value:.{digits}g}" if 0 < abs(value) < 1e-3 else f"{value:.{digits}f}"


METRIC_NAMES = {"auroc": "AUROC", "auprc": "AUPRC", "accuracy": "accuracy", "sensitivity": "sensitivity",
                "specificity": "specificity", "f1": "F1", "brier": "Brier",
                "event1_score": "min(Se,PPV)"}  # PhysioNet/CinC 2012's "event-1": a word a clinician does not know


def format_metrics(m: Metrics, intervals: dict[str, list[float]] | None = None, dp: bool = False) -> str:
    """One line of metrics. ``dp``: read from DP releases, so each carries its interval
    from ``intervals`` (or says it cannot be estimated); exact ones stand alone, or with
    their sampling interval where ``intervals`` has one (:func:`sampling_intervals`)."""
    if dp and not intervals:
        return f"cannot be estimated: the DP noise drowns these counts (n={m.n})"
    intervals = intervals or {}
    if dp:
        parts = [f"{label} {with_interval(getattr(m, key), intervals.get(key))}" for key, label in METRIC_NAMES.items()]
    else:
        parts = [f"{label} " + (with_interval(getattr(m, key), intervals[key], dp=False) if key in intervals
                                 else format_number(getattr(m, key))) for key, label in METRIC_NAMES.items()]
    return "  ".join(parts) + f"  (n={m.n})"
