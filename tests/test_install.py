"""Every import the package makes at run time is one of its dependencies.

CI installs the test extras, so it never saw that the default run imported
scikit-learn, which only the tests required: the README's first command ended in a
traceback. This installs the package as the README does, in a fresh virtual environment
without the test extras, and runs a short simulation through to the privacy report.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def test_the_readme_install_runs_a_simulation_without_the_test_extras(tmp_path, physionet_files):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    install = subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", "-c", "constraints.txt", "-e", "."],
                             cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]
    missing = subprocess.run([str(venv / "bin" / "python"), "-c", "import pytest"], capture_output=True)
    assert missing.returncode != 0  # the test extras are not there
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "FEDGRU_CACHE": str(tmp_path / "cache"),
           "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}
    run = subprocess.run([str(venv / "bin" / "fedgru"), "simulate", "--rounds", "2", "--out", str(tmp_path / "run"),
                          "--set", "data.max_stays=400"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    console = run.stdout + run.stderr
    assert run.returncode == 0, console[-3000:]
    assert "Traceback" not in console and "could not be computed" not in console
    assert "Pooled test (" in console and "Privacy spent" in console
