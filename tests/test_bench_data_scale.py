"""The data-scale benchmark and its synthetic exports, at a tiny size.

The synthetic export must be what the project's own readers read, with the requested
number of stays and outcomes copied from set A, and the same bytes for the same seed;
the benchmark must run end to end and report every step's cost. No test asserts a time.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace

import numpy as np
import pytest

from common.config import load_config
from common.data.dataset import read_export
from simulations import bench_data_scale
from simulations.synthetic_export import FIRST_ID, existing_export, load_source, write_export
from tests.conftest import DEFAULT_CONFIG


@pytest.fixture(scope="module")
def source(physionet_files):
    return load_source(*physionet_files)


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("fmt", ["physionet2012", "long_csv"])
def test_a_synthetic_export_is_read_back_whole_and_is_the_same_for_the_same_seed(source, tmp_path, fmt):
    n = 50
    export = write_export(source, n, tmp_path / "a", fmt, seed=3)
    again = write_export(source, n, tmp_path / "b", fmt, seed=3)
    other = write_export(source, n, tmp_path / "c", fmt, seed=4)
    assert (_digest(export.data), _digest(export.outcomes)) == (_digest(again.data), _digest(again.outcomes))
    assert _digest(export.data) != _digest(other.data)
    assert existing_export(tmp_path / "a", n, fmt, seed=3) == export  # what --keep uses again
    assert existing_export(tmp_path / "a", n, fmt, seed=4) is None and existing_export(tmp_path / "a", n + 1, fmt, 3) is None

    cfg = load_config(DEFAULT_CONFIG)
    task = replace(cfg.task, label_column=export.label_column)
    ds = read_export(export.data, export.outcomes, fmt, export.id_column, task, cfg.features)
    assert len(ds) == n and ds.summary.stays_read == n and ds.summary.stays_without_outcome == 0
    assert sorted(ds.stay_ids.astype(int)) == list(range(FIRST_ID, FIRST_ID + n))
    assert int(ds.y.sum()) == export.deaths and 0 < export.deaths < n  # set A's outcomes, about 14% deaths
    assert ds.X.shape[1:] == (48, 45) and np.isfinite(ds.X).all()
    # jittered, not broken: as few values set aside as set A's own stays have (about 1 in 1,700)
    assert sum(ds.summary.preprocess.out_of_range.values()) < 0.005 * ds.summary.read.lines


def test_both_formats_hold_the_same_stays(source, tmp_path):
    cfg = load_config(DEFAULT_CONFIG)
    read = {}
    for fmt in ("physionet2012", "long_csv"):
        e = write_export(source, 20, tmp_path / fmt, fmt, seed=1)
        read[fmt] = read_export(e.data, e.outcomes, fmt, e.id_column, replace(cfg.task, label_column=e.label_column),
                                cfg.features)
    a, b = read["physionet2012"], read["long_csv"]
    assert list(a.stay_ids) == list(b.stay_ids) and (a.y == b.y).all()
    np.testing.assert_allclose(a.X, b.X, atol=1e-5)  # times as minutes and as hours bin alike
    np.testing.assert_array_equal(a.S, b.S)


def test_the_bench_runs_at_a_tiny_size_and_reports_every_step(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench_data_scale.main(["--stays", "60,120", "--rounds", "1", "--json", str(out), "--workdir", str(tmp_path / "w")]) == 0
    rows = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert [r["stays"] for r in rows] == [60, 120]
    for r in rows:
        assert r["format"] == "physionet2012" and r["stays_read"] == r["stays"]
        assert r["cached"]["result"]["stays"] == r["stays"]
        for step in ("init_cold", "cached", "round_default", "round_gru"):
            assert r[step]["stopped"] == "" and r[step]["seconds"] > 0 and 0 < r[step]["peak_gb"] < 8, (step, r[step])
        assert r["round_default"]["result"]["train_gru"] is False and r["round_gru"]["result"]["train_gru"] is True
        for step in ("round_default", "round_gru"):
            assert len(r[step]["result"]["round_seconds"]) == 1 and r[step]["result"]["steps"][0] >= 1
        assert r["cache_mb"] > 0 and r["export_mb"] > 0
        assert f"physionet2012 {r['stays']:>7} |" in printed
    assert not (tmp_path / "w" / "physionet2012-60").exists()  # nothing kept without --keep
