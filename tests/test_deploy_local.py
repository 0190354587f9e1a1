"""`fedgru deploy local`: a whole real deployment in one command, as a new user tries it.

The issue's scenario: two hospitals with the default policy (`fedgru hospital init`'s),
three rounds of the default config. Before, round 1 was refused (0.551 per round against
a ceiling of 0.5) and the run went on to spend both hospitals' whole validation and test
budgets on the untrained model. Now the preflight fits each hospital's noise, the run
trains every round, and the epsilons the hospitals' own `fedgru hospital show --json`
print are the ones the run's privacy.json reports. Every process is stopped at the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.deployment]


@pytest.fixture(scope="module")
def deployed(tmp_path_factory, physionet_files):
    out = tmp_path_factory.mktemp("deploy-local") / "try"
    proc = subprocess.run(
        [sys.executable, "-m", "fedgru.cli", "deploy", "local", "--hospitals", "2", "--rounds", "3", "--out", str(out),
         "--set", "data.max_stays=400"],
        cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True, timeout=1200,
    )
    return out, proc


def test_the_scenario_trains_every_round_and_stops_every_process(deployed):
    out, proc = deployed
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    run_dir = next((out / "runs").iterdir())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2, 3] and not any(r["skipped"] for r in metrics["rounds"])
    assert all(a["accepted"] and a["noise_set_by"] == "its per-round ceiling" for a in metrics["preflight"])
    assert metrics["test"] is not None and (run_dir / "model.pt").is_file()
    # the report describes a deployment, not the simulation its config could also run
    report = (run_dir / "report.md").read_text()
    assert "Data: each hospital's own export" in report and "partition `" not in report
    assert "the SuperLink and the hospitals' SuperNodes" in report and "budget at most" in report
    assert proc.stdout.lower().count("run folder:") == 1
    assert "2 hospital(s) connected, 2 accept this plan" in proc.stderr  # fedgru status, before the run
    left = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout.split()
    assert left == [], f"processes still running: {left}"


def test_each_hospitals_own_show_gives_the_epsilons_the_run_reports(deployed):
    out, proc = deployed
    run_dir = next((out / "runs").iterdir())
    privacy = json.loads((run_dir / "privacy.json").read_text())
    for name in ("hospital-1", "hospital-2"):
        shown = subprocess.run([sys.executable, "-m", "fedgru.cli", "hospital", "show", "--hospital-dir",
                                str(out / "hospitals" / name), "--json"], cwd=ROOT, capture_output=True, text=True)
        groups = json.loads(shown.stdout)["groups"]
        reported = privacy["hospitals"][name]
        assert reported["rounds_trained"] == 3
        for group in ("train", "val", "test"):
            assert groups[group]["epsilon"] == pytest.approx(reported["groups"][group]["epsilon_rdp"], abs=1e-9)
            assert 0 < groups[group]["epsilon"] <= groups[group]["budget"] + 1e-9  # moved, and only after training
        assert f"{name}: epsilon train {groups['train']['epsilon']:.3f} of 1" in proc.stdout
