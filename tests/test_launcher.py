"""The hospital's task launcher (``fedgru hospital serve``) never lets one task hold up
the next: finished tasks are collected without waiting, and a task that outlives its
timeout (a run that died under it) is stopped. The whole path, with real SuperNodes, is
in test_deployment.py; this checks the bookkeeping on real child processes."""

from __future__ import annotations

import logging
import os
import subprocess
import time
from types import SimpleNamespace

import pytest

from client.launcher import Gate


def _gate(task_timeout_s: float) -> Gate:
    # Gate() builds the app and checks the approved hash; reap() needs neither.
    gate = Gate.__new__(Gate)
    gate.folder = SimpleNamespace(name="hospital-a")
    gate.task_timeout_s = task_timeout_s
    gate.children = {}
    return gate


def _wait_exited(proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return
        except ChildProcessError:
            return
        time.sleep(0.02)
    raise AssertionError("child did not exit")


def test_reap_collects_ended_tasks_and_stops_one_past_its_timeout(caplog):
    gate = _gate(task_timeout_s=5)
    stuck = subprocess.Popen(["sleep", "60"])
    failed = subprocess.Popen(["sh", "-c", "exit 3"])
    fine = subprocess.Popen(["true"])
    running = subprocess.Popen(["sleep", "60"])
    now = time.monotonic()
    gate.children = {stuck.pid: now - 10, failed.pid: now, fine.pid: now, running.pid: now}
    _wait_exited(failed)
    _wait_exited(fine)
    try:
        with caplog.at_level(logging.WARNING, logger="fedgru.hospital"):
            gate.reap()
        assert set(gate.children) == {running.pid}
        with pytest.raises(ChildProcessError):  # killed and already collected
            os.waitpid(stuck.pid, os.WNOHANG)
        messages = [r.getMessage() for r in caplog.records]
        assert sum("ran past 5 s" in m for m in messages) == 1
        assert sum("ended early" in m for m in messages) == 1  # the exit 3, not the clean exit
    finally:
        running.kill()
        running.wait()
