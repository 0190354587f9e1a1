"""The one-run privacy audit: its bound against a slow reference implementation of the
theorem, and three audits of a real simulated federation: the DP configuration stays
below its claimed epsilon, DP switched off is caught far above 1, and a planted bug (a
tenth of the noise the accountant counts) is caught above the claim."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from simulations.audit import epsilon_lower_bound, p_value
from tests.conftest import ROOT


def slow_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Theorem 5.2 of Steinke, Nasr & Jagielski (2023), term by term with exact binomials."""
    p = math.exp(epsilon) / (1 + math.exp(epsilon))
    pmf = [math.comb(r, j) * p**j * (1 - p) ** (r - j) for j in range(r + 1)]
    beta = sum(pmf[v:])
    alpha = max((sum(pmf[v - i : v]) / i for i in range(1, v + 1)), default=0.0)
    return min(1.0, beta + 2 * m * delta * alpha)


@pytest.mark.parametrize("m, r, v", [(100, 10, 10), (1000, 200, 140), (1000, 500, 276), (50, 50, 20), (10, 1, 1)])
@pytest.mark.parametrize("epsilon", [0.0, 0.5, 1.0, 3.0])
@pytest.mark.parametrize("delta", [0.0, 1e-5, 1e-3])
def test_p_value_matches_the_theorem_term_by_term(m, r, v, epsilon, delta):
    assert p_value(m, r, v, epsilon, delta) == pytest.approx(slow_p_value(m, r, v, epsilon, delta), rel=1e-9, abs=1e-12)


def test_the_bound_grows_with_right_guesses_and_vanishes_at_chance():
    assert epsilon_lower_bound(1000, 200, 100, 1e-5) == 0.0  # half right: nothing ruled out
    bounds = [epsilon_lower_bound(1000, r, r, 1e-5) for r in (20, 50, 100, 200, 1000)]
    assert all(b > a for a, b in zip(bounds, bounds[1:]))
    assert bounds[-1] == pytest.approx(math.log(0.05 ** (-1 / 1000) - 1) * -1, abs=0.05)  # p**r = 0.05, delta tiny
    b = epsilon_lower_bound(1000, 200, 150, 1e-5)
    assert p_value(1000, 200, 150, b, 1e-5) <= 0.05 < p_value(1000, 200, 150, b + 0.01, 1e-5)


AUDIT = r"""
import json, sys
from pathlib import Path
from common.config import load_config
from common.files import to_json
from simulations.audit import run_audit

def tamper(target):  # the planted bug: a tenth of the noise (its sd) the accountant counts
    if hasattr(target, "variance"):  # secure aggregation's noise (client.secure.AuditedNoise)
        target.variance /= 100
    else:  # the DP-SGD optimizer
        target.noise_multiplier /= 10

cfg = load_config(None, sys.argv[3:])
result = run_audit(cfg, Path(sys.argv[1]), tamper=tamper if sys.argv[2] == "fault" else None)
print(to_json(result, indent=None))
"""

SMALL = ["data.max_stays=800", "run.rounds=5"]


def _audit(tmp_path, fault: str, *overrides: str) -> dict:
    """The audit as a user runs it (``fedgru audit --json``), whose stdout must be one JSON
    object and nothing else; with a planted fault, through the script above."""
    if fault == "none":
        command = [sys.executable, "-m", "fedgru.cli", "audit", "--json", "--out", str(tmp_path / "run"),
                   *(f"--set={o}" for o in (*SMALL, *overrides))]
    else:
        command = [sys.executable, "-c", AUDIT, str(tmp_path / "run"), fault, *SMALL, *overrides]
    proc = subprocess.run(command, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout if fault == "none" else proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_dp_run_stays_below_its_claim(tmp_path, physionet_files):
    result = _audit(tmp_path, "none")
    assert 0.99 <= result["epsilon_claimed"] <= 1.0
    assert result["epsilon_lower_bound"] <= result["epsilon_claimed"]
    assert result["canaries"] == 1000 and result["rounds"] == 5
    report = (tmp_path / "run" / "report.md").read_text()
    assert "Privacy audit" in report


@pytest.mark.slow
def test_dp_switched_off_is_caught_far_above_one(tmp_path, physionet_files):
    result = _audit(tmp_path, "none", "privacy.enabled=false")
    assert result["epsilon_claimed"] is None  # no claim: infinite
    assert result["epsilon_lower_bound"] > 3


@pytest.mark.slow
def test_a_tenth_of_the_noise_is_caught_above_the_claim(tmp_path, physionet_files):
    result = _audit(tmp_path, "fault")
    assert result["epsilon_lower_bound"] > result["epsilon_claimed"] >= 0.99


SECURE = ["privacy.aggregation=secure", "training.sample_rate=1.0", "training.lr=0.5"]


@pytest.mark.slow
def test_secure_aggregation_stays_below_the_hospitals_own_noise_alone(tmp_path, physionet_files):
    """Under secure aggregation the canaries ride in the hospital's own noisy integer sum:
    the bound is checked against the epsilon of its noise alone (the larger of its two)."""
    result = _audit(tmp_path, "none", *SECURE)
    privacy = json.loads((tmp_path / "run" / "privacy.json").read_text())
    entry = privacy["hospitals"][result["hospital"]]
    assert result["epsilon_claimed"] == pytest.approx(entry["epsilon_alone"]) and entry["epsilon_alone"] > entry["epsilon"]
    assert result["epsilon_lower_bound"] <= result["epsilon_claimed"]
    assert "own noisy integer sum" in result["canary_kind"] and result["rounds"] == 5


@pytest.mark.slow
def test_secure_aggregation_with_a_tenth_of_its_noise_is_caught_above_the_claim(tmp_path, physionet_files):
    result = _audit(tmp_path, "fault", *SECURE)
    assert result["epsilon_lower_bound"] > result["epsilon_claimed"] > 1
