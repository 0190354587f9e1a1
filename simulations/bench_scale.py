"""Benchmark: simulations of many hospitals on one machine.

    python -m simulations.bench_scale [--hospitals 10,100,500] [--rounds 3] [--json FILE]

For each count, one ``fedgru simulate`` (its own process, as a user runs it) of
``--rounds`` rounds: 10 and 100 hospitals share set A evenly (``partition.scheme=iid``),
500 by a Dirichlet split (``partition.scheme=dirichlet``, uneven sizes and outcome
rates, as real consortia are), with ``training.batch_size=16`` so that small hospitals
take a few steps a round. Prints the seconds of each round (as the coordinator timed
them; round 1 includes every simulated hospital's first data load and noise
calibration), the wall time, and the peak memory of the whole process tree (the
simulation, Ray's own processes and every Ray worker), as the largest sum of their
proportional set sizes (PSS: shared pages counted once) seen while it ran.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from common.files import write_json
from common.paths import project_root


def _tree_pss(root: psutil.Process) -> int:
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return total


class PeakMemory:
    """The largest PSS sum of a process tree, sampled every ``interval`` seconds."""

    def __init__(self, pid: int, interval: float = 0.5):
        self.root = psutil.Process(pid)
        self.peak = 0
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, _tree_pss(self.root))
            except psutil.NoSuchProcess:
                return
            self._stop.wait(self.interval)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def one(hospitals: int, rounds: int, out: Path) -> dict:
    scheme = "iid" if hospitals <= 100 else "dirichlet"
    args = [sys.executable, "-m", "fedgru.cli", "simulate", "--out", str(out), "--rounds", str(rounds),
            "--set", f"partition.scheme={scheme}", "--set", f"partition.num_hospitals={hospitals}",
            "--set", "training.batch_size=16"]
    start = time.perf_counter()
    proc = subprocess.Popen(args, cwd=project_root(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    memory = PeakMemory(proc.pid)
    output, _ = proc.communicate()
    peak = memory.stop()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{hospitals} hospitals: fedgru simulate failed:\n{output[-3000:]}")
    rounds_done = json.loads((out / "metrics.json").read_text())["rounds"]
    per_round = [round(float(r["seconds"]), 2) for r in rounds_done]
    return {"hospitals": hospitals, "partition": scheme, "rounds": len(per_round), "round_seconds": per_round,
            "first_round_seconds": per_round[0] if per_round else None,
            "later_round_seconds": round(sum(per_round[1:]) / max(len(per_round) - 1, 1), 2) if len(per_round) > 1 else None,
            "wall_seconds": round(wall, 1), "peak_memory_gb": round(peak / 2**30, 2),
            "console_lines": len([line for line in output.splitlines() if line.strip()])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hospitals", default="10,100,500", help="comma-separated hospital counts")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    rows = []
    print(f"{'hospitals':>9} {'partition':>9} | {'round 1 s':>9} {'later s':>8} | {'wall s':>7} | {'peak GB':>7}")
    with tempfile.TemporaryDirectory(prefix="fedgru-bench-scale-") as tmp:
        for n in [int(x) for x in args.hospitals.split(",") if x.strip()]:
            row = one(n, args.rounds, Path(tmp) / f"h{n}")
            rows.append(row)
            later = f"{row['later_round_seconds']:.1f}" if row["later_round_seconds"] is not None else "-"
            print(f"{n:>9} {row['partition']:>9} | {row['first_round_seconds']:>9.1f} {later:>8} | "
                  f"{row['wall_seconds']:>7.0f} | {row['peak_memory_gb']:>7.2f}", flush=True)
    if args.json:
        write_json(args.json, rows)
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
