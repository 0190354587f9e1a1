"""`flwr run .` against a real local SuperLink in simulation mode, on free ports.

The test starts its own ``flower-superlink --simulation`` with a private FLWR_HOME,
points a connection at it, runs the app with ``flwr run``, and stops the SuperLink's
whole process group by its pid at the end.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listens on port {port}")


@pytest.fixture
def superlink(tmp_path):
    home = tmp_path / "flwr-home"
    home.mkdir()
    port = free_port()  # Flower 1.42 serves the Control, Fleet and Runtime APIs on one HTTP port
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    bin_dir = Path(sys.executable).parent
    # The SuperLink spawns flower-superexec and flwr-simulation by name: this
    # interpreter's bin folder goes first on PATH even when the venv is not active.
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    proc = subprocess.Popen(
        [
            str(bin_dir / "flower-superlink"), "--insecure", "--simulation",
            "--host", "127.0.0.1", "--port", str(port),
            "--disable-runtime-dependency-installation",
        ],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        wait_for_port(port)
        yield env, bin_dir
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the SuperLink and the simulation it spawned
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def test_flwr_run_runs_the_app_and_writes_a_run_folder(superlink, tmp_path, physionet_files):
    env, bin_dir = superlink
    out = tmp_path / "runs"
    overrides = "data.max_stays=300 model.gru_hidden=[8] model.head_hidden=0"
    proc = subprocess.run(
        [
            str(bin_dir / "flwr"), "run", ".", "test", "--stream",
            "--federation-config", "num-supernodes=4",
            "--run-config", f'rounds=2 out-dir="{out}" set="{overrides}"',
        ],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    runs = list(out.iterdir())
    assert len(runs) == 1, log[-4000:]
    run = runs[0]
    for name in ("model.pt", "metrics.json", "privacy.json", "partition.json", "report.md"):
        assert (run / name).is_file(), (name, log[-3000:])
    assert "round 1/2 | max epsilon" in log and "round 2/2 | max epsilon" in log
