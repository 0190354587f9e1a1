"""The fedgru command line and the README's promises about it."""

from __future__ import annotations

import json

import pytest

from tests.conftest import ROOT


def test_plan_cli_prints_sigma_and_epsilons(capsys):
    from fedgru.cli import main

    assert main(["plan", "--epsilon", "1", "--delta", "1e-5", "--rounds", "4", "--local-epochs", "1", "--batch-size", "64", "--examples", "1000", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["steps_per_round"] == 16 and len(out["epsilon_per_round"]) == 4
    assert out["epsilon_per_round"][-1] == pytest.approx(1.0, abs=1e-3)


def test_readme_opens_with_the_two_commands_and_ci_runs_the_second():
    """The README's first lines: install + default simulation, then install + tests; CI
    runs exactly that second command, which sets up everything (Chromium included)."""
    text = (ROOT / "README.md").read_text().splitlines()
    commands = [line.strip() for line in text[:20] if line.startswith("    ")]
    assert len(commands) == 2
    assert commands[0].startswith("python3 -m venv .venv") and commands[0].endswith("fedgru simulate")
    assert "pip install -c constraints.txt" in commands[0]
    assert commands[1] == "bash .ci/run"
    ci = (ROOT / ".ci" / "run").read_text()
    assert "apt-get install" in ci and "chromium" in ci
    assert 'pip install --quiet -c constraints.txt -e ".[test]"' in ci and ci.rstrip().endswith("python -m pytest")
