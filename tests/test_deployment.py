"""A real per-hospital deployment on localhost: one SuperLink (TLS, SuperNode
authentication, state database) and one SuperNode per hospital, each with its own
folder made by ``fedgru hospital init`` (data cut from set A, policy, key pair, ledger),
running no app of its own (``--isolation process``) and served the approved app by
``fedgru hospital serve``.

One module-scoped scenario drives real processes on free ports and records what
happened; the tests below check it. The scenario:

1. Each hospital makes its folder and approves the app; ``fedgru deploy init`` takes the
   public keys of a, b, c and registers them; d is never registered.
2. d's SuperNode tries to join and is refused.
3. Run 1 (3 rounds): c's SuperNode and app are killed while c trains round 1 and
   restarted after; the coordinator (the ServerApp process) is killed right after its
   round-2 checkpoint and the run is resumed from that checkpoint.
4. Run 2 (1 round): every hospital's ledger carries on from run 1.
5. Run 3: the same project with one changed line: no hospital runs it, and each
   hospital's log says why.

Every process started is stopped by its process group id at the end.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from tests.conftest import OUTCOMES, ROOT, SET_A

pytestmark = [pytest.mark.slow, pytest.mark.deployment]

BIN = Path(sys.executable).parent
HOSPITALS = ("a", "b", "c")
CANARY = "187.654321"  # a heart rate no log line may ever show
# Each run plans epsilon 0.4 for every group of patients against the hospitals' budgets
# of 1, so run 2 has budget left to spend on top of run 1 (at target 1 run 1 would spend
# it all and run 2 would, correctly, refuse to train and to evaluate).
SMALL = ("model.architecture=per_variable model.gru_hidden=[2] model.head_hidden=0 training.batch_size=32 "
         "strategy.round_timeout_s=45 privacy.target_epsilon=0.4 strategy.discovery_timeout_s=60 "
         "evaluation.val_epsilon=0.4 evaluation.test_epsilon=0.4")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(interval)
    raise TimeoutError(f"timed out waiting for {what}")


class Federation:
    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.home = root / "flwr-home"
        self.logs = root / "logs"
        self.logs.mkdir(parents=True)
        self.procs: dict[str, subprocess.Popen] = {}
        # The SuperLink and SuperNodes spawn flower-superexec / flwr-clientapp by name:
        # this interpreter's bin folder goes first on PATH even when the venv is not active.
        self.env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                    "FLWR_HOME": str(self.home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                    "PYTHONUNBUFFERED": "1", "FEDGRU_PROJECT_ROOT": str(ROOT)}

    def fedgru(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "fedgru.cli", *args], cwd=ROOT, env=self.env,
                              capture_output=True, text=True, timeout=300)

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "flwr"), *args], cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout)

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "ab")
        proc = subprocess.Popen(argv, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[name] = proc
        return proc

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)

    def start_superlink(self) -> None:
        d = self.root / "fed"
        self.start("superlink", [
            str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(d / "ca.crt"),
            "--ssl-certfile", str(d / "superlink.crt"), "--ssl-keyfile", str(d / "superlink.key"),
            "--enable-supernode-auth", "--database", str(self.root / "superlink.db"),
            "--host", "127.0.0.1", "--port", str(self.port), "--disable-runtime-dependency-installation",
        ])
        wait_until(lambda: self._listening(self.port), 60, "the SuperLink")

    @staticmethod
    def _listening(port: int) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    def hospital_dir(self, name: str) -> Path:
        return self.root / "hospitals" / name

    def start_supernode(self, name: str) -> subprocess.Popen:
        """A hospital's SuperNode (no app of its own) and the approved app serving it."""
        folder = self.hospital_dir(name)
        runtime_port = free_port()
        node = self.start(f"supernode-{name}", [
            str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{self.port}",
            "--root-certificates", str(self.root / "fed" / "ca.crt"), "--auth-supernode-private-key",
            str(folder / f"{name}.key"), "--isolation", "process", "--port", str(runtime_port),
            "--node-config", f'hospital-dir="{folder}"',
        ])
        wait_until(lambda: self._listening(runtime_port), 60, f"{name}'s runtime API")
        self.start(f"serve-{name}", [sys.executable, "-m", "fedgru.cli", "hospital", "serve", "--hospital-dir", str(folder),
                                     "--runtime-api", f"127.0.0.1:{runtime_port}"])
        return node

    def stop_hospital(self, name: str, sig: int = signal.SIGTERM) -> None:
        self.stop(f"supernode-{name}", sig)
        self.stop(f"serve-{name}", sig)

    def ledger(self, name: str) -> Path:
        return self.hospital_dir(name) / "ledger.json"

    def online(self) -> int:
        out = self.flwr("supernode", "list", "fedgru", "--format", "json").stdout
        try:
            nodes = json.loads(out).get("nodes", [])
        except ValueError:
            return 0
        return sum(1 for n in nodes if str(n.get("status", "")).lower() == "online")

    def run_app(self, rounds: int, out: Path, extra: str = "", resume: Path | None = None, app: Path = ROOT) -> subprocess.Popen:
        config = f'rounds={rounds} out-dir="{out}" set="{SMALL} {extra}"'
        if resume is not None:
            config = f'resume="{resume}"'
        name = f"run-{len([k for k in self.procs if k.startswith('run-')])}-{time.monotonic_ns()}"
        return self.start(name, [str(BIN / "flwr"), "run", str(app), "fedgru", "--stream", "--run-config", config])


def _cut_data(root: Path) -> None:
    with tarfile.open(SET_A) as tar:
        members = [m for m in tar.getmembers() if m.name.endswith(".txt")]
        for i, name in enumerate(HOSPITALS + ("d",)):
            folder = root / "data" / name
            folder.mkdir(parents=True)
            for m in members[i * 150 : (i + 1) * 150]:
                data = tar.extractfile(m).read()
                (folder / Path(m.name).name).write_bytes(data)
    # A canary value in hospital a's data: it must never appear in any log.
    first = sorted((root / "data" / "a").iterdir())[0]
    first.write_text(first.read_text().rstrip("\n") + f"\n01:30,HR,{CANARY}\n")


def _checkpoint_round(run_dir: Path) -> int:
    import torch

    path = run_dir / "checkpoint.pt"
    if not path.is_file():
        return 0
    try:
        return int(torch.load(path, weights_only=True)["round"])
    except Exception:  # noqa: BLE001 - being written
        return 0


def _dp_entries(ledger_path: Path, run_id: str | None = None) -> list[dict]:
    entries = json.loads(ledger_path.read_text())["entries"]
    return [e for e in entries if e["mechanism"] == "dp-sgd" and (run_id is None or e["run_id"] == run_id)]


def _changed_app(root: Path) -> Path:
    """The project with one changed line: another app version, which nobody approved."""
    copy = root / "fedgru-changed"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "__pycache__", "*.egg-info"))
    app = copy / "client" / "app.py"
    app.write_text(app.read_text().replace('STATE_KEY = "fedgru-local-state"', 'STATE_KEY = "fedgru-local-state"  # changed'))
    return copy


@pytest.fixture(scope="module")
def scenario(tmp_path_factory, physionet_files):
    root = tmp_path_factory.mktemp("deploy")
    fed = Federation(root)
    record: dict = {"root": root}
    try:
        _cut_data(root)
        for name in HOSPITALS + ("d",):
            res = fed.fedgru("hospital", "init", "--out", str(fed.hospital_dir(name)), "--name", name,
                             "--data", str(root / "data" / name), "--outcomes", str(OUTCOMES), "--max-epsilon", "1.0",
                             "--device", "cpu")
            assert res.returncode == 0, res.stderr
            res = fed.fedgru("hospital", "approve", "--hospital-dir", str(fed.hospital_dir(name)), "--note", "test")
            assert res.returncode == 0, res.stderr
        keys = [a for n in HOSPITALS for a in ("--hospital", f"{n}={fed.hospital_dir(n) / (n + '.pub')}")]
        out = fed.fedgru("deploy", "init", "--out", str(root / "fed"), *keys, "--port", str(fed.port))
        assert out.returncode == 0, out.stderr
        record["commands"] = (root / "fed" / "COMMANDS.md").read_text()
        fed.home.mkdir()
        (fed.home / "config.toml").write_text('[superlink]\ndefault = "fedgru"\n\n' + (root / "fed" / "flwr-config.toml").read_text())
        fed.start_superlink()
        for name in HOSPITALS:  # d is never registered
            res = fed.flwr("supernode", "register", str(root / "fed" / "hospitals" / f"{name}.pub"), "fedgru")
            assert res.returncode == 0, res.stdout + res.stderr
        for name in HOSPITALS:
            fed.start_supernode(name)
        wait_until(lambda: fed.online() == 3, 120, "three SuperNodes online")

        # 2. an unregistered hospital tries to join
        intruder = fed.start("supernode-d", [
            str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{fed.port}", "--root-certificates",
            str(root / "fed" / "ca.crt"), "--auth-supernode-private-key", str(fed.hospital_dir("d") / "d.key"),
            "--isolation", "process", "--port", str(free_port()), "--node-config", f'hospital-dir="{fed.hospital_dir("d")}"',
        ])
        try:
            intruder.wait(timeout=90)
        except subprocess.TimeoutExpired:
            pass
        record["intruder_exit"] = intruder.poll()
        record["online_after_intruder"] = fed.online()

        # 3. run 1: kill c mid-round 1, kill the coordinator after round 2, resume
        runs = root / "runs"
        t0 = time.monotonic()
        first = fed.run_app(3, runs)
        wait_until(lambda: _dp_entries(fed.ledger("c")), 300, "c to start round 1")
        fed.stop_hospital("c", signal.SIGKILL)
        record["c_killed"] = True
        run_dir = wait_until(lambda: next(iter(runs.iterdir()), None) if runs.exists() else None, 60, "the run folder")
        wait_until(lambda: _checkpoint_round(run_dir) >= 1, 300, "round 1's checkpoint")
        fed.start_supernode("c")  # back after its crash
        wait_until(lambda: _checkpoint_round(run_dir) >= 2, 300, "round 2's checkpoint")
        serverapps = subprocess.run(["pgrep", "-f", "flwr-serverapp"], capture_output=True, text=True).stdout.split()
        for pid in serverapps:
            os.kill(int(pid), signal.SIGKILL)
        record["serverapp_killed"] = bool(serverapps)
        try:
            first.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        for name in [k for k in fed.procs if k.startswith("run-")]:
            fed.stop(name)
        resumed = fed.run_app(3, runs, resume=run_dir)
        resumed.wait(timeout=600)
        record["run1_seconds"] = time.monotonic() - t0
        record["run_dir"] = run_dir
        record["resumed_rc"] = resumed.returncode

        # 4. run 2, to check the ledgers carry on
        runs2 = root / "runs2"
        t1 = time.monotonic()
        second = fed.run_app(1, runs2)
        second.wait(timeout=600)
        record["run2_rc"] = second.returncode
        record["run2_seconds"] = time.monotonic() - t1
        record["run2_dir"] = next(iter(runs2.iterdir()), None) if runs2.exists() else None

        # 5. an app version nobody approved
        record["ledgers_before_changed"] = {n: fed.ledger(n).read_text() for n in HOSPITALS}
        changed = fed.run_app(1, root / "runs3", extra="strategy.discovery_timeout_s=20", app=_changed_app(root))
        changed.wait(timeout=300)
        record["changed_models"] = list((root / "runs3").rglob("model.pt"))
        record["ledgers_after_changed"] = {n: fed.ledger(n).read_text() for n in HOSPITALS}
    finally:
        fed.stop_all()
    record["logs"] = {p.name: p.read_text(errors="replace") for p in fed.logs.iterdir()}
    return record


def test_deploy_init_wrote_keys_and_commands(scenario):
    fed_dir = scenario["root"] / "fed"
    for f in ("ca.crt", "superlink.crt", "superlink.key", "flwr-config.toml", "COMMANDS.md"):
        assert (fed_dir / f).is_file()
    assert (fed_dir / "superlink.key").stat().st_mode & 0o777 == 0o600
    for name in HOSPITALS:
        assert (fed_dir / "hospitals" / f"{name}.pub").is_file()
        assert not list(fed_dir.rglob(f"{name}.key"))  # the coordinator never holds a hospital's private key
        key = scenario["root"] / "hospitals" / name / f"{name}.key"
        assert key.stat().st_mode & 0o777 == 0o600
        commands = scenario["commands"]
        assert "flwr supernode register" in commands and f'hospital-dir=\"/srv/fedgru/{name}\"' in commands
        assert "--isolation process" in commands and "fedgru hospital serve" in commands


def test_an_unregistered_hospital_is_refused_and_never_trains(scenario):
    assert scenario["intruder_exit"] not in (None, 0)  # the SuperNode gave up: not admitted
    assert scenario["online_after_intruder"] == 3
    ledger = scenario["root"] / "hospitals" / "d" / "ledger.json"
    assert json.loads(ledger.read_text())["entries"] == []


def test_an_app_with_one_changed_line_runs_nowhere(scenario):
    assert scenario["changed_models"] == []  # no hospital took part: the run never trained
    assert any("0 hospital(s) answered" in text for name, text in scenario["logs"].items() if name.startswith("run-"))
    assert scenario["ledgers_after_changed"] == scenario["ledgers_before_changed"]  # nothing released
    for name in HOSPITALS:
        assert "is not an app version this hospital approved" in scenario["logs"][f"serve-{name}.log"]


def test_run_survives_a_crashed_hospital_and_a_restarted_coordinator(scenario):
    assert scenario["c_killed"] and scenario["serverapp_killed"]
    assert scenario["resumed_rc"] == 0, scenario["logs"]
    run_dir = scenario["run_dir"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2, 3]
    assert (run_dir / "model.pt").is_file() and "test" in metrics
    round1 = metrics["rounds"][0]
    assert "c" not in round1["hospitals"] or round1["hospitals"]["c"]["train"] is None
    assert any(d["hospital"] == "c" for d in round1["dropped"])
    assert not round1["skipped"]  # a and b were enough
    # c came back and trained again in round 3
    assert metrics["rounds"][2]["hospitals"]["c"]["train"] is not None


def test_no_hospital_is_charged_twice(scenario):
    run_id = json.loads((scenario["run_dir"] / "metrics.json").read_text())["run_id"]
    for name in HOSPITALS:
        rounds = [e["round"] for e in _dp_entries(scenario["root"] / "hospitals" / name / "ledger.json", run_id)]
        assert len(rounds) == len(set(rounds)), (name, rounds)
        assert set(rounds) <= {1, 2, 3}


def test_ledgers_accumulate_across_two_runs(scenario):
    from client.folder import HospitalFolder
    from client.ledger_store import FileLedgerStore
    from common.ledger import Ledger

    assert scenario["run2_rc"] == 0
    privacy = json.loads((scenario["run2_dir"] / "privacy.json").read_text())
    for name in HOSPITALS:
        folder = HospitalFolder(scenario["root"] / "hospitals" / name)
        ledger = FileLedgerStore(folder.ledger_file, folder.secret("ledger")).read()
        assert len(ledger.runs()) == 2 and privacy["run_id"] in ledger.runs()
        before = Ledger(ledger.hospital, ledger.delta, entries=[e for e in ledger.entries if e.run_id != privacy["run_id"]])
        assert 0 < before.epsilon() < ledger.epsilon()  # run 2 starts from run 1's spending
        assert privacy["hospitals"][name]["epsilon"] == pytest.approx(ledger.epsilon(), abs=1e-9)
        assert privacy["hospitals"][name]["earlier_runs"]
        groups = privacy["hospitals"][name]["groups"]
        assert set(groups) == {"train", "val", "test"} and groups["test"]["releases"] == 2  # once per run


def test_no_patient_value_reaches_any_log(scenario):
    texts = list(scenario["logs"].values())
    for run_dir in (scenario["run_dir"], scenario["run2_dir"]):
        texts += [p.read_text(errors="replace") for p in run_dir.iterdir() if p.suffix in (".json", ".md", ".yaml", ".html")]
    assert all(CANARY not in t for t in texts)
    assert not any(re.search(r"\b187\.65", t) for t in texts)
