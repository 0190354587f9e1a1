"""How far the monitor's thresholds, read from DP releases, may be from their patients' exact ones.

Each checkpoint hour's threshold is the risk that flags a share of the pooled validation
stays' hour-h risks (:meth:`server.results.Reader.hour_thresholds`), and the monitor's
margin the excess over those thresholds that ``monitor_rate`` of them reach at some hour
(:meth:`~server.results.Reader.onset_margin`): both are quantiles read from one-row noisy
histograms. Their intervals are a parametric bootstrap of the reading's error (Efron &
Tibshirani 1993, ch. 6 and 13), as :func:`common.intervals.metric_intervals` makes the
metrics': patients drawn from the row's fitted distribution, binned, noised as the
hospitals noised them (Gaussian, or each hospital's discrete Laplace) and read again; the
error is the drawn reading less the drawn patients' exact quantile, in log-odds. Under a
clinical level the share an hour aims at is itself read from the hour-48 validation
release (:meth:`~server.results.Reader.flag_rate`), so each draw also redraws that
release and the share's error travels into the hour's. Post-processing of the releases:
no privacy cost. Rough, as the metrics' intervals are: their coverage of the exact value
is measured over runs (``simulations.threshold_coverage``) and printed, not assumed
(``common.intervals.THRESHOLD_INTERVAL_COVERAGE``). The monitor's flag levels (an hour's
threshold moved up by the margin) get theirs from the same draws, paired
(:func:`flag_level_errors`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from common import laplace
from common.estimates import RowFit, fit_row, grid_edges
from common.intervals import read_redrawn, reading_bounds
from common.metrics import ScoreGrid, ScoreSummary, logit, rate_at_risk, threshold_for_rate


@dataclass(frozen=True)
class ReleaseNoise:
    """A pooled release's noise on each cell, as the hospitals added it: Gaussian of sd
    ``gaussian_sd`` (already summed over hospitals), plus one discrete Laplace draw of each
    of ``laplace_sds`` (one per hospital whose release carried it)."""

    gaussian_sd: float = 0.0
    laplace_sds: tuple[float, ...] = ()

    @property
    def sd(self) -> float:
        """The sum's sd: what the reading is told."""
        return math.sqrt(self.gaussian_sd**2 + sum(s**2 for s in self.laplace_sds))

    def draw(self, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
        noise = rng.normal(0.0, self.gaussian_sd, shape) if self.gaussian_sd > 0 else np.zeros(shape)
        for sd in self.laplace_sds:
            noise += laplace.sample(sd, shape, rng)  # numpy's sampler: a study's redraw, not a release
        return noise


@dataclass(frozen=True)
class RateDraws:
    """The share an hour's threshold aims at, per bootstrap draw: the drawn patients'
    exact share (``exact``) and the share read from their drawn release (``read``). Equal
    where the rule fixes the share (``auto``: ``flag_rate``)."""

    exact: np.ndarray
    read: np.ndarray

    @classmethod
    def fixed(cls, rate: float, draws: int) -> RateDraws:
        return cls(np.full(draws, rate), np.full(draws, rate))


@dataclass(frozen=True)
class BinnedRow:
    """A release's row that no distribution fits (a class the noise spreads, as the
    deaths' row of a small validation release often is): its counts clipped at zero, as
    the reading takes them, drawn from as a histogram, uniform within each bin (the open
    end bins as wide as the others). What :func:`rate_draws` and :func:`quantile_interval` draw
    from where :func:`common.estimates.fit_row` gives nothing."""

    counts: np.ndarray
    edges: np.ndarray  # the grid's bins + 1 edges (common.estimates.grid_edges)
    mass: float

    def sample(self, rng: np.random.Generator) -> np.ndarray:
        size = int(round(self.mass))
        if not self.counts.sum() > 0 or size == 0:
            return np.zeros(0)
        k = rng.choice(len(self.counts), size=size, p=self.counts / self.counts.sum())
        return self.edges[k] + (self.edges[k + 1] - self.edges[k]) * rng.random(size)


def _generator(row: np.ndarray, edges: np.ndarray, estimator: str, mass: float | None = None) -> RowFit | BinnedRow:
    """What a row's patients are drawn from: its fit (``mass`` patients where given), else
    its clipped counts (:class:`BinnedRow`).

    The fit alone sees only the fit's errors on its own shape: on the default's grid, 400
    synthetic scores and the hourly releases' noise (30 a cell), intervals held the exact
    0.7 quantile in 13 of 16 releases of skew-normal scores, 14 of a survivors-and-deaths
    mixture and 11 of gamma scores (skewness 1.4, beyond a skew-normal's reach); with the
    onset histogram's Laplace noise 16, 16 and 14 (/tmp script of 2026-12-07, as
    tests/test_threshold_intervals.py draws them). Drawing every other release from the
    clipped counts as well was tried on 5 default models (30 fresh releases): it held more
    (hour 1 28 of 30, against the fit's 103 of 120 on 20 models) but at the default's noise
    the clipped counts are mostly noise, so the truths drawn were too: intervals 3.1 to 3.5
    log-odds wide at hours 6 to 24, against 2.1 from the fit. So the fit, its coverage
    measured on real models and printed (THRESHOLD_INTERVAL_COVERAGE)."""
    fit = fit_row(row, edges, estimator)
    if fit is not None:
        return fit if mass is None else replace(fit, mass=float(mass))
    counts = np.maximum(np.asarray(row, dtype=np.float64), 0.0)
    return BinnedRow(counts, edges, float(counts.sum() if mass is None else mass))


def _bins(logits: np.ndarray, grid: ScoreGrid) -> np.ndarray:
    """Patients' logits counted into ``grid``'s bins, as a hospital counts them."""
    return np.bincount(grid.index(logits), minlength=grid.bins).astype(np.float64)


def _read(released: np.ndarray, n: int, grid: ScoreGrid, estimator: str, sd: float,
          starts: dict[int, RowFit]) -> ScoreSummary:
    return read_redrawn(ScoreSummary(released, None, n, grid), estimator, starts, sd)


def _declared(fits: list[RowFit | BinnedRow], n: int) -> list[RowFit | BinnedRow]:
    """The classes' generators with as many patients together as the release declared: a
    row drawn from its clipped counts counts its noise too (each empty cell's positive
    noise), so it gets what the fitted rows leave of ``n`` (all of it shared by their
    clipped sums where none fits)."""
    binned = [k for k, f in enumerate(fits) if isinstance(f, BinnedRow)]
    if not binned:
        return fits
    fitted = sum(f.mass for f in fits if isinstance(f, RowFit))
    left = max(float(n) - fitted, 0.0)
    weights = np.array([fits[k].counts.sum() for k in binned], dtype=np.float64)
    shares = weights / weights.sum() if weights.sum() > 0 else np.full(len(binned), 1 / len(binned))
    out = list(fits)
    for k, share in zip(binned, shares):
        out[k] = replace(fits[k], mass=left * float(share))
    return out


def rate_draws(val: ScoreSummary, noise: ReleaseNoise, risk: float, draws: int, rng: np.random.Generator,
               estimator: str) -> RateDraws:
    """The share of the validation patients at or above ``risk`` (the run's own threshold,
    on the scale the release was scored on), exact and as read, over ``draws`` releases
    drawn from ``val``'s (a pooled binary validation release's) classes, each from its fit
    or, where none fits, its clipped counts."""
    edges = grid_edges(val.grid)
    fits = [_generator(val.histogram[c, 0], edges, estimator) for c in (0, 1)]
    fits = _declared(fits, val.n)
    starts = {c: f for c, f in enumerate(fits) if isinstance(f, RowFit)}
    cut = float(logit(risk))
    exact, read = np.empty(draws), np.empty(draws)
    for d in range(draws):
        logits = [f.sample(rng) for f in fits]
        everyone = np.concatenate(logits)
        exact[d] = float((everyone >= cut).mean()) if len(everyone) else math.nan
        counts = np.stack([_bins(z, val.grid) for z in logits])[:, None, :]
        released = counts + noise.draw(counts.shape, rng)
        found = rate_at_risk(_read(released, len(everyone), val.grid, estimator, noise.sd, starts), risk)
        read[d] = math.nan if found is None else found
    return RateDraws(exact, read)


@dataclass(frozen=True)
class ReadingInterval:
    """A quantile read from a DP release, in log-odds: the reading, its rough interval, and
    the bootstrap's errors of the reading that gave the interval (each drawn release's
    reading less its drawn patients' exact quantile), kept so that a sum of readings, the
    monitor's flag level, gets its interval from the same draws (:func:`flag_level_interval`)."""

    estimate: float
    low: float
    high: float
    errors: np.ndarray


def quantile_errors(row: ScoreSummary, noise: ReleaseNoise, rates: RateDraws, draws: int, rng: np.random.Generator,
                    estimator: str) -> np.ndarray:
    """The errors, in log-odds, of a quantile read from a one-row release ``row`` (every
    outcome together) at the shares ``rates``, over ``draws`` drawn releases: the patients
    drawn from the row's fit or, where none fits, its clipped counts, as many as the release
    declared; the reading of each drawn release less the drawn patients' exact quantile.
    One entry per draw, NaN where the draw could not be read: draw ``i`` of every hour
    uses the same share's draw, so the hours' errors stay paired by index (a flag level
    reads several hours' together, :func:`flag_level_errors`)."""
    fit = _generator(row.histogram[0, 0], grid_edges(row.grid), estimator, mass=row.n)
    starts = {0: fit} if isinstance(fit, RowFit) else {}
    errors = []
    # each hour's draw pairs with a share's draw, cycling through them (the shares' draws refit two classes: the
    # slow part, so a run draws fewer of them and every hour reuses them)
    for exact_rate, read_rate in zip(np.resize(rates.exact, draws), np.resize(rates.read, draws)):
        errors.append(math.nan)
        if not (0 < exact_rate < 1 and 0 < read_rate < 1):
            continue
        logits = fit.sample(rng)
        if not len(logits):  # a row of no positive count: no patients to draw, no interval
            continue
        exact = float(np.quantile(logits, 1 - exact_rate))
        counts = _bins(logits, row.grid)[None, None, :]
        released = counts + noise.draw(counts.shape, rng)
        chosen = threshold_for_rate(_read(released, len(logits), row.grid, estimator, noise.sd, starts), read_rate)
        if chosen is not None and 0 < chosen < 1:
            errors[-1] = float(logit(chosen)) - exact
    return np.asarray(errors, dtype=np.float64)


def _bounded(estimate: float, errors: np.ndarray, level: float, draws: int) -> ReadingInterval | None:
    """``estimate`` less the central ``level`` quantiles of ``errors`` (NaN: a draw that
    could not be read), widened to hold ``estimate``; None where fewer than half the
    ``draws`` could be read."""
    read = errors[np.isfinite(errors)]
    if not math.isfinite(estimate) or len(read) < draws // 2 or not len(read):
        return None
    low, high = reading_bounds(estimate, read, level)
    return ReadingInterval(estimate, min(low, estimate), max(high, estimate), errors)


def quantile_interval(row: ScoreSummary, noise: ReleaseNoise, estimate: float, rates: RateDraws, level: float,
                      draws: int, rng: np.random.Generator, estimator: str) -> ReadingInterval | None:
    """The interval, in log-odds, of the quantile ``estimate`` read from ``row`` at the
    shares ``rates``: ``estimate`` less the central ``level`` quantiles of the reading's
    errors over ``draws`` drawn releases (:func:`quantile_errors`), widened to hold
    ``estimate``. None where fewer than half the draws can be read."""
    if not math.isfinite(estimate):
        return None
    return _bounded(estimate, quantile_errors(row, noise, rates, draws, rng, estimator), level, draws)


def flag_level_errors(hours: int, read: list[int], checkpoints: dict[int, np.ndarray], margin: np.ndarray,
                      last_is_setting: bool = True, scale: float = 1.0) -> dict[int, np.ndarray]:
    """The drawn errors, in log-odds, of the monitor's flag level (an hour's threshold moved
    up by the margin) at each checkpoint hour and the last, paired draw by draw.

    ``read``: the checkpoint hours whose thresholds the run read (the hours joined between,
    as ``server.results.every_hour`` joins them); ``checkpoints``: their threshold errors
    (:func:`quantile_errors`, on the model's own scale; an hour read without errors leaves
    the pull undrawn, so no flag level gets any); ``scale``: the recalibration's slope,
    which moves them onto the scale shown; ``margin``: the margin's errors, a release of its
    own, so paired by index with them;
    ``hours``: the window's last hour, whose threshold is the decision's: with
    ``last_is_setting`` (a clinical level) it has no error, and its flag level gets errors
    too; else it is a reading whose errors are not drawn (taken as none in the pull) and
    its flag level gets none.

    A flag level's error is its threshold's plus the margin's, less the margin's pull back:
    the onset histogram counts each stay's highest excess over the thresholds the run read,
    so thresholds read too high lower the excesses, and the margin read from them, by a
    weighted mean of the hours' errors, weighted by the hours at which the stays near the
    margin reach their highest excess. The coordinator does not see those hours (one more
    release would tell them), so the pull is drawn as the mean over every hour of the
    window of the hours' errors, joined between checkpoints as the thresholds are
    (``server.results.every_hour``). An assumption: the coverage it gives is measured
    (``simulations.threshold_coverage``), not assumed. Without the pull the last hour's
    interval held its exact level in 34 of 54 fresh releases (the margin's noise alone)
    and the checkpoints' were 2 log-odds wide for errors of sd 0.3."""
    drawn = sorted(h for h in read if 1 <= h < hours)
    if any(h not in checkpoints for h in drawn):
        return {}
    if not drawn:  # every hour's threshold is the last one's: a setting moved by the margin alone, or a reading
        return {hours: margin} if last_is_setting else {}
    paired = min(min(len(checkpoints[h]) for h in drawn), len(margin))
    at = np.array([*drawn, hours], dtype=np.float64)
    # draws x checkpoint hours (and the last, at no error): each draw's errors, joined over the window's hours
    errors = np.column_stack([scale * checkpoints[h][:paired] for h in drawn] + [np.zeros(paired)])
    every = np.arange(1, hours + 1, dtype=np.float64)
    joined = np.stack([np.interp(every, at, row) for row in errors])
    pull = joined.mean(axis=1)
    out = {h: joined[:, h - 1] - pull + margin[:paired] for h in drawn}
    if last_is_setting:
        out[hours] = -pull + margin[:paired]
    return out


def flag_level_interval(level_logit: float, errors: np.ndarray, level: float) -> ReadingInterval | None:
    """The interval, in log-odds, of a flag level read as ``level_logit`` with the drawn
    ``errors`` of :func:`flag_level_errors` (NaN: a draw one of its readings lacked)."""
    return _bounded(level_logit, errors, level, len(errors))
