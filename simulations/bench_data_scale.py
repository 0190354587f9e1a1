"""Benchmark: what a hospital's own data costs as it grows from thousands to 100,000 stays.

    python -m simulations.bench_data_scale [--stays 4000,20000,100000] [--format physionet2012|long_csv|both]
                                           [--rounds 2] [--threads N] [--json FILE] [--workdir DIR] [--keep]

Every measurement so far used set A's 4,000 stays. For each size N this writes a synthetic
export of N stays (``simulations.synthetic_export``: set A's stays resampled under new ids,
times and values jittered; for cost only, never for a utility claim) and measures, each
step in a process of its own, as a hospital runs it:

- **init cold**: ``fedgru hospital init`` on a fresh folder (the CLI itself: it parses the
  whole export, preprocesses it and writes the folder's tensor cache, ``cache/``);
- **cached**: what every message does instead of parsing: open the folder and its cache
  (``client.export.load``: memory-mapped tensors, each stay's split from its keyed hash),
  then read every tensor byte once. The cache was just written, so its pages come from
  the operating system's page cache, not the disk;
- **round** and **round, GRU trained**: ``--rounds`` (2) DP-SGD rounds of the deployed
  hospital's ClientApp ``train`` handler (``client.app.train``, called with a real Flower
  message and context as its SuperNode calls it, without the network): request checks,
  ledger, the data load, one local epoch of Poisson batches on the training split. First
  with the default config (``model.train_gru: false``: only the head learns), then with
  ``model.train_gru: true`` (FastDPGRU's DP backward through the GRU);
- the cache's size on disk.

Times are wall seconds; a step's process time includes Python and torch starting (about
2-4 s); the round columns are the handler's own wall and CPU seconds (CPU: the process's
own, all threads; steadier than wall time on a shared machine), the mean of the rounds
after the first (the first also calibrates the noise and warms torch up; every round is in
the JSON). With ``--keep`` an export already written in ``--workdir`` is used again. Peak memory is the largest resident
set of the step's process tree: the larger of the kernel's own maximum (``wait4``'s
``ru_maxrss``) and the sum over the tree sampled every 0.2 s; memory-mapped cache pages
that were read count in it. ``--max-memory-gb`` stops a step whose tree passes it (a
shared machine). The table adds each number per 1,000 stays, so growth reads at a glance:
a column that stays flat grows linearly. Only cost is measured, never a model's quality.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from common.files import write_json
from common.paths import project_root, resolve

MAX_EPSILON = 1.0  # the default config's budget: its rounds fit the default policy
NAME = "bench"


@dataclass
class Step:
    """One measured step: its process's wall time and peak memory."""

    seconds: float
    peak_gb: float
    result: dict = field(default_factory=dict)  # what the step's process reported
    stopped: str = ""  # why the step was stopped ("" when it ran to its end)


@dataclass
class SizeResult:
    format: str
    stays: int
    export_seconds: float
    export_mb: float
    init_cold: Step
    cached: Step | None
    round_default: Step | None
    round_gru: Step | None
    stays_read: int
    cache_mb: float

    def per_1000(self, value: float | None) -> float | None:
        return None if value is None else value * 1000 / self.stays


class TreeMemory:
    """The largest sum of resident set sizes of a process tree, sampled; stops the tree
    (the whole process group) when it passes ``cap`` bytes."""

    def __init__(self, proc: subprocess.Popen, cap: float, interval: float = 0.2):
        self.proc, self.cap, self.interval = proc, cap, interval
        self.peak, self.stopped = 0, ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        try:
            root = psutil.Process(self.proc.pid)
        except psutil.NoSuchProcess:
            return
        while not self._stop.is_set():
            total = 0
            try:
                for p in [root, *root.children(recursive=True)]:
                    try:
                        total += p.memory_info().rss
                    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                        pass
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                return
            self.peak = max(self.peak, total)
            if total > self.cap and not self.stopped:
                self.stopped = f"stopped: memory passed {self.cap / 2**30:.1f} GB"
                os.killpg(self.proc.pid, 9)  # its own group (start_new_session): only what this bench started
            self._stop.wait(self.interval)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def measure(args: list[str], cap_gb: float, timeout_s: float) -> tuple[Step, str]:
    """Run ``args`` (a Python module and its arguments) as a process of its own; its wall
    time, peak memory and output."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(project_root()), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", *args], cwd=project_root(), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    memory = TreeMemory(proc, cap_gb * 2**30)
    timer = threading.Timer(timeout_s, lambda: os.killpg(proc.pid, 9))
    timer.start()
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage: ru_maxrss in KiB
    proc.returncode = os.waitstatus_to_exitcode(status)
    timer.cancel()
    seconds = time.perf_counter() - start
    peak = max(memory.stop(), usage.ru_maxrss * 1024)
    stopped = memory.stopped or (f"stopped: longer than {timeout_s:.0f} s" if seconds >= timeout_s else "")
    if proc.returncode != 0 and not stopped:
        raise RuntimeError(f"{' '.join(args[:3])} failed (exit {proc.returncode}):\n{output[-3000:]}")
    result = {}
    for line in output.splitlines()[::-1]:  # a child step's last line is its JSON
        if line.startswith("{"):
            result = json.loads(line)
            break
    return Step(round(seconds, 2), round(peak / 2**30, 3), result, stopped), output


def folder_size_mb(path: Path) -> float:
    return round(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6, 1) if path.exists() else 0.0


def bench_size(source, fmt: str, stays: int, work: Path, rounds: int, cap_gb: float, timeout_s: float,
               seed: int, threads: int = 0) -> SizeResult:
    """One export size: write (or reuse) the export, then each step in its own process;
    ``rounds`` 0 leaves the rounds out (they read the same tensors whatever the format)."""
    from simulations.synthetic_export import existing_export, write_export

    t0 = time.perf_counter()
    export = existing_export(work / "export", stays, fmt, seed)  # --keep: one written before, byte for byte
    reused = export is not None
    export = export or write_export(source, stays, work / "export", fmt, seed)
    export_seconds = 0.0 if reused else time.perf_counter() - t0
    folder = work / "hospital"
    shutil.rmtree(folder, ignore_errors=True)
    init, output = measure(["fedgru.cli", "hospital", "init", "--out", str(folder), "--name", NAME,
                            "--data", str(export.data), "--outcomes", str(export.outcomes),
                            "--max-epsilon", str(MAX_EPSILON), "--format", fmt, "--id-column", export.id_column,
                            "--label-column", export.label_column], cap_gb, timeout_s)
    found = re.search(r"(\d+) stays read", output)
    stays_read = int(found.group(1)) if found else 0
    cached = round_default = round_gru = None
    if not init.stopped:
        child = ["simulations.bench_data_scale", "--child"]
        cached, _ = measure([*child, "cached", str(folder)], cap_gb, timeout_s)
        if rounds > 0:
            train = [*child, "round", str(folder), "--rounds", str(rounds), "--set", f"training.threads={threads}"]
            round_default, _ = measure(train, cap_gb, timeout_s)
            round_gru, _ = measure([*train, "--set", "model.train_gru=true"], cap_gb, timeout_s)
    return SizeResult(fmt, stays, round(export_seconds, 1), round(export.data.stat().st_size / 1e6, 1), init, cached,
                      round_default, round_gru, stays_read, folder_size_mb(folder / "cache"))


# -- the child steps (each in a process of its own) ------------------------------------


def child_cached(folder: Path) -> dict:
    """Open the hospital's cache as a message does, then read every tensor byte once."""
    import numpy as np

    from client import export
    from client.folder import HospitalFolder

    t0 = time.perf_counter()
    stays = export.load(HospitalFolder(folder))
    opened = time.perf_counter() - t0
    ds, total = stays.dataset, 0.0
    for i in range(0, len(ds), 4096):  # in pieces: reading never holds a second copy of the cache
        total += float(np.asarray(ds.X[i:i + 4096], dtype=np.float64).sum()) + float(np.asarray(ds.S[i:i + 4096]).sum())
    return {"stays": len(ds), "train": len(stays.train), "open_seconds": round(opened, 3),
            "read_seconds": round(time.perf_counter() - t0, 3), "checksum": total}


def child_round(folder: Path, rounds: int, overrides: list[str]) -> dict:
    """``rounds`` rounds of the deployed hospital's ``train`` handler on the default config
    (with ``overrides``), each starting from the weights the last one returned."""
    import torch
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from client import app as client_app
    from common import messages as M
    from common.config import load_config
    from common.model import GRUClassifier, model_spec

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # what a SuperNode sets per task
    cfg = load_config(None, overrides)
    torch.manual_seed(cfg.run.seed)  # round 1's global model, as the coordinator makes it (server.coordinator)
    arrays = ArrayRecord(torch_state_dict=GRUClassifier(model_spec(cfg), gru_impl="torch").state_dict())
    context = Context(run_id=1, node_id=7, node_config={"hospital-dir": str(folder)}, state=RecordDict(), run_config={})
    seconds, cpu, steps = [], [], []
    for r in range(1, rounds + 1):
        config = ConfigRecord({M.EXPERIMENT_JSON: cfg.to_json(), M.RUN_ID: "bench-data-scale", M.SERVER_ROUND: r,
                               M.EVALUATE: ""})
        msg = Message(RecordDict({M.ARRAYS: arrays, M.CONFIG: config}), dst_node_id=7, message_type=MessageType.TRAIN)
        t0, c0 = time.perf_counter(), time.process_time()
        reply = client_app.train(msg, context)
        seconds.append(round(time.perf_counter() - t0, 3))
        cpu.append(round(time.process_time() - c0, 3))
        status = dict(reply.content[M.STATUS])
        if status[M.STATE] != M.ReplyState.TRAINED.value:
            raise RuntimeError(f"round {r}: the hospital answered {status}")
        steps.append(int(reply.content[M.METRICS][M.STEPS]))
        arrays = reply.content[M.ARRAYS]
    return {"round_seconds": seconds, "round_cpu_seconds": cpu, "steps": steps, "train_gru": cfg.model.train_gru,
            "seconds_per_step": round(sum(seconds) / max(sum(steps), 1), 4)}


# -- the table ---------------------------------------------------------------------------


def _mean_after_first(values: list[float]) -> float | None:
    """The mean of the rounds after the first when there are several (the first also pays,
    once per process, for the noise calibration and torch's first calls)."""
    values = values[1:] or values
    return sum(values) / len(values) if values else None


def _round(step: Step | None, key: str = "round_seconds") -> float | None:
    if step is None or step.stopped:
        return None
    return _mean_after_first(step.result.get(key, []))


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _wall(step: Step | None) -> float | None:
    return None if step is None or step.stopped else step.seconds


def _gb(step: Step | None) -> str:
    return "-" if step is None else f"{step.peak_gb:.2f}" + ("!" if step.stopped else "")


def table_header() -> str:
    return (f"{'format':>13} {'stays':>7} | {'init s':>6} {'cached s':>8} {'round s':>7} {'cpu s':>6} "
            f"{'GRU rnd s':>9} {'cpu s':>6} | {'init GB':>7} {'cached GB':>9} {'round GB':>8} {'GRU GB':>6} | "
            f"{'cache MB':>8} || per 1,000 stays: {'init s':>6} {'round cpu s':>11} {'GRU cpu s':>9} "
            f"{'init MB':>7} {'cache MB':>8}")


def table_row(r: SizeResult) -> str:
    init = _wall(r.init_cold)
    return (f"{r.format:>13} {r.stays:>7} | {_num(init):>6} {_num(_wall(r.cached)):>8} "
            f"{_num(_round(r.round_default)):>7} {_num(_round(r.round_default, 'round_cpu_seconds')):>6} "
            f"{_num(_round(r.round_gru)):>9} {_num(_round(r.round_gru, 'round_cpu_seconds')):>6} | "
            f"{_gb(r.init_cold):>7} {_gb(r.cached):>9} {_gb(r.round_default):>8} {_gb(r.round_gru):>6} | "
            f"{r.cache_mb:>8.1f} || {'':>16} {_num(r.per_1000(init), 2):>6} "
            f"{_num(r.per_1000(_round(r.round_default, 'round_cpu_seconds')), 3):>11} "
            f"{_num(r.per_1000(_round(r.round_gru, 'round_cpu_seconds')), 3):>9} "
            f"{_num(r.per_1000(None if init is None else r.init_cold.peak_gb * 1024), 1):>7} "
            f"{_num(r.per_1000(r.cache_mb), 2):>8}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stays", default="4000,20000,100000", help="comma-separated export sizes")
    parser.add_argument("--format", default="physionet2012", choices=["physionet2012", "long_csv", "both"])
    parser.add_argument("--rounds", type=int, default=2,
                        help="rounds of each kind, each timed; the table shows the mean after the first (0: no rounds)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads of a round (training.threads; 0: torch's default, all cores). 1 is steadier "
                             "on a shared machine: two threads that wait for each other lose most when one is preempted")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--workdir", type=Path, help="where exports and hospital folders go (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the exports and folders (with --workdir)")
    parser.add_argument("--seed", type=int, default=0, help="the synthetic exports' seed")
    parser.add_argument("--max-memory-gb", type=float, default=12.0, help="stop a step whose processes pass this")
    parser.add_argument("--timeout", type=float, default=1800, help="stop a step running longer (seconds)")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return _run_child(args.child)

    from common.config import load_config
    from simulations.synthetic_export import load_source

    cfg = load_config()
    source = load_source(resolve(cfg.data.path), resolve(cfg.data.outcomes))
    sizes = [int(x) for x in args.stays.split(",") if x.strip()]
    formats = ["physionet2012", "long_csv"] if args.format == "both" else [args.format]
    root = args.workdir or Path(tempfile.mkdtemp(prefix="fedgru-bench-data-"))
    rows: list[SizeResult] = []
    rounds = ("no rounds" if args.rounds < 1 else f"{args.rounds} round(s) of each kind ("
              f"{'torch default threads' if args.threads < 1 else f'{args.threads} torch thread(s)'}), round s: "
              f"{'the mean after the first' if args.rounds > 1 else 'the one round'}, wall and the process's CPU seconds")
    print(f"{os.cpu_count()} CPU cores; {rounds}; GB: peak memory of the step's processes; '!': the step was stopped")
    print(table_header(), flush=True)
    try:
        for fmt in formats:
            for n in sizes:
                work = root / f"{fmt}-{n}"
                r = bench_size(source, fmt, n, work, args.rounds, args.max_memory_gb, args.timeout, args.seed,
                               args.threads)
                rows.append(r)
                print(table_row(r), flush=True)
                if not args.keep:
                    shutil.rmtree(work, ignore_errors=True)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    plain = [asdict(r) for r in rows]
    if args.json:
        write_json(args.json, plain)
    print(json.dumps(plain))
    return 0


def _run_child(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench_data_scale --child")
    parser.add_argument("what", choices=["cached", "round"])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    args = parser.parse_args(argv)
    result = child_cached(args.folder) if args.what == "cached" else child_round(args.folder, args.rounds, args.overrides)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
