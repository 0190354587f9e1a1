"""Benchmark: how long a deployed round takes (real processes, TLS, node authentication).

    python -m simulations.bench_deploy [--hospitals 3] [--rounds 5] [--stays 150] [--json FILE]
                                       [--secure-aggregation]

Starts a localhost federation (:class:`simulations.deployment.LocalFederation`): one
SuperLink with TLS and SuperNode authentication, one SuperNode per hospital (each with
its own folder of ``--stays`` PhysioNet stays) served the approved app by ``fedgru
hospital serve``, and ``flwr run`` of the project for ``--rounds`` rounds of the default
config (model, DP, evaluation). Prints and writes (``--json``) the seconds of each round
as the coordinator timed them, the first round apart (it includes the hospitals' first
import and data load), the mean of the others, and the wall time of the whole run from
``flwr run`` to its end. Every process is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common.config import load_config
from common.files import write_json
from common.paths import resolve
from simulations.deployment import LocalFederation, cut_stays

# The deployment test's run (tests/test_deployment.py): the default model, small batches,
# epsilon 0.4 for each group of patients (a hospital's default policy allows at most 0.5
# per round, so short runs need a smaller total), and generous timeouts: a benchmark
# waits for slow rounds instead of dropping hospitals.
SETTINGS = ("training.batch_size=32 privacy.target_epsilon=0.4 evaluation.val_epsilon=0.4 "
            "evaluation.test_epsilon=0.4 strategy.round_timeout_s=300 strategy.discovery_timeout_s=120")


# --secure-aggregation: configs/secure.yaml's settings on top (privacy.aggregation secure,
# every training patient every round, the coordinator's step)
SECURE = " privacy.aggregation=secure training.sample_rate=1.0 training.lr=0.5"


def bench(hospitals: int, rounds: int, stays: int, keep: Path | None = None, secure: bool = False) -> dict:
    cfg = load_config()
    names = tuple(f"h{i + 1}" for i in range(hospitals))
    with tempfile.TemporaryDirectory(prefix="fedgru-bench-deploy-") as tmp:
        root = keep or Path(tmp)
        fed = LocalFederation(root, run_settings=SETTINGS + (SECURE if secure else ""))
        try:
            data = cut_stays(resolve(cfg.data.path), root / "data", names, stays)
            fed.set_up(data, resolve(cfg.data.outcomes), max_epsilon=1.0)
            started = time.monotonic()
            fed.start_supernodes(names)
            nodes_up = time.monotonic() - started
            runs = root / "runs"
            t0 = time.monotonic()
            run = fed.run_app(rounds, runs)
            run.wait(timeout=60 + 300 * rounds)
            wall = time.monotonic() - t0
            run_dir = next(iter(runs.iterdir()), None) if runs.exists() else None
            if run.returncode != 0 or run_dir is None or not (run_dir / "metrics.json").is_file():
                logs = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-1500:]}" for p in fed.logs.iterdir())
                raise RuntimeError(f"the deployed run failed (exit {run.returncode}):\n{logs}")
            per_round = [float(r["seconds"]) for r in json.loads((run_dir / "metrics.json").read_text())["rounds"]]
        finally:
            fed.stop_all()
    later = per_round[1:] or per_round
    return {
        "secure_aggregation": secure,
        "hospitals": hospitals,
        "rounds": rounds,
        "stays_per_hospital": stays,
        "round_seconds": [round(s, 2) for s in per_round],
        "first_round_seconds": round(per_round[0], 2),
        "seconds_per_round": round(statistics.fmean(later), 2),
        "run_wall_seconds": round(wall, 1),
        "supernodes_up_seconds": round(nodes_up, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hospitals", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--stays", type=int, default=150, help="stays per hospital (cut from set A)")
    parser.add_argument("--json", help="also write the result to this JSON file")
    parser.add_argument("--keep", type=Path, help="keep the federation's folders and logs here")
    parser.add_argument("--secure-aggregation", action="store_true",
                        help="rounds by secure aggregation with distributed DP (configs/secure.yaml's settings)")
    args = parser.parse_args(argv)
    result = bench(args.hospitals, args.rounds, args.stays, args.keep, args.secure_aggregation)
    mode = "secure aggregation" if args.secure_aggregation else "per-hospital DP"
    print(f"{mode}: {result['hospitals']} hospitals, {result['rounds']} rounds: first round {result['first_round_seconds']:.1f} s, "
          f"then {result['seconds_per_round']:.1f} s per round; run {result['run_wall_seconds']:.0f} s from flwr run "
          f"to its end (rounds: {', '.join(f'{s:.1f}' for s in result['round_seconds'])})")
    if args.json:
        write_json(args.json, result)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
