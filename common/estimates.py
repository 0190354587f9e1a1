"""Reading metrics from DP score histograms: a fitted binormal model instead of clipped counts.

Why: a hospital's released score histogram (:class:`~common.metrics.ScoreSummary`) carries
Gaussian noise in every cell, a standard deviation of several patients at fedgru's
default test epsilon. Clipped at zero, the noise no longer averages out: every empty
bin gains a positive count, each class's histogram spreads over the whole grid, and
the AUROC read from it is pulled towards 0.5 (measured on the default's size, 800 test
patients over 4 hospitals: 0.137 too low with 20 bins, docs/dp-estimates.md), the
Brier score up.

The fix is post-processing of the release, which costs no privacy (Dwork & Roth 2014,
Prop. 2.1): each class's histogram (each row: true class x score column) is replaced by
the expected counts of the normal distribution of logits that fits it best. A normal
per class is the binormal ROC model (Dorfman & Alf 1969; Metz 1978), which describes
the score distributions of most fitted classifiers well in logit. The noise is iid
Gaussian with the same variance in every cell, so unweighted least squares is the
maximum-likelihood fit. The split's size ``n`` is released exactly, so the classes'
fitted masses are then moved (a least-squares step, each row by the inverse of how much
its mass is pinned down by its shape) to add up to it: this takes noise out of the
prevalence and makes the Brier score a mean over ``n`` patients again.

The result is a :class:`ScoreSummary` on the same grid, so every metric (AUROC, AUPRC,
Brier, decisions at a bin edge, calibration) and ``choose_threshold`` read it unchanged.
It also carries the fitted distributions on a grid 8 times finer (``ScoreSummary.fine``),
which AUROC reads (AUPRC too under the skew-normal; under the normal it reads the bins, see
ScoreSummary.metrics): counts in the bins
tie every pair of patients in one bin, which costs 0.02-0.09 of AUROC at 10 bins even
without noise; the fit knows the order within a bin. A row with (almost) no mass, or whose fit fails, keeps its clipped counts.
Exact (non-DP) summaries are never passed through this: binned exact counts are better.
How far such a reading may be from the exact value, and how often that held, is
:mod:`common.intervals`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from .metrics import ScoreGrid, ScoreSummary

ESTIMATORS = ("skewnormal", "binormal", "binned")
MAX_SKEW = 5.0  # the skew-normal's shape within +-this (5: skewness 0.85, near the family's limit of 0.995)
MIN_MASS = 1.0  # a row whose noisy counts add up to less than one patient is not fitted
MIN_SD = 0.25  # the fitted sd is at least this many bin widths (scores of a model whose scale learnt little are narrow)
SUB_BINS = 8  # the fitted distributions are also given on bins this much finer, for AUROC and AUPRC
# A class is read only when its released count stands this many sds of the noise on that
# count (noise sd x sqrt(bins)) above nothing: below, the fit describes the noise, not the
# patients (a class with no patients at all passes 2 sds in about 2% of releases). The
# default's pooled test release (about 110 deaths; the noise on their count about 31)
# passes; a single hospital's (about 16 deaths; about 15) does not, and the report says so.
MIN_SIGNAL = 2.0
Z_99 = 2.576  # the normal's 99.5% quantile: a two-sided 99% range, a one-sided 99.5% bound
# A group of test patients (evaluation.subgroups) is read only when its noisy counts stand
# MIN_SIGNAL sds above nothing with Z_99 sds to spare (the count's one-sided 99.5% lower
# bound still at MIN_SIGNAL sds). Per question, not a joint level: the default's 13 groups
# ask 26 such questions of one release (a joint 1% would need about 3.36 sds each). It is
# set by what it does: most groups' true death counts sit near 1 sd, and at MIN_SIGNAL
# alone some row was read from noise in 44% of default runs (expected rows 0.55, computed
# from set A's group counts; a new user's run showed "female: 147 deaths" of the 112 test
# deaths there are); with the margin, expected rows read from noise are about 0.
GROUP_READ_MARGIN = Z_99


def _cdf(z: np.ndarray) -> np.ndarray:
    from scipy.special import ndtr

    return ndtr(z)


def grid_edges(g: ScoreGrid) -> np.ndarray:
    return g.low + np.arange(g.bins + 1) * g.width


def _shape(edges: np.ndarray, mu: float, sd: float, skew: float = 0.0) -> np.ndarray:
    """Share of N(mu, sd^2) in each bin, or with ``skew`` of the skew-normal with location
    ``mu``, scale ``sd`` and that shape (Azzalini 1985); the first and last bins are
    open-ended."""
    if skew:
        from scipy.special import owens_t

        z = (edges - mu) / sd
        c = _cdf(z) - 2 * owens_t(z, skew)  # the skew-normal's cdf (scipy.stats.skewnorm's, without its overhead)
        # Phi(z) - 2T(z, a) cancels in the far tails: rounding can leave -1e-14 there, and a
        # cdf that dips; kept within [0, 1] and nondecreasing, no share is negative
        c = np.maximum.accumulate(np.clip(c, 0.0, 1.0))
    else:
        c = _cdf((edges - mu) / sd)
    c[0], c[-1] = 0.0, 1.0
    return np.diff(c)


def _jacobian(edges: np.ndarray, p: np.ndarray, skewed: bool) -> np.ndarray:
    """d(expected counts)/d(mass, loc, log scale[, skew]) at ``p``, for least squares.
    The cdf is F(z) = Phi(z) - 2 T(z, a) with z = (edge - loc) / scale: dF/dz is the
    density 2 phi(z) Phi(a z), and dT/da = exp(-z^2 (1 + a^2) / 2) / (2 pi (1 + a^2))."""
    scale, skew = math.exp(p[2]), (p[3] if skewed else 0.0)
    z = (edges - p[1]) / scale
    density = 2 * np.exp(-z * z / 2) / math.sqrt(2 * math.pi) * _cdf(skew * z)
    rows = [-density / scale, -density * z]
    if skewed:
        rows.append(-np.exp(-z * z * (1 + skew * skew) / 2) / (math.pi * (1 + skew * skew)))
    d = np.stack(rows)
    d[:, 0] = d[:, -1] = 0.0  # the end bins are open-ended
    return np.column_stack([_shape(edges, p[1], scale, skew), p[0] * np.diff(d, axis=1).T])


def _fittable(counts: np.ndarray) -> bool:
    """A row with finite counts and at least MIN_MASS patients, some of them in a bin."""
    return bool(np.isfinite(counts).all() and counts.sum() >= MIN_MASS and np.maximum(counts, 0.0).sum() > 0)


def _best_fit(counts: np.ndarray, edges: np.ndarray, starts: list[np.ndarray], lower: np.ndarray, upper: np.ndarray,
              skewed: bool) -> np.ndarray | None:
    """The parameters (mass, loc, log scale[, skew]) whose expected counts are nearest
    ``counts`` in least squares, the best from ``starts`` within the bounds; None when
    every start fails."""
    from scipy.optimize import least_squares

    def residuals(p: np.ndarray) -> np.ndarray:
        return p[0] * _shape(edges, p[1], math.exp(p[2]), p[3] if skewed else 0.0) - counts

    x_scale = [max(np.maximum(counts, 0.0).sum(), 1.0)] + [1.0] * (len(lower) - 1)
    best = None
    for p0 in starts:
        try:
            r = least_squares(residuals, np.clip(p0, lower, upper), jac=lambda q: _jacobian(edges, q, skewed),
                              bounds=(lower, upper), x_scale=x_scale)
        except (ValueError, FloatingPointError):
            continue
        if np.isfinite(r.x).all() and np.isfinite(r.cost) and (best is None or r.cost < best.cost):
            best = r
    return None if best is None else best.x


def fit_normal(counts: np.ndarray, edges: np.ndarray) -> tuple[float, float, float] | None:
    """(mass, mean, sd) of the normal distribution whose expected counts over the bins
    (``edges``: bins + 1 logits; the end bins open-ended) are nearest ``counts`` in least
    squares. None when the row has almost no mass or the fit fails.

    Bounds keep the fit sane on a few noisy cells: the sd between a quarter of a bin
    (narrower is not told apart by the bins) and the grid's width; the mean within half the
    grid's width beyond either end; the mass between 0 and twice the clipped counts' sum
    plus one. Two starts (the clipped counts' mean and sd; their fullest bin with sd 1),
    the better fit kept.
    """
    counts = np.asarray(counts, dtype=np.float64)
    if not _fittable(counts):
        return None
    clipped = np.maximum(counts, 0.0)
    width, span = edges[1] - edges[0], edges[-1] - edges[0]
    lower = np.array([0.0, edges[0] - span / 2, math.log(width * MIN_SD)])
    upper = np.array([2 * clipped.sum() + 1, edges[-1] + span / 2, math.log(span)])
    centres = (edges[:-1] + edges[1:]) / 2
    mean = float(clipped @ centres / clipped.sum())
    sd = float(np.sqrt(clipped @ (centres - mean) ** 2 / clipped.sum()))
    starts = [(clipped.sum(), mean, sd), (clipped.sum(), float(centres[np.argmax(clipped)]), 1.0)]
    found = _best_fit(counts, edges, [np.array([m, mu, math.log(max(s, 1e-9))]) for m, mu, s in starts], lower, upper,
                      skewed=False)
    if found is None:
        return None
    mass, mu, log_sd = (float(v) for v in found)
    return mass, mu, math.exp(log_sd)


@dataclass(frozen=True)
class RowFit:
    """A histogram row's fitted distribution of logits: its mass (patients), location,
    scale and skew-normal shape (0: the normal, ``loc`` its mean and ``scale`` its sd)."""

    mass: float
    loc: float
    scale: float
    skew: float = 0.0

    @property
    def sd(self) -> float:
        """The fitted distribution's standard deviation (Azzalini 1985: scale x sqrt(1 - 2 d^2 / pi),
        d = skew / sqrt(1 + skew^2))."""
        d2 = self.skew**2 / (1 + self.skew**2)
        return self.scale * math.sqrt(1 - 2 * d2 / math.pi)

    def shares(self, edges: np.ndarray) -> np.ndarray:
        return _shape(edges, self.loc, self.scale, self.skew)

    def sample(self, rng: np.random.Generator) -> np.ndarray:
        """As many logits as the fit holds patients, drawn from it."""
        size = int(round(self.mass))
        if not self.skew:
            return rng.normal(self.loc, self.scale, size)
        from scipy.stats import skewnorm

        return skewnorm.rvs(self.skew, loc=self.loc, scale=self.scale, size=size, random_state=rng)


def fit_skew_normal(counts: np.ndarray, edges: np.ndarray, start: RowFit | None = None) -> RowFit | None:
    """The skew-normal (Azzalini 1985) whose expected counts over the bins are nearest
    ``counts`` in least squares, started from :func:`fit_normal`'s normal (shape 0) and
    from a shape of 2 leaning as the counts do, with the same mean and sd; shape within
    +-``MAX_SKEW``, the other bounds as :func:`fit_normal`'s. None where that finds no
    normal.

    Why a fourth parameter: a fitted model's logits for the larger class lean towards the
    other class. On 20 default models' exact test scores the survivors' logits had skewness
    0.4-0.8; a normal fitted to them put too few above a threshold one sd above their mean,
    and the specificity it read was 0.041 too high on average without any noise (0.000
    with the skew-normal), while the deaths' fit hardly moved (simulations.estimator_study).

    ``start``: one start only, from this fit (the bootstrap's, whose releases are drawn
    from it).
    """
    counts = np.asarray(counts, dtype=np.float64)
    clipped = np.maximum(counts, 0.0)
    if start is not None:
        if not _fittable(counts):
            return None
        mass, mu, sd = start.mass, start.loc, start.scale
    else:
        base = fit_normal(counts, edges)
        if base is None:
            return None
        mass, mu, sd = base
    width, span = edges[1] - edges[0], edges[-1] - edges[0]
    lower = np.array([0.0, edges[0] - span, math.log(width * MIN_SD), -MAX_SKEW])
    upper = np.array([2 * clipped.sum() + 1, edges[-1] + span, math.log(span), MAX_SKEW])

    if start is not None:
        starts = [np.array([start.mass, start.loc, math.log(start.scale), start.skew])]
    else:  # from the normal, and from the shape the clipped counts lean to
        lean_of_counts = float(clipped @ (((edges[:-1] + edges[1:]) / 2 - mu) ** 3))
        starts = []
        for skew in (0.0, math.copysign(2.0, lean_of_counts)):
            # the skew-normal with this shape and the normal fit's mean and sd
            lean = skew / math.sqrt(1 + skew * skew)
            scale = sd / math.sqrt(1 - 2 * lean * lean / math.pi)
            starts.append(np.array([mass, mu - scale * lean * math.sqrt(2 / math.pi), math.log(scale), skew]))
    found = _best_fit(counts, edges, starts, lower, upper, skewed=True)
    if found is None:  # the start itself (a skew-normal), or the normal the cold starts came from
        return start if start is not None else RowFit(mass, mu, sd)
    mass, loc, log_scale, skew = (float(v) for v in found)
    return RowFit(mass, loc, math.exp(log_scale), skew)


def fit_row(counts: np.ndarray, edges: np.ndarray, estimator: str, start: RowFit | None = None) -> RowFit | None:
    """A row's fit under ``estimator`` (``skewnormal`` or ``binormal``), or None;
    ``start``: the skew-normal's one start."""
    if estimator == "skewnormal":
        return fit_skew_normal(counts, edges, start)
    found = fit_normal(counts, edges)
    return RowFit(*found) if found is not None else None


def fine_grid(grid: ScoreGrid) -> tuple[ScoreGrid, int]:
    """The grid the fitted distributions are also given on, for the AUROC: each
    bin cut into ``SUB_BINS``, and as many bins again beyond the ends (half on each side);
    and the fine index of the first (in-range) bin's first sub-bin."""
    margin = math.ceil(grid.bins / 2)
    fine = ScoreGrid(grid.low - margin * grid.width, grid.high + margin * grid.width, (grid.bins + 2 * margin) * SUB_BINS)
    return fine, margin * SUB_BINS


def binormal_counts(summary: ScoreSummary, estimator: str = "binormal",
                    starts: dict[int, RowFit] | None = None, noise_sd: float | None = None) -> ScoreSummary:
    """The summary with each histogram row replaced by its fitted normal's (``estimator``
    skewnormal: skew-normal's) expected counts
    (rows that cannot be fitted: their counts clipped at zero), the masses of each score
    column's rows moved to add up to the exact ``n``; with the same on a finer grid
    (``ScoreSummary.fine``) for the ranking metrics. The confusion matrix (multi-class)
    stays as released; metrics read it clipped. ``noise_sd``: the release's noise on each
    cell, which decides how a binary skew-normal reading's AUROC is read
    (:func:`reads_tied`; None, not known: from the tied pair)."""
    edges = grid_edges(summary.grid)
    fine, offset = fine_grid(summary.grid)
    fine_edges = grid_edges(fine)
    hist = summary.histogram
    out = np.maximum(hist, 0.0)
    k_true, k_score, bins = hist.shape
    # Unfitted rows: each bin's clipped count spread evenly over its sub-bins (ties, as in the bins).
    out_fine = np.zeros((k_true, k_score, fine.bins))
    out_fine[:, :, offset:offset + bins * SUB_BINS] = np.repeat(out, SUB_BINS, axis=2) / SUB_BINS
    used: dict[int, RowFit] = {}  # the fits the counts were drawn from (binary: the one score column's)
    for j in range(k_score):
        fitted: dict[int, RowFit] = {}
        for c in range(k_true):
            fit = fit_row(hist[c, j], edges, estimator, (starts or {}).get(c) if k_score == 1 else None)
            if fit is not None:
                fitted[c] = fit
        # Rows left unfitted hold (almost) no one: their noisy sum, an unbiased estimate, counts.
        unfitted = sum(max(float(hist[c, j].sum()), 0.0) for c in range(k_true) if c not in fitted)
        gap = summary.n - sum(f.mass for f in fitted.values()) - unfitted
        # Least squares under the constraint sum(mass) = n, the shapes g held: each row's
        # mass moves by gap x (1/|g_r|^2) / sum(1/|g|^2) (a Lagrange step).
        shapes = {c: f.shares(edges) for c, f in fitted.items()}
        loose = {c: 1.0 / max(float(g @ g), 1e-12) for c, g in shapes.items()}
        total = sum(loose.values())
        for c, f in fitted.items():
            mass = f.mass + (gap * loose[c] / total if summary.n > 0 else 0.0)
            if mass <= 1e-9:
                # The constraint took all of this row's mass (noise-only counts of a small
                # class): like a row too light to fit, it keeps its clipped counts, so the
                # class is not read as absent (an AUROC of NaN in a small test release).
                continue
            out[c, j] = mass * shapes[c]
            out_fine[c, j] = mass * f.shares(fine_edges)
            used[c] = replace(f, mass=mass)
    # only from fits the counts above were drawn from (one whose mass the constraint took kept its clipped counts)
    tied = (tied_auroc([used.get(0), used.get(1)], hist[:, 0], edges, fine_edges)
            if estimator == "skewnormal" and (k_true, k_score) == (2, 1) and reads_tied(used, summary.grid, noise_sd)
            else None)
    return ScoreSummary(out, summary.confusion, summary.n, summary.grid,
                        fine=ScoreSummary(out_fine, None, summary.n, fine, ranking_auroc=tied),
                        fine_auprc=estimator == "skewnormal")


# The AUROC of a binary release is read from a pair whose smaller class (deaths) is a
# normal with the larger class's sd (the equal-variance binormal model, Green & Swets 1966;
# Hanley 1988), not from its own free fit. The smaller class's counts carry the most noise
# for their size, and a free scale and shape read from them swung the AUROC: on 310 fresh
# test releases of 31 default models (2026-12-06) the free skew-normal pair read it with
# rmse 0.085, 8.4% of readings more than 0.15 off and 4.2% more than 0.2 below (a README
# run printed 0.467 for an exact 0.829); the tied pair rmse 0.067, 2.6% and 0.6%, bias
# -0.006 (the deaths' exact sd was 1.14 times the survivors' on average). Only the AUROC:
# the same tie read AUPRC 0.067 low (it weighs the deaths' upper tail), and sensitivity,
# F1 and the thresholds keep the free fits.
#
# The tie pays for its steadiness with the bias of a shape it imposes, so it is used only
# where the noise is large for the smaller class: its noise on the class's total
# (noise_sd sqrt(bins)) at least TIED_FROM of the class's fitted mass. The same 31 models'
# pooled test histograms released again with the noise scaled by 1 to 0.05 (5 draws each,
# 1,240 readings, 2026-12-06): grouped by that share, the tie's rmse was 0.023-0.029 below
# 0.08 against the free fit's 0.014-0.025, equal near 0.08-0.14 (0.031-0.041 against
# 0.035-0.037), and 0.041-0.056 above 0.14 against 0.053-0.076. The default's test
# release sits at about 0.28 (9.7 a cell, 10 bins, about 110 deaths); secure
# aggregation's at about 0.2; a much larger federation's, or exact counts, below 0.1.
TIED_FROM = 0.1


def reads_tied(fits: dict[int, RowFit], grid: ScoreGrid, noise_sd: float | None) -> bool:
    """Whether the AUROC of a binary release with these class ``fits`` is read from the
    tied pair: where its noise is not known (None, NaN, negative), or where the noise on
    the smaller class's total is at least TIED_FROM of its fitted mass."""
    if noise_sd is None or not noise_sd >= 0 or not math.isfinite(noise_sd) or len(fits) < 2:
        return True  # unknown (or not a noise at all), or a class missing: as before the rule
    small = min(f.mass for f in fits.values())
    return small <= 0 or noise_sd * math.sqrt(grid.bins) >= TIED_FROM * small


def tied_auroc(fits: list[RowFit | None], rows: np.ndarray, edges: np.ndarray, fine_edges: np.ndarray
               ) -> float | None:
    """The AUROC of ``fits``'s larger class against a normal refitted to the smaller
    class's counts (``rows``: the release's two rows) with the larger class's sd; None
    where either fit is missing."""
    if any(f is None for f in fits):
        return None
    small = 1 if fits[1].mass <= fits[0].mass else 0
    large = 1 - small
    found = _fit_with_sd(rows[small], edges, fits[small], fits[large].sd)
    if found is None:
        return None
    pair = [found, fits[large]] if small == 0 else [fits[large], found]
    return fitted_auroc(pair, fine_edges)


def _fit_with_sd(counts: np.ndarray, edges: np.ndarray, start: RowFit, sd: float) -> RowFit | None:
    """The normal of standard deviation ``sd`` whose expected counts are nearest ``counts``
    in least squares (mass and mean free, within :func:`fit_normal`'s bounds), started
    from ``start``'s mass and mean."""
    from scipy.optimize import least_squares

    clipped = np.maximum(counts, 0.0)
    span = edges[-1] - edges[0]
    lower, upper = np.array([0.0, edges[0] - span / 2]), np.array([2 * clipped.sum() + 1, edges[-1] + span / 2])
    mean = start.loc + start.scale * (start.skew / math.sqrt(1 + start.skew**2)) * math.sqrt(2 / math.pi)
    try:
        r = least_squares(lambda p: p[0] * _shape(edges, p[1], sd) - counts,
                          np.clip([start.mass, mean], lower, upper), bounds=(lower, upper),
                          x_scale=[max(clipped.sum(), 1.0), 1.0])
    except (ValueError, FloatingPointError):
        return None
    return RowFit(float(r.x[0]), float(r.x[1]), sd) if np.isfinite(r.x).all() else None


# A release ranks its patients only between bins: where at least this share of the pairs
# of a death and a survivor share one bin, the histogram cannot say which of a pair
# scores higher, and no fit can (a fit places a class anywhere inside one bin: a 1-round
# model, all scores in one bin, read AUROC 0.045 for an exact 0.704, its interval
# 0.000-0.125). Measured on synthetic default-sized releases with the logits squeezed
# (bench_dp_estimates' "narrow" at scale 0.05-1): pairs in one bin 0.58-0.87 at scale 0.1
# (skew-normal AUROC error -0.17, sd 0.33; intervals held 6 of 12), 0.41-0.59 at 0.2
# (-0.09, sd 0.15; 8 of 12), 0.25-0.45 at 0.3 (+0.00, sd 0.08; 10 of 12). Five real
# trained models' pooled test releases: 0.17-0.22 exact, at most 0.30 with the noise.
MAX_PAIRS_IN_ONE_BIN = 0.4
# The same scores can straddle a bin edge (a grid anchored at a threshold inside them):
# then fewer pairs share a bin, but both classes' fits are narrower than a bin. A review
# (2026-12-06) read AUROC 0.60 (0.39-0.68) for an exact 0.80 that way. Five real trained
# models' pooled test releases, 60 noise draws each on three grids: the wider class's
# fitted sd at least 0.76 of a bin; squeezed synthetic scores straddling the anchored edge
# (logit sd 0.075-0.3): the two rules together caught 18-22 of 30 releases each, and those
# they missed read AUROC 0.12-0.15 low on average (docs/dp-estimates.md).
MIN_RANKING_SD = 0.5  # in bin widths
# A group's row has 5 bins of 2 log-odds, where the pooled release has 10 of 1: counted in
# its own bins, the rule withheld the AUROC of rows whose wider class spread 0.5-1 log-odds,
# yet those read it as well as the rows it printed. 10 default models' test groups (400
# stays each) released with 0.1 to 0.015 of the default's noise, 5 draws (simulations.
# subgroup_study, 2026-12-06): withheld for that spread alone 173 rows, AUROC bias -0.010
# to +0.021, rmse 0.035-0.068; printed 640 rows, bias -0.025 to -0.006, rmse 0.047-0.095.
# So a group's row counts the spread in the pooled release's bins (server.results); too
# many pairs in one bin still withholds it (291 rows, rmse 0.070-0.087, bias -0.03 to -0.08).
# What it gives up: squeezed scores (logit sd 0.15-0.5) astride the anchored edge of a
# coarse grid fit spreads of 0.5-0.96 log-odds, so the spread rule no longer withholds
# them; only the pairs rule does (a review, 2026-12-06: 86 of 96 such synthetic rows
# printed, AUROC off by -0.08 to +0.01, the five intervals drawn all held the exact value).


def class_fits(summary: ScoreSummary, estimator: str) -> list[RowFit | None]:
    """Each outcome's fitted distribution of a binary release (the normal's for ``binned``,
    which has no fit of its own): what the intervals draw from."""
    edges = grid_edges(summary.grid)
    return [fit_row(summary.histogram[c, 0], edges, "binormal" if estimator == "binned" else estimator) for c in (0, 1)]


def pairs_in_one_bin(summary: ScoreSummary) -> float | None:
    """Of all pairs of a patient with the outcome and one without, the share whose scores
    fall into the same bin of the release (its counts clipped at zero); None for a
    release that is not binary or lacks a class. Post-processing of the release."""
    hist = summary.histogram
    if hist.shape[:2] != (2, 1):
        return None
    neg, pos = np.maximum(hist[0, 0], 0.0), np.maximum(hist[1, 0], 0.0)
    if not (pos.sum() > 0 and neg.sum() > 0):
        return None
    return float((pos * neg).sum() / (pos.sum() * neg.sum()))


def ranks_patients(summary: ScoreSummary, fits: list[RowFit | None] | None = None,
                   estimator: str = "skewnormal", spread_unit: float | None = None) -> bool:
    """Whether the release's bins tell the two outcomes' scores apart enough to read a
    ranking metric (AUROC, AUPRC) from it: fewer than :data:`MAX_PAIRS_IN_ONE_BIN` of
    the pairs share a bin, and the wider of the two classes' fitted distributions (``fits``,
    fitted here when not given) spreads over more than :data:`MIN_RANKING_SD` of a bin.
    ``spread_unit``: the width in log-odds that spread is counted in, where it is not the
    release's own bin (a group's coarse row: the pooled release's bin; see MIN_RANKING_SD)."""
    share = pairs_in_one_bin(summary)
    if share is None or share >= MAX_PAIRS_IN_ONE_BIN:
        return False
    spread = [f.sd for f in (fits if fits is not None else class_fits(summary, estimator)) if f is not None]
    return not spread or max(spread) > MIN_RANKING_SD * (spread_unit or summary.grid.width)


def observed_over_predicted(summary: ScoreSummary) -> float:
    """The observed rate of the outcome over the mean predicted risk (1: calibrated in the
    large), from a binary summary's counts at its bins' centre risks (a fitted summary's
    finer grid where it has one, as ``common.reliability.reliability`` reads them)."""
    summary = summary.fine if summary.fine is not None else summary
    counts = summary.counts()
    total = counts[0, 0] + counts[1, 0]
    predicted = float(total @ (1 / (1 + np.exp(-summary.grid.centre_logits()))))
    return float(counts[1, 0].sum()) / predicted if predicted > 0 else float("nan")


def fitted_auroc(fits: list[RowFit], edges: np.ndarray) -> float:
    """The AUROC of the two classes' fitted distributions (P(a patient with the outcome
    scores above one without), ties halved), on the bins of ``edges`` (a fine grid)."""
    negative, positive = fits[0].shares(edges), fits[1].shares(edges)
    below = np.cumsum(negative) - negative / 2
    return float(positive @ below / max(negative.sum() * positive.sum(), 1e-12))


def without_fine(summary: ScoreSummary) -> ScoreSummary:
    """The fitted counts in the release's bins only: ranking metrics then tie the patients
    of one bin instead of ordering them as the fitted normals do."""
    return replace(summary, fine=None)


def for_metrics(summary: ScoreSummary | None, estimator: str, dp: bool, noise_sd: float | None = None
                ) -> ScoreSummary | None:
    """What metrics read for a released summary: the fitted counts for a DP release under
    ``evaluation.estimator: skewnormal`` or ``binormal``; otherwise the summary itself
    (binned counts, clipped at zero by the metrics). ``noise_sd``: the release's noise on
    each cell, where known (it chooses how the AUROC is read: :func:`reads_tied`)."""
    if summary is None or not dp or estimator == "binned":
        return summary
    if estimator not in ("binormal", "skewnormal"):
        raise ValueError(f"unknown estimator {estimator!r} (one of {', '.join(ESTIMATORS)})")
    return binormal_counts(summary, estimator, noise_sd=noise_sd)


def estimator_used(estimator: str, dp: bool) -> str:
    """The estimator that produced a run's metrics: exact histograms are always read binned."""
    return estimator if dp else "binned"
