"""One run on a GPU machine that checks the whole GPU path (under 5 minutes on an H100/H200):

1. exactness: FastDPGRU's CUDA tests (CUDA-graph recurrence against the plain loop;
   per-example gradients against a one-example-at-a-time reference, padded batches);
2. speed: ``simulations.bench_dp_gru`` on CUDA (FastDPGRU with and without CUDA graphs,
   Opacus DPGRU, cuDNN ``nn.GRU``; ratios against cuDNN measured in the same run);
3. the default simulation with ``training.device=cuda`` (the hospitals share the GPU by
   fractions): pooled test AUROC (exact, and as the run's DP test release reported it)
   and epsilon, to set beside a CPU run;
4. the three baselines on CUDA (central, central DP, each hospital alone with DP).

    python -m simulations.gpu_check [--out DIR] [--skip-bench] [--skip-simulation]

Prints one table per part and writes ``gpu_check.json`` into ``--out``. Every part runs
in its own process, so one failing part does not hide the others.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common.paths import project_root

BENCH_SHAPES = ["--batch", "64", "--batch", "256", "--hidden", "64", "--hidden", "128"]


def _run(name: str, args: list[str], env: dict | None = None, timeout: float = 600) -> dict:
    """Run one part in a subprocess; keep its output's tail and the wall time."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(args, cwd=project_root(), capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        code, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        code, out = 124, f"{exc.stdout or ''}{exc.stderr or ''}\n(timed out after {timeout:.0f} s)"
    seconds = round(time.perf_counter() - start, 1)
    status = "ok" if code == 0 else f"FAILED (exit {code})"
    print(f"\n== {name}: {status}, {seconds} s", flush=True)
    return {"name": name, "exit": code, "seconds": seconds, "output": out if isinstance(out, str) else out.decode()}


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def exactness() -> dict:
    part = _run("exactness: FastDPGRU on CUDA", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                                 "tests/test_dp_gru.py", "tests/test_dp_optimizer.py",
                                                 "-k", "cuda or recurrence or padded"])
    print(_tail(part["output"], 3))
    return part


def bench(out: Path, graphs: str) -> dict:
    label = "with CUDA graphs" if graphs == "1" else "without CUDA graphs"
    target = out / f"bench_graphs{graphs}.json"
    part = _run(f"speed: bench_dp_gru on CUDA, {label}",
                [sys.executable, "-m", "simulations.bench_dp_gru", "--device", "cuda", "--repeats", "1",
                 *BENCH_SHAPES, "--json", str(target)],
                env={"FEDGRU_CUDA_GRAPHS": graphs}, timeout=240)
    print("\n".join(line for line in part["output"].splitlines() if line.startswith(("cuda", "device", "torch"))))
    part["rows"] = json.loads(target.read_text()) if target.is_file() else []
    return part


def simulation(out: Path) -> dict:
    run_dir = out / "simulation"
    part = _run("the default simulation, training.device=cuda",
                [sys.executable, "-m", "fedgru.cli", "simulate", "--out", str(run_dir), "--set", "training.device=cuda"],
                timeout=300)
    print(_tail(part["output"], 9))
    metrics = run_dir / "metrics.json"
    if metrics.is_file():
        test = json.loads(metrics.read_text()).get("test") or {}
        part["pooled_test"] = test.get("pooled")
    if (run_dir / "model.pt").is_file():  # a simulation holds every patient: score its test patients exactly
        from common.bundle import Bundle
        from simulations.utility import _exact

        bundle = Bundle(run_dir / "model.pt")
        exact, _, _, _ = _exact(bundle.config, lambda _name: bundle.model, float(bundle.info.get("threshold", 0.5)))
        part["exact_test_auroc"] = exact.auroc
        released = (part.get("pooled_test") or {}).get("auroc", float("nan"))
        print(f"pooled test AUROC {exact.auroc:.3f} exact ({released:.3f} from the DP test release)")
    privacy = run_dir / "privacy.json"
    if privacy.is_file():
        part["epsilon"] = {n: h.get("epsilon") for n, h in json.loads(privacy.read_text())["hospitals"].items()}
    return part


def baselines(out: Path) -> list[dict]:
    parts = []
    for kind in ("central", "central-dp", "local"):
        target = out / "baselines.json"
        part = _run(f"baseline {kind} on CUDA",
                    [sys.executable, "-m", "fedgru.cli", "baseline", "--kind", kind, "--set", "training.device=cuda",
                     "--out", str(target)], timeout=180)
        if part["exit"] == 0 and target.is_file():
            result = json.loads(target.read_text())[kind]
            part["auroc"], part["epsilon"] = result["pooled"]["auroc"], result["epsilon"]
            print(f"pooled test AUROC {part['auroc']:.3f}, epsilon {part['epsilon'] or 'none (no DP)'}, "
                  f"training {result['seconds']} s")
        else:
            print(_tail(part["output"], 12))
        parts.append(part)
    return parts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs") / f"gpu-check-{time.strftime('%Y%m%d-%H%M%S')}")
    parser.add_argument("--skip-bench", action="store_true")
    parser.add_argument("--skip-simulation", action="store_true")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("no CUDA GPU is visible to torch: nothing to check here (every test also runs on CPU)")
        return 1
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPU {torch.cuda.get_device_name(0)}, "
          f"{os.cpu_count()} CPU cores")
    report: dict = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "parts": []}
    start = time.perf_counter()
    report["parts"].append(exactness())
    if not args.skip_bench:
        report["parts"].append(bench(out, graphs="1"))
    if not args.skip_simulation:
        report["parts"].append(simulation(out))
        report["parts"] += baselines(out)
    if not args.skip_bench:  # the same benchmark without graphs: what they buy
        report["parts"].append(bench(out, graphs="0"))
    report["seconds"] = round(time.perf_counter() - start, 1)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    failed = [p["name"] for p in report["parts"] if p["exit"] != 0]
    print(f"\ngpu_check: {len(report['parts']) - len(failed)} of {len(report['parts'])} parts ok in "
          f"{report['seconds']:.0f} s" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
