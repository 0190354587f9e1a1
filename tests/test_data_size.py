"""The data-size curve (simulations.data_size): the crossover read from paired differences,
and a real tiny run of both configs on the same fold at two sizes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from common.metrics import exact_metrics
from simulations.data_size import SizeRun, crossover, markdown, summarize

SIZES = [125] * 5 + [250] * 5 + [500] * 5 + [1000] * 5


def _differences(intercept: float, per_doubling: float, noise: float, seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed)
    return [intercept + per_doubling * math.log2(n / 125) + rng.normal(0, noise) for n in SIZES]


def test_a_rising_line_crosses_zero_where_it_was_drawn_and_the_interval_holds_it():
    # -0.06 at 125 stays, +0.02 per doubling: zero at 125 * 2^3 = 1,000 stays per hospital.
    c = crossover(SIZES, _differences(-0.06, 0.02, 0.005))
    assert c.stays_per_hospital == pytest.approx(1000, rel=0.15)
    assert c.interval[0] < 1000 < c.interval[1]
    assert c.slope == pytest.approx(0.02, abs=0.004) and c.rising_share == 1.0
    assert not c.extrapolated or c.stays_per_hospital > 1000


def test_a_crossing_past_the_largest_size_is_marked_as_an_extrapolation():
    c = crossover(SIZES, _differences(-0.08, 0.01, 0.005))  # zero at 125 * 2^8 = 32,000
    assert c.stays_per_hospital > c.largest_measured == pytest.approx(1000)
    assert c.extrapolated


def test_a_flat_or_falling_difference_has_no_crossover_and_says_so():
    for slope in (0.0, -0.01):
        c = crossover(SIZES, _differences(-0.03, slope, 0.01, seed=3))
        if c.slope <= 0:
            assert c.stays_per_hospital is None and c.interval is None and c.extrapolated
    runs = [SizeRun(cfg, str(n), 1.0, i % 5, n * 4, 4, 0.8 + (0.0 if cfg == "a.yaml" else -0.03 - 0.001 * i), 1.0)
            for i, n in enumerate(SIZES) for cfg in ("a.yaml", "b.yaml")]
    text = markdown(summarize(runs, ["a.yaml", "b.yaml"]), runs=5)
    assert "no crossover can be read" in text


def test_summary_pairs_each_fold_with_itself():
    runs = [SizeRun("a.yaml", "all", 1.0, f, 2800, 4, 0.80 + 0.01 * f, 10.0) for f in range(3)]
    runs += [SizeRun("b.yaml", "all", 1.0, f, 2800, 4, 0.78 + 0.01 * f, 30.0) for f in range(3)]
    row = summarize(runs, ["a.yaml", "b.yaml"])["sizes"][0]
    assert row["difference"][0] == pytest.approx(-0.02) and row["difference"][1] == pytest.approx(0.0, abs=1e-12)
    assert row["stays_per_hospital"] == 700 and row["paired_runs"] == 3


def test_both_configs_run_on_the_same_folds_at_every_size_on_nested_shares(tmp_path, monkeypatch, physionet_files):
    """The harness's plan and bookkeeping, with the federated run itself replaced: each
    (size, fold) runs both configs with one split.train_fraction, the share that makes the
    federation's training stays the size asked for (counted on the real partition), and
    the results are paired by fold. The real run behind federated_fold (a fedgru simulate on
    such a share, scored on the fold's whole test split) is tested in
    tests/test_utility.py."""
    import simulations.data_size as data_size
    from simulations.utility import FoldResult

    calls = []

    def run(config, overrides, folds, fold, out):
        calls.append((str(config), fold, [o for o in overrides if o.startswith("split.train_fraction=")]))
        y = np.array([0, 1] * 20)
        risk = np.clip(y * 0.3 + 0.35 + 0.01 * fold, 0, 1)
        return FoldResult(fold, exact_metrics(y, np.stack([1 - risk, risk], axis=1)), {}, 1.0)

    monkeypatch.setattr(data_size, "federated_fold", run)
    out = tmp_path / "size"
    assert data_size.main(["--runs", "2", "--train-stays", "100,all", "--out", str(out),
                           "--set", "data.max_stays=400"]) == 0
    assert [(c, f) for c, f, _ in calls] == [(c, f) for f in (0, 1) for c in data_size.DEFAULT_CONFIGS] * 2
    result = json.loads((out / "data_size.json").read_text())
    runs = result["runs"]
    small = [r for r in runs if r["target"] == "100"]
    whole = [r for r in runs if r["target"] == "all"]
    assert all(abs(r["training_stays"] - 100) <= 8 for r in small)  # stratified rounding per class and hospital
    assert all(r["fraction"] == 1.0 for r in whole) and all(w["training_stays"] > 250 for w in whole)
    # both configs of a fold on the same share; the share of the whole split everywhere else
    assert [f for _, _, f in calls] == [[f"split.train_fraction={r['fraction']:.6f}"] for r in runs]
    assert calls[0][2] == calls[1][2] and calls[2][2] == calls[3][2] and 0 < small[0]["fraction"] < 1
    assert result["summary"]["sizes"][0]["paired_runs"] == 2
    assert (out / "data_size.md").read_text().count("\n|") >= 3


def _runs(differences: dict[int, list[float]]) -> list[SizeRun]:
    """Paired runs: per hospital stays -> the second config's AUROC minus the first's, per fold."""
    runs = []
    for n, diffs in differences.items():
        for fold, d in enumerate(diffs):
            runs.append(SizeRun("a.yaml", str(n), 1.0, fold, n * 4, 4, 0.80, 1.0))
            runs.append(SizeRun("b.yaml", str(n), 1.0, fold, n * 4, 4, 0.80 + d, 1.0))
    return runs


def test_a_line_that_rises_on_the_small_sizes_alone_is_not_extrapolated_past_a_flat_top():
    # set A's shape: -0.04 at 125 and 250 stays per hospital, then flat at zero
    flat_top = {125: [-0.05, -0.03, -0.04, -0.06, -0.02], 250: [-0.04, -0.05, -0.03, -0.04, -0.04],
                500: [0.01, -0.01, 0.0, 0.02, -0.01], 700: [0.0, -0.01, 0.01, -0.01, 0.0]}
    summary = summarize(_runs(flat_top), ["a.yaml", "b.yaml"])
    assert summary["crossover"]["slope"] > 0  # the pooled line rises...
    text = markdown(summary, runs=5)
    assert "indistinguishable from zero" in text and "not shown to rise" in text  # ...the top does not
    assert "not supported by these data" in text
    rising = {125: [-0.06, -0.05, -0.07, -0.06, -0.06], 250: [-0.04, -0.03, -0.04, -0.05, -0.04],
              500: [-0.02, -0.01, -0.02, -0.02, -0.03], 700: [0.02, 0.03, 0.02, 0.01, 0.02]}
    text = markdown(summarize(_runs(rising), ["a.yaml", "b.yaml"]), runs=5)
    assert "above zero" in text and "still rising" in text and "not supported" not in text


def test_the_table_can_be_printed_again_from_a_saved_measurement(tmp_path, capsys):
    import dataclasses

    from simulations.data_size import main

    runs = _runs({125: [-0.05, -0.03], 700: [0.0, 0.01]})
    saved = tmp_path / "data_size.json"
    saved.write_text(json.dumps({"runs_per_cell": 2, "runs": [dataclasses.asdict(r) for r in runs]}))
    assert main(["--summarize", str(saved)]) == 0
    out = capsys.readouterr().out
    assert "| 500 (125) | 125 |" in out and "| 2,800 (700) | 700 |" in out and "2 runs per cell" in out
