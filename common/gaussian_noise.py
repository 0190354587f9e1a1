"""The Gaussian mechanism's noise as a hospital releases it: drawn in floating point, then
snapped to a grid, so the released numbers carry no low bits of the sample.

A count plus a floating-point Gaussian sample is not the idealised mechanism: which doubles
the sampler can return, and how the sum rounds, depend on the count, so the low bits of a
release can tell a count from its neighbour far more often than the accounted epsilon
allows (Mironov, "On Significance of the Least Significant Bits for Differential Privacy",
CCS 2012, for Laplace; Jin, McMurtry, Rubinstein & Ohrimenko, "Are We There Yet? Timing and
Floating-Point Attacks on Differential Privacy Systems", IEEE S&P 2022, for Gaussian
samplers, Opacus's among them). Mironov's remedy, the snapping mechanism, rounds the noisy
value to a grid much coarser than the doubles near it. Here the grid is a power of two at
most ``1/GRID_PER_SD`` of the noise's sd, so the snap is exact in binary arithmetic and adds
an error of sd at most 1/(256 sqrt 12), about 0.1%, of the noise's: no reading moves. Every
released value is then a whole multiple of the step whatever the count, and how likely each
multiple is depends on the sampler's resolution (near the centre some 2^40 of its doubles
fall in one step), not on what the count leaves in the last bits. This narrows the gap to
the idealised mechanism; it is not a proof that none is left (a sampler exact in exact
arithmetic, as the discrete Laplace's, would be). Rounding is post-processing: the
accounted RDP of the Gaussian mechanism stands.

The discrete releases (the onset histogram's discrete Laplace, :mod:`common.laplace`; the
Skellam shares of secure aggregation, :mod:`common.skellam`) are whole numbers already. The
DP-SGD update is Opacus's floating-point noise (its secure mode needs torchcsprng, which no
longer installs with current torch): the privacy report says so.
"""

from __future__ import annotations

import math

import numpy as np

GRID_PER_SD = 256  # the grid's step is at most sd / GRID_PER_SD
# The largest number a Gaussian release may hold (counts of patients, sums of clipped contributions: none comes
# near). A grid finer than the doubles near it would leave low bits as they are, so such a noise is refused; the
# bound is fixed, not the release's own largest value, so whether a release is refused never depends on its patients.
MAX_MAGNITUDE = 2.0**32


def snap_step(sd: float) -> float:
    """The grid a release of noise ``sd`` is snapped to: the largest power of two at most
    ``sd / GRID_PER_SD`` (exact in binary, so snapping a double loses nothing else). A
    noise whose grid would be finer than the doubles near ``MAX_MAGNITUDE`` is refused."""
    if not (math.isfinite(sd) and sd > 0):
        raise ValueError(f"a Gaussian release needs a positive, finite noise sd (got {sd!r})")
    step = 2.0 ** (math.floor(math.log2(sd)) - round(math.log2(GRID_PER_SD)))
    if not step >= np.spacing(MAX_MAGNITUDE):
        raise ValueError(f"a Gaussian release's noise sd {sd!r} is too small to snap to a grid coarser than the "
                         f"numbers a release may hold (up to {MAX_MAGNITUDE:.3g})")
    return step


def _on_grid(values: np.ndarray, step: float) -> np.ndarray:
    return np.round(values / step) * step


def snapped(values: np.ndarray, sd: float) -> np.ndarray:
    """``values`` rounded to the nearest multiple of :func:`snap_step` of ``sd``."""
    return _on_grid(np.asarray(values, dtype=np.float64), snap_step(sd))


def gaussian_release(values: np.ndarray, sd: float, rng: np.random.Generator) -> np.ndarray:
    """``values`` (counts, or sums of clipped contributions) plus N(0, sd^2) on each, snapped
    to the grid: what leaves the hospital. ``rng`` is the hospital's, seeded from the
    operating system's entropy (the coordinator must not know it)."""
    step = snap_step(sd)  # refuses a noise it cannot release before drawing any
    values = np.asarray(values, dtype=np.float64)
    return _on_grid(values + rng.normal(0.0, sd, values.shape), step)
