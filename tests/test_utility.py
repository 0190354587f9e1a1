"""The utility protocol (simulations.utility): its summary statistics, and a real
repeated run on one held-out fold (the training's own run-to-run spread)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from common.metrics import exact_metrics
from simulations.utility import FoldResult, main, summarize
from tests.conftest import ROOT


def _fold(fold: int, seed: int, n: int = 200) -> FoldResult:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    risk = np.clip(0.5 * y + rng.normal(0.25, 0.3, n), 0, 1)
    pooled = exact_metrics(y, np.stack([1 - risk, risk], axis=1))
    return FoldResult(fold, pooled, {"a": pooled.auroc}, 1.0, y=y.tolist(), risk=risk.tolist())


def test_summary_is_mean_and_sd_over_runs_and_the_auroc_of_all_folds_together():
    results = [_fold(k, seed=k) for k in range(4)]
    s = summarize(results)
    aurocs = [r.pooled.auroc for r in results]
    assert s["auroc"]["mean"] == pytest.approx(statistics.fmean(aurocs))
    assert s["auroc"]["sd"] == pytest.approx(statistics.stdev(aurocs))
    y = np.concatenate([r.y for r in results])
    risk = np.concatenate([r.risk for r in results])
    assert s["auroc_all_folds"] == pytest.approx(roc_auc_score(y, risk))
    assert s["patients_all_folds"] == 800


def test_the_bedside_summary_gives_the_hour_48_decisions_flag_share_with_its_range():
    from simulations.utility import markdown

    results = [_fold(k, seed=k) for k in range(3)]
    for r, share in zip(results, (0.2, 0.3, 0.25)):
        r.threshold, r.flagged, r.ever_flagged, r.decision_flagged = 0.12, {h: share for h in (1, 6, 12, 24, 36, 48)}, share, share
    bed = summarize(results)["bedside"]
    assert bed["decision_flagged"]["mean"] == pytest.approx(0.25)
    assert bed["decision_flagged"]["sd"] == pytest.approx(0.05)
    assert (bed["decision_flagged"]["min"], bed["decision_flagged"]["max"]) == (0.2, 0.3)
    assert "flags 0.250 ± 0.050 of the test stays (from 0.200 to 0.300)" in markdown({"federated": summarize(results)}, 3)


def test_arguments_are_checked():
    with pytest.raises(SystemExit):
        main(["--runs", "6", "--folds", "5"])  # more runs than folds, without --fold
    with pytest.raises(SystemExit):
        main(["--runs", "2", "--fold", "5", "--folds", "5"])  # no such fold


@pytest.mark.slow
def test_runs_repeated_on_one_fold_score_the_same_patients(tmp_path, physionet_files):
    """--fold 0 --runs 2: two real federated trainings, both scored exactly on fold 0's
    test patients; no 'all folds' AUROC (it would count each patient twice). Trained on
    half of each hospital's training split (split.train_fraction, as simulations.data_size
    runs it): the test patients are all of fold 0's all the same."""
    from common.config import load_config
    from common.data.dataset import load_dataset
    from common.data.partition import make_partition

    out = tmp_path / "utility"
    sets = ["run.rounds=2", "data.max_stays=400", "split.train_fraction=0.5"]
    proc = subprocess.run(
        [sys.executable, "-m", "simulations.utility", "--runs", "2", "--fold", "0", "--no-baselines", "--out", str(out),
         *(a for item in sets for a in ("--set", item))],
        cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "utility.json").read_text())
    runs = result["folds_detail"]["federated"]
    assert result["fold"] == 0 and [r["fold"] for r in runs] == [0, 0]
    assert runs[0]["pooled"]["n"] == runs[1]["pooled"]["n"] > 0  # the same test patients
    assert all(0 <= r["pooled"]["auroc"] <= 1 for r in runs)
    assert "auroc_all_folds" not in result["summary"]["federated"]
    assert (out / "fold0-run0" / "model.pt").is_file() and (out / "fold0-run1" / "model.pt").is_file()
    assert "all on held-out fold 0" in (out / "utility.md").read_text()
    whole = load_config(None, ["data.max_stays=400", "split.folds=5", "split.fold=0"])
    hospitals = make_partition(load_dataset(whole), whole)
    for run in ("fold0-run0", "fold0-run1"):
        rows = json.loads((out / run / "partition.json").read_text())["hospitals"]
        assert sum(r["test"] for r in rows) == sum(len(h.test) for h in hospitals) == runs[0]["pooled"]["n"]
        trained, full = sum(r["train"] for r in rows), sum(len(h.train) for h in hospitals)
        assert abs(trained - full / 2) <= len(hospitals) * 2  # half of each class of each hospital, rounded
    # --rescore scores the same runs again from their folders (their own config.yaml): the same numbers
    assert main(["--rescore", str(out)]) == 0
    again = json.loads((out / "rescored.json").read_text())["folds_detail"]["federated"]
    for first, second in zip(runs, again):
        assert second["pooled"] == pytest.approx(first["pooled"], nan_ok=True)
        assert (second["covered_metrics"], second["covered_hospitals"]) == (first["covered_metrics"], first["covered_hospitals"])
        assert second["hospital_rows"] == first["hospital_rows"] > 0
        # the calibration reading (when the run had one) scored against the exact ratio of the same patients
        assert second["calibration_exact"] == pytest.approx(first["calibration_exact"]) and first["calibration_exact"] > 0
        assert (first["calibration_covered"] is None) == (first["calibration_ratio"] is None)
    # the released model (the rounds' average) beside the last round's, on the same runs: the released row is
    # the model utility scored (the same AUROC and share flagged on the same patients)
    from simulations.average_study import score

    for run, scored in zip(("fold0-run0", "fold0-run1"), runs):
        both = score(out / run)
        assert both["released"]["auroc"] == pytest.approx(scored["pooled"]["auroc"])
        assert both["released"]["flagged"] == pytest.approx(scored["decision_flagged"])
        assert 0 <= both["last round"]["auroc"] <= 1


def test_each_hospitals_interval_coverage_is_counted_over_the_rows_that_had_an_interval():
    """A hospital row without an interval (its noise drowned a class) is counted among the
    rows but not in the coverage; every metric counts the rows it held the exact value in."""
    from simulations.utility import markdown

    results = [_fold(k, seed=k) for k in range(3)]
    results[0].covered_hospitals = {"a": {"auroc": True, "specificity": True}, "b": {"auroc": False, "specificity": True}}
    results[1].covered_hospitals = {"a": {"auroc": True, "specificity": False}}
    results[2].covered_hospitals = {}
    for r in results:
        r.hospital_rows = 2
    hc = summarize(results)["hospital_metric_coverage"]
    assert (hc["rows"], hc["rows_with_interval"]) == (6, 3)
    assert hc["with_interval_by_hospital"] == {"a": 2, "b": 1}
    assert hc["metrics"] == {"auroc": {"rows": 3, "covered": 2}, "specificity": {"rows": 3, "covered": 2}}
    text = markdown({"federated": summarize(results)}, 3)
    assert "Each hospital's own row (3 of 6 rows had intervals: a 2, b 1;" in text
    assert "auroc 2/3, specificity 2/3 rows." in text


def test_rescore_refuses_a_folder_without_runs(tmp_path):
    with pytest.raises(SystemExit, match="no run folders"):
        main(["--rescore", str(tmp_path)])


def test_the_calibration_reading_is_scored_against_the_exact_ratio_of_the_same_patients():
    """Observed rate over mean predicted risk: 2 deaths in 8 (0.25) over a mean risk of 0.2
    is 1.25; an interval (1.1, 1.4) holds it, (0.8, 1.2) does not; the summary counts it."""
    from types import SimpleNamespace

    from simulations.utility import _calibration, markdown

    y = np.array([1, 1, 0, 0, 0, 0, 0, 0])
    p = np.stack([np.full(8, 0.8), np.full(8, 0.2)], axis=1)
    assert _calibration(SimpleNamespace(calibration_ratio=[1.2, 1.1, 1.4]), y, p) == ([1.2, 1.1, 1.4], pytest.approx(1.25), True)
    assert _calibration(SimpleNamespace(calibration_ratio=[1.0, 0.8, 1.2]), y, p)[2] is False
    assert _calibration(SimpleNamespace(), y, p)[2] is None  # a run folder from before the reading had an interval
    results = [_fold(k, seed=k) for k in range(2)]
    results[0].calibration_ratio, results[0].calibration_exact, results[0].calibration_covered = [1.2, 1.1, 1.4], 1.25, True
    results[1].calibration_ratio, results[1].calibration_exact, results[1].calibration_covered = [1.0, 0.8, 1.2], 1.25, False
    summary = summarize(results)
    assert summary["calibration_coverage"]["runs"] == 2 and summary["calibration_coverage"]["covered"] == 1
    assert summary["calibration_coverage"]["error_mean"] == pytest.approx(-0.15)
    assert "held the exact ratio in 1 of 2 runs; reading minus exact -0.150" in markdown({"federated": summary}, 2)


def test_the_central_dp_study_scores_the_model_the_baseline_releases(physionet_files):
    """``average_study --central-dp``: one training gives the average the baseline releases
    (the very model ``simulations.utility`` scores as central DP, same seed, same fold) and
    its last model, scored on the same patients at the config's level."""
    from common.config import load_config
    from simulations.average_study import score_central_dp
    from simulations.utility import baseline_fold

    overrides = ["data.max_stays=400", "run.rounds=3"]
    both = score_central_dp(overrides, 2, 0, seed=load_config(None, overrides).run.seed)
    reference = baseline_fold(None, overrides, 2, 0, "central-dp")
    assert both["released"]["auroc"] == pytest.approx(reference.pooled.auroc)
    assert both["released"]["auroc"] != both["last round"]["auroc"]  # three rounds averaged, not the last alone
    assert set(both["released"]) == {"auroc", "flagged", "sensitivity", "specificity"}
