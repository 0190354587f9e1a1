"""Stays -> fixed tensors a GRU can read.

For a window of ``W`` hours cut into bins of ``b`` hours (``T = W / b`` steps), each
configured variable gives per step:

- its value: the last observation in the bin, carried forward while unobserved, then
  normalised with the config's constants (``(log1p?(x) - center) / scale``); before the
  first observation it is 0, i.e. the reference value;
- an observed mask (1 where the bin holds an observation);
- optionally the hours since the last observation, divided by ``delta_scale_hours``
  (counted from admission before the first one).

An observation at exactly the window's end (``48:00`` in PhysioNet) belongs to the last
bin; later ones are outside the window and are dropped. Values outside a variable's
plausibility range become missing. Both are counted, per variable, in
:class:`PreprocessSummary`. Descriptors become the static vector: continuous ones are
normalised (0 when unknown) with an "unknown" indicator, categorical ones are one-hot.

Channel layout: ``[values (V) | masks (V) | deltas (V)]`` along the last axis (masks
and deltas only when enabled).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from ..config import FeatureSection, StaticSpec, VariableSpec
from .records import Stay


@dataclass
class PreprocessSummary:
    """What preprocessing set aside, per variable (counts only, no values)."""

    observed: dict[str, int] = field(default_factory=Counter)  # variable -> usable observations
    out_of_range: dict[str, int] = field(default_factory=Counter)  # variable -> count
    after_window: int = 0  # observations later than the window
    static_unknown: dict[str, int] = field(default_factory=Counter)  # descriptor -> stays
    static_out_of_range: dict[str, int] = field(default_factory=Counter)


def num_steps(features: FeatureSection) -> int:
    return int(round(features.window_hours / features.bin_hours))


def num_channels(features: FeatureSection) -> int:
    return len(features.variables) * (1 + int(features.observed_mask) + int(features.time_since_last))


def static_width(features: FeatureSection) -> int:
    return sum(_static_width(s) for s in features.static)


def _static_width(spec: StaticSpec) -> int:
    return len(spec.categories) if spec.kind == "categorical" else 2


def channel_names(features: FeatureSection) -> list[str]:
    names = [v.name for v in features.variables]
    out = [f"{n}" for n in names]
    if features.observed_mask:
        out += [f"{n}:observed" for n in names]
    if features.time_since_last:
        out += [f"{n}:hours_since" for n in names]
    return out


def static_names(features: FeatureSection) -> list[str]:
    out: list[str] = []
    for s in features.static:
        if s.kind == "categorical":
            out += [f"{s.name}={c:g}" for c in s.categories]
        else:
            out += [s.name, f"{s.name}:unknown"]
    return out


def normalised_normal(spec: VariableSpec | StaticSpec) -> float:
    """The input a value at the spec's textbook normal (``normal``, else ``center``) becomes:
    0 unless the config names a normal apart from its center (explanations' reference)."""
    normal = getattr(spec, "normal", None)
    return 0.0 if normal is None else float(_normalise(np.asarray(normal, dtype=np.float64), spec))


def _normalise(x: np.ndarray, spec: VariableSpec | StaticSpec) -> np.ndarray:
    if getattr(spec, "binary", False):
        return x
    if spec.log:
        x = np.log1p(np.maximum(x, 0.0))
        center = math.log1p(max(spec.center, 0.0))
    else:
        center = spec.center
    return (x - center) / spec.scale


def _in_range(x: np.ndarray, low: float | None, high: float | None) -> np.ndarray:
    ok = np.isfinite(x)
    if low is not None:
        ok &= x >= low
    if high is not None:
        ok &= x <= high
    return ok


def to_tensors(
    stays: list[Stay], features: FeatureSection, summary: PreprocessSummary | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``X`` of shape (N, T, C) and ``S`` of shape (N, static_width), float32."""
    summary = summary if summary is not None else PreprocessSummary()
    raw = binned_values(stays, features, summary)
    return channels_of(raw, features), static_tensor(stays, features.static, summary)


def binned_values(stays: list[Stay], features: FeatureSection, summary: PreprocessSummary) -> np.ndarray:
    """(N, T, V) float32: each variable's last usable value in each bin, NaN where none."""
    T = num_steps(features)
    V = len(features.variables)
    N = len(stays)
    raw = np.full((N, T, V), np.nan, dtype=np.float32)
    lows = np.array([np.nan if v.low is None else v.low for v in features.variables], dtype=np.float64)
    highs = np.array([np.nan if v.high is None else v.high for v in features.variables], dtype=np.float64)
    window = features.window_hours
    eps = 1e-6
    observed_counts = np.zeros(V, dtype=np.int64)
    for n, stay in enumerate(stays):
        if stay.time.size == 0:
            continue
        t = stay.time.astype(np.float64)
        var = stay.var.astype(np.int64)
        val = stay.value.astype(np.float64)
        inside = t <= window + eps
        summary.after_window += int((~inside).sum())
        ok = np.isfinite(val)
        lo, hi = lows[var], highs[var]
        ok &= np.isnan(lo) | (val >= lo)
        ok &= np.isnan(hi) | (val <= hi)
        bad = inside & ~ok
        if bad.any():
            for idx, count in zip(*np.unique(var[bad], return_counts=True)):
                summary.out_of_range[features.variables[idx].name] += int(count)
        keep = inside & ok
        if not keep.any():
            continue
        t, var, val = t[keep], var[keep], val[keep]
        observed_counts += np.bincount(var, minlength=V)
        # Bin b covers [b*bin, (b+1)*bin); the window's end point joins the last bin.
        step = np.minimum((t / features.bin_hours + eps).astype(np.int64), T - 1)
        # "Last value in the bin": a stable sort by time keeps file order among ties,
        # then for each (step, var) the last entry wins.
        order = np.argsort(t, kind="stable")
        step, var, val = step[order], var[order], val[order]
        key = step * V + var
        # keep position i if no later position has the same key
        _, first_in_reversed = np.unique(key[::-1], return_index=True)
        last = np.zeros(key.size, dtype=bool)
        last[key.size - 1 - first_in_reversed] = True
        raw[n, step[last], var[last]] = val[last]

    for j, spec in enumerate(features.variables):
        summary.observed[spec.name] += int(observed_counts[j])
    return raw


def channels_of(raw: np.ndarray, features: FeatureSection) -> np.ndarray:
    """(N, T, C) float32: the binned values (:func:`binned_values`) normalised and carried
    forward, then the observed masks and the hours since the last observation."""
    N, T, V = raw.shape
    # The channels are written into X in place (one variable, or one hour, at a time), so
    # preprocessing holds the raw values and X and no more: building each channel apart and
    # joining them held about four arrays of X's size at the peak (X is 0.9 GB at 100,000
    # stays).
    observed = ~np.isnan(raw)
    X = np.empty((N, T, num_channels(features)), dtype=np.float32)
    values = X[:, :, :V]
    for j, spec in enumerate(features.variables):
        col = raw[:, :, j]
        values[:, :, j] = np.where(np.isnan(col), np.nan, _normalise(col, spec))
    # Forward fill along time; before the first observation use 0 (the reference).
    for s in range(1, T):
        carry = np.isnan(values[:, s, :])
        values[:, s, :][carry] = values[:, s - 1, :][carry]
    np.nan_to_num(values, copy=False, nan=0.0)
    at = V
    if features.observed_mask:
        X[:, :, at:at + V] = observed
        at += V
    if features.time_since_last:
        since = np.zeros((N, V), dtype=np.float32)
        for s in range(T):
            since = np.where(observed[:, s, :], 0.0, since + features.bin_hours)
            X[:, s, at:at + V] = since.astype(np.float32) / features.delta_scale_hours
    return X


def static_tensor(stays: list[Stay], specs: list[StaticSpec], summary: PreprocessSummary) -> np.ndarray:
    N = len(stays)
    cols: list[np.ndarray] = []
    for spec in specs:
        raw = np.array([stay.static.get(spec.name, np.nan) for stay in stays], dtype=np.float64)
        unknown = ~np.isfinite(raw) | np.isin(raw, spec.missing)
        summary.static_unknown[spec.name] += int(unknown.sum())
        if spec.kind == "categorical":
            onehot = np.zeros((N, len(spec.categories)), dtype=np.float32)
            for k, c in enumerate(spec.categories):
                onehot[:, k] = (~unknown) & (raw == c)
            cols.append(onehot)
            continue
        bad = ~unknown & ~_in_range(raw, spec.low, spec.high)
        summary.static_out_of_range[spec.name] += int(bad.sum())
        unknown |= bad
        value = np.where(unknown, 0.0, _normalise(np.where(unknown, spec.center, raw), spec))
        cols.append(np.stack([value, unknown.astype(np.float64)], axis=1).astype(np.float32))
    if not cols:
        return np.zeros((N, 0), dtype=np.float32)
    return np.concatenate(cols, axis=1).astype(np.float32)
