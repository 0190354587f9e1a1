"""Preprocessing checked by hand on small stays, and on the real data's shapes."""

from pathlib import Path

import numpy as np
import pytest

from common.config import FeatureSection, StaticSpec, VariableSpec
from common.data.preprocess import PreprocessSummary, channel_names, num_channels, to_tensors
from common.data.records import Stay
from tests.conftest import extract


def _features(**kw):
    base = dict(
        window_hours=6.0,
        bin_hours=2.0,
        observed_mask=True,
        time_since_last=True,
        delta_scale_hours=6.0,
        variables=[
            VariableSpec("HR", low=1, high=300, center=80, scale=20),
            VariableSpec("Lactate", low=0.1, high=40, center=1.0, scale=0.5, log=True),
        ],
        select=[],
        static=[StaticSpec("Age", center=65, scale=10), StaticSpec("ICUType", kind="categorical", categories=[1, 2])],
    )
    base.update(kw)
    return FeatureSection(**base)


def _stay(times, variables, values, static=None):
    return Stay(
        stay_id="1",
        static=static or {"Age": 75.0, "ICUType": 2.0},
        time=np.asarray(times, np.float32),
        var=np.asarray(variables, np.int16),
        value=np.asarray(values, np.float32),
    )


def test_hand_checked_stay():
    f = _features()
    # HR: 90 at 0:30, 100 at 1:30 (same 2 h bin: last wins), 0 at 2:30 (implausible),
    #     70 at exactly 6:00 (window end: joins the last bin), 50 at 6:30 (after the window).
    # Lactate: 1.0 at 3:00.
    stay = _stay(
        [0.5, 1.5, 2.5, 6.0, 6.5, 3.0],
        [0, 0, 0, 0, 0, 1],
        [90, 100, 0, 70, 50, 1.0],
    )
    summary = PreprocessSummary()
    X, S = to_tensors([stay], f, summary)
    assert X.shape == (1, 3, num_channels(f)) == (1, 3, 6)
    names = channel_names(f)
    col = {n: X[0, :, i] for i, n in enumerate(names)}
    # values: last in bin, carried forward, normalised; 0 before the first observation
    np.testing.assert_allclose(col["HR"], [(100 - 80) / 20, (100 - 80) / 20, (70 - 80) / 20])
    np.testing.assert_allclose(col["Lactate"], [0.0, 0.0, 0.0])  # log1p(1.0) is the log-space center
    np.testing.assert_array_equal(col["HR:observed"], [1, 0, 1])
    np.testing.assert_array_equal(col["Lactate:observed"], [0, 1, 0])
    # hours since last observation / 6 h: observed -> 0, else +2 h per bin
    np.testing.assert_allclose(col["HR:hours_since"], [0, 2 / 6, 0])
    np.testing.assert_allclose(col["Lactate:hours_since"], [2 / 6, 0, 2 / 6])
    assert summary.out_of_range["HR"] == 1
    assert summary.after_window == 1
    assert summary.observed["HR"] == 3 and summary.observed["Lactate"] == 1
    # static: Age normalised + unknown flag, ICUType one-hot
    np.testing.assert_allclose(S[0], [1.0, 0.0, 0.0, 1.0])


def test_unknown_static_and_no_observations():
    f = _features()
    stay = _stay([], [], [], static={"Age": -1.0})
    summary = PreprocessSummary()
    X, S = to_tensors([stay], f, summary)
    assert not X[0, :, :2].any()  # values all at the reference
    assert not X[0, :, 2:4].any()  # nothing observed
    np.testing.assert_allclose(X[0, :, 4], [2 / 6, 4 / 6, 1.0])  # hours since admission
    np.testing.assert_allclose(S[0], [0.0, 1.0, 0.0, 0.0])
    assert summary.static_unknown["Age"] == 1 and summary.static_unknown["ICUType"] == 1


def test_without_time_since_last_channels():
    f = _features(time_since_last=False)
    X, _ = to_tensors([_stay([0.5], [0], [80])], f)
    assert X.shape == (1, 3, 4)


def test_real_data_shapes_and_ranges(physionet_files):
    """Every variable of the reference table (features.select=[]), not only the default's."""
    from common.config import load_config
    from common.data.dataset import load_dataset

    whole_table = load_dataset(load_config(overrides=["features.select=[]"]))
    X, S = whole_table.X, whole_table.S
    assert X.shape == (4000, 48, 37 * 3)
    assert S.shape == (4000, 2 + 2 + 2 + 4 + 2)
    assert np.isfinite(X).all() and np.isfinite(S).all()
    V = 37
    masks = X[:, :, V : 2 * V]
    assert set(np.unique(masks)) <= {0.0, 1.0}
    deltas = X[:, :, 2 * V :]
    assert deltas.min() >= 0 and deltas.max() <= 1.0 + 1e-6
    # out-of-range values are counted (the facts: 11 pH values outside [6.5, 8], 130 Temp < 25)
    pre = whole_table.summary.preprocess
    assert pre.out_of_range["pH"] == 11
    assert pre.out_of_range["Temp"] == 130
    # 48:00 observations are inside the window
    assert pre.after_window == 0


def test_an_observation_at_48_00_is_the_last_hour_of_a_real_stay(default_cfg, physionet_files, tmp_path):
    """PhysioNet's times run up to and including 48:00: such a value is the last one of the
    last hourly bin, not dropped and not a 49th step."""
    import tarfile

    from common.data.physionet import read_physionet
    from common.data.records import ReadSummary

    names = [v.name for v in default_cfg.features.variables]
    with tarfile.open(physionet_files[0]) as tar:
        for member in tar:
            if not member.name.endswith(".txt"):
                continue
            lines = tar.extractfile(member).read().decode().splitlines()
            at_end = [line.split(",") for line in lines if line.startswith("48:00,") and line.split(",")[1] in names]
            if at_end:
                extract(tar, member, tmp_path)
                break
    _, name, value = at_end[-1]
    (stay,) = read_physionet(tmp_path / "set-a", names, ReadSummary())
    X, _ = to_tensors([stay], default_cfg.features)
    j = names.index(name)
    spec = default_cfg.features.variables[j]
    V = len(names)
    assert X.shape[1] == 48 and X[0, -1, V + j] == 1.0  # observed in the last hour
    expected = (np.log1p(float(value)) - np.log1p(spec.center)) / spec.scale if spec.log else (float(value) - spec.center) / spec.scale
    assert X[0, -1, j] == pytest.approx(expected if not spec.binary else float(value), abs=1e-5)


def test_bin_hours_must_divide_window():
    from common.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="divide"):
        load_config(Path(__file__).resolve().parent.parent / "configs" / "default.yaml", ["features.bin_hours=5"])


def _reference_channels(raw: np.ndarray, features) -> np.ndarray:
    """The channels as to_tensors built them before it wrote them into X in place (each
    channel apart, then joined): the reference its output must equal bit for bit."""
    from common.data.preprocess import _normalise

    T = raw.shape[1]
    observed = ~np.isnan(raw)
    values = np.zeros_like(raw)
    for j, spec in enumerate(features.variables):
        col = raw[:, :, j]
        values[:, :, j] = np.where(np.isnan(col), np.nan, _normalise(col, spec))
    filled = values.copy()
    for s in range(1, T):
        carry = np.isnan(filled[:, s, :])
        filled[:, s, :][carry] = filled[:, s - 1, :][carry]
    filled = np.nan_to_num(filled, nan=0.0)
    channels = [filled] + ([observed.astype(np.float32)] if features.observed_mask else [])
    if features.time_since_last:
        delta = np.zeros_like(raw)
        since = np.zeros((raw.shape[0], raw.shape[2]), dtype=np.float32)
        for s in range(T):
            since = np.where(observed[:, s, :], 0.0, since + features.bin_hours)
            delta[:, s, :] = since
        channels.append(delta / features.delta_scale_hours)
    return np.concatenate(channels, axis=2).astype(np.float32)


@pytest.fixture(scope="module")
def first_stays(default_cfg, physionet_files):
    """Set A's first 600 stays, read by every variable of the default config."""
    from itertools import islice

    from common.data.physionet import iter_stay_files, parse_stay
    from common.data.records import ReadSummary

    index = {v.name: i for i, v in enumerate(default_cfg.features.variables)}
    return [parse_stay(src, name, raw, index, ReadSummary()) for src, name, raw in islice(iter_stay_files(physionet_files[0]), 600)]


@pytest.mark.parametrize("mask, since", [(True, True), (False, True), (True, False), (False, False)])
def test_channels_written_in_place_equal_the_joined_ones(default_cfg, first_stays, mask, since):
    """Set A's first 600 stays: X bit for bit as before, whichever channels are on."""
    from dataclasses import replace

    from common.data.preprocess import binned_values, channels_of

    features = replace(default_cfg.features, observed_mask=mask, time_since_last=since)
    raw = binned_values(first_stays, features, PreprocessSummary())
    assert np.isnan(raw).any() and not np.isnan(raw).all()
    X = channels_of(raw, features)
    assert X.shape == (600, 48, num_channels(features)) and X.dtype == np.float32
    np.testing.assert_array_equal(X, _reference_channels(raw, features))
