"""A federation of real Flower processes on this machine (what ``tests/test_deployment.py``
and ``simulations.bench_deploy`` drive): one SuperLink with TLS and SuperNode
authentication, one SuperNode per hospital served the approved app by ``fedgru hospital
serve``, and ``flwr run`` of the project. Nothing is simulated: the processes are the
ones a consortium runs, on free localhost ports.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common.paths import project_root

BIN = Path(sys.executable).parent


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


class LocalFederation:
    """Real Flower processes on localhost, as a consortium would run them: one SuperLink
    (TLS, SuperNode authentication, a state database) and, per hospital, a SuperNode
    with no app of its own (``--isolation process``) served the approved app by
    ``fedgru hospital serve``. Every process runs in its own process group and is stopped
    by its id (:meth:`stop_all`); ports are free ones picked at start."""

    def __init__(self, root: Path, project: Path | None = None, run_settings: str = "", config_file: Path | None = None):
        self.root = root
        self.project = project or project_root()
        self.run_settings = run_settings  # config overrides every run gets (``key=value ...``)
        self.config_file = config_file  # the run's config file (None: the app's configs/default.yaml)
        self.port = free_port()
        self.home = root / "flwr-home"
        self.logs = root / "logs"
        self.logs.mkdir(parents=True)
        self.procs: dict[str, subprocess.Popen] = {}
        # The SuperLink and SuperNodes spawn flower-superexec / flwr-clientapp by name:
        # this interpreter's bin folder goes first on PATH even when the venv is not active.
        self.env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                    "FLWR_HOME": str(self.home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                    "PYTHONUNBUFFERED": "1", "FEDGRU_PROJECT_ROOT": str(self.project)}

    def fedgru(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "fedgru.cli", *args], cwd=self.project, env=self.env,
                              capture_output=True, text=True, timeout=300)

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "flwr"), *args], cwd=self.project, env=self.env, capture_output=True, text=True, timeout=timeout)

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "ab")
        proc = subprocess.Popen(argv, cwd=self.project, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
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

    @staticmethod
    def _activations(log_file: Path) -> int:
        """How many times a SuperNode writing to ``log_file`` was let in by the SuperLink."""
        return log_file.read_bytes().count(b"SuperNode ID:") if log_file.is_file() else 0

    def hospital_dir(self, name: str) -> Path:
        return self.root / "hospitals" / name

    def start_supernode(self, name: str, timeout: float = 180) -> subprocess.Popen:
        """A hospital's SuperNode (no app of its own) and the approved app serving it.

        A SuperNode restarted after a crash is refused by the SuperLink (exit code 305,
        "Failed to activate SuperNode") until the SuperLink has seen its old session's
        heartbeats stop; it is started again every few seconds until it is let in, as a
        service manager's restart policy would. Let in means activated (its log names its
        "SuperNode ID"), not merely listening: a refused SuperNode opens its runtime API
        first and exits after, and an app pointed at it then waits on a dead port."""
        folder = self.hospital_dir(name)
        log_file = self.logs / f"supernode-{name}.log"
        deadline = time.monotonic() + timeout
        while True:
            runtime_port = free_port()
            activations = self._activations(log_file)
            node = self.start(f"supernode-{name}", [
                str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{self.port}",
                "--root-certificates", str(self.root / "fed" / "ca.crt"), "--auth-supernode-private-key",
                str(folder / f"{name}.key"), "--isolation", "process", "--port", str(runtime_port),
                "--node-config", f'hospital-dir="{folder}"',
            ])
            started = wait_until(
                lambda: (self._activations(log_file) > activations and self._listening(runtime_port))
                or node.poll() is not None,
                max(1.0, deadline - time.monotonic()), f"{name}'s SuperNode to be let in",
            )
            if node.poll() is None and started:
                break
            if time.monotonic() + 5 >= deadline:
                raise TimeoutError(f"{name}'s SuperNode kept exiting (last exit code {node.returncode}); see its log")
            time.sleep(5)
        self.start(f"serve-{name}", [sys.executable, "-m", "fedgru.cli", "hospital", "serve", "--hospital-dir", str(folder),
                                     "--runtime-api", f"127.0.0.1:{runtime_port}"])
        return node

    def start_supernodes(self, names: tuple[str, ...] | list[str], timeout: float = 180) -> None:
        """Every hospital of ``names`` started at once (:meth:`start_supernode` each, in
        its own thread: each waits for its own SuperNode to be let in, which one after the
        other cost about 15 s a hospital on 2 cores), then until the SuperLink lists them
        all online."""
        with ThreadPoolExecutor(max_workers=len(names)) as pool:
            for started in [pool.submit(self.start_supernode, name, timeout) for name in names]:
                started.result()  # a SuperNode that was never let in raises here
        wait_until(lambda: self.online() == len(names), timeout, f"{len(names)} SuperNodes online")

    def freeze_hospital(self, name: str) -> None:
        """Stop (SIGSTOP) a hospital's SuperNode and app where they are: it answers nothing
        and its connection stays open, as a hung hospital's would."""
        for proc in (self.procs.get(f"supernode-{name}"), self.procs.get(f"serve-{name}")):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGSTOP)

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

    def _hospital_keys(self) -> str:
        """The run-config entry COMMANDS.md gives (the admitted hospitals' keys): the
        coordinator checks secure aggregation's signed round keys against them."""
        folder = self.root / "fed" / "hospitals"
        return f' hospital-keys="{folder}"' if folder.is_dir() else ""

    def _run_config(self, extra: str = "") -> str:
        config = f'set="{self.run_settings} {extra}"' + self._hospital_keys()
        return config + (f' config-file="{self.config_file}"' if self.config_file else "")

    def status_args(self, rounds: int = 0) -> list[str]:
        """``flwr`` arguments of ``fedgru status`` on this federation, for the plan of a run of
        ``rounds`` (0: the config's) with this federation's settings (no run, nothing spent)."""
        return ["run", str(self.project), "fedgru", "--stream", "--run-config",
                f"status=true rounds={rounds} {self._run_config()}"]

    def run_app(self, rounds: int, out: Path, extra: str = "", resume: Path | None = None,
                app: Path | None = None) -> subprocess.Popen:
        """``flwr run`` of the project (or ``app``) on this federation, streaming its log
        (``rounds`` 0: the config's own)."""
        config = f'rounds={rounds} out-dir="{out}" {self._run_config(extra)}'
        if resume is not None:
            config = f'resume="{resume}"' + self._hospital_keys()
        name = f"run-{len([k for k in self.procs if k.startswith('run-')])}-{time.monotonic_ns()}"
        return self.start(name, [str(BIN / "flwr"), "run", str(app or self.project), "fedgru", "--stream",
                                 "--run-config", config])


    def set_up(self, hospitals: dict[str, Path], outcomes: Path | dict[str, Path], max_epsilon: float = 1.0,
               register: tuple[str, ...] | None = None, data_format: str = "physionet2012", config: Path | None = None,
               overrides: list[str] | tuple[str, ...] = ()) -> None:
        """Each hospital's folder (``fedgru hospital init`` on its own data and outcomes,
        with ``config`` and ``overrides``' task and features, ``approve``), ``fedgru
        deploy init`` with the public keys of ``register`` (default: all), the SuperLink
        started and those keys registered. SuperNodes are started separately."""
        definition = ([f"--config={config}"] if config else []) + [f"--set={o}" for o in overrides]

        def make_folder(name: str, data: Path) -> None:
            own = outcomes[name] if isinstance(outcomes, dict) else outcomes
            self.check(self.fedgru("hospital", "init", "--out", str(self.hospital_dir(name)), "--name", name,
                                   "--data", str(data), "--outcomes", str(own), "--max-epsilon", str(max_epsilon),
                                   "--device", "cpu", "--format", data_format, *definition))
            self.check(self.fedgru("hospital", "approve", "--hospital-dir", str(self.hospital_dir(name)), "--note", "local"))

        # each hospital's staff make their own folder, at the same time as the others' (one after the other
        # took about 11 s a hospital on 2 cores: approving hashes the app's FAB)
        with ThreadPoolExecutor(max_workers=len(hospitals)) as pool:
            for made in [pool.submit(make_folder, name, data) for name, data in hospitals.items()]:
                made.result()
        self.list_peers(tuple(hospitals))
        register = tuple(hospitals) if register is None else register
        keys = [a for n in register for a in ("--hospital", f"{n}={self.hospital_dir(n) / (n + '.pub')}")]
        self.check(self.fedgru("deploy", "init", "--out", str(self.root / "fed"), *keys, "--port", str(self.port)))
        self.home.mkdir(exist_ok=True)
        (self.home / "config.toml").write_text('[superlink]\ndefault = "fedgru"\n\n'
                                               + (self.root / "fed" / "flwr-config.toml").read_text())
        self.start_superlink()
        for name in register:
            self.check(self.flwr("supernode", "register", str(self.root / "fed" / "hospitals" / f"{name}.pub"), "fedgru"))

    def list_peers(self, names: tuple[str, ...]) -> None:
        """Each hospital lists every other one in its policy's ``peer_keys`` (what
        ``fedgru hospital peer`` does; in-process here, to spare a process start per pair),
        as a consortium's staff exchange their ``<name>.pub`` files: in secure aggregation
        each then accepts only the others' signed round keys (``client.peer_keys``)."""
        from client.commands import add_peer

        for name in names:
            for other in names:
                if other != name:
                    add_peer(self.hospital_dir(name), other, self.hospital_dir(other) / f"{other}.pub")

    @staticmethod
    def check(result: subprocess.CompletedProcess) -> None:
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(map(str, result.args[:4]))} failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")


def cut_stays(archive: Path, out: Path, names: tuple[str, ...], per_hospital: int) -> dict[str, Path]:
    """Give each hospital its own folder of ``per_hospital`` stays, in PhysioNet's own
    format, cut in order from a set-*.tar.gz (what each hospital would export)."""
    import tarfile

    folders = {}
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.name.endswith(".txt")]
        for i, name in enumerate(names):
            folder = out / name
            folder.mkdir(parents=True)
            for m in members[i * per_hospital : (i + 1) * per_hospital]:
                (folder / Path(m.name).name).write_bytes(tar.extractfile(m).read())
            folders[name] = folder
    return folders


def serverapp_pids(flwr_home: Path | None = None) -> list[int]:
    """Process ids of the running ServerApp processes (a SuperLink's ``flwr-serverapp``);
    with ``flwr_home``, only those of the federation run under that FLWR_HOME (the
    SuperLink passes its environment on through flower-superexec), so a test never
    touches another federation's coordinator on the same machine (a second test worker's)."""
    mark = f"FLWR_HOME={flwr_home}".encode() if flwr_home is not None else None
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
                if not any(part.endswith(b"flwr-serverapp") for part in argv[:2]):
                    continue
                if mark is not None and mark not in (entry / "environ").read_bytes().split(b"\0"):
                    continue
            except OSError:  # gone meanwhile, or not ours to read
                continue
            pids.append(int(entry.name))
    return pids


def memory_holds(pid: int, patterns: dict[str, bytes]) -> dict[str, bool]:
    """Which of ``patterns`` occur anywhere in the readable memory of process ``pid``
    (Linux: /proc/PID/maps and /proc/PID/mem; needs the right to trace it). A pattern
    split across two chunks is found: chunks overlap by the longest pattern."""
    found = {name: False for name in patterns}
    overlap = max(len(p) for p in patterns.values())
    chunk = 1 << 24
    try:
        with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
            for line in maps:
                fields = line.split()
                span, perms = fields[0], fields[1]
                if "r" not in perms or (len(fields) > 5 and fields[5] in ("[vvar]", "[vsyscall]")):
                    continue
                start, end = (int(x, 16) for x in span.split("-"))
                at, tail = start, b""
                while at < end:
                    try:
                        mem.seek(at)
                        data = tail + mem.read(min(chunk, end - at))
                    except (OSError, ValueError, OverflowError):
                        break
                    for name, pattern in patterns.items():
                        if not found[name] and pattern in data:
                            found[name] = True
                    tail = data[-overlap:]
                    at += chunk
    except (FileNotFoundError, ProcessLookupError):  # it exited meanwhile: what was found so far stands
        pass
    return found
