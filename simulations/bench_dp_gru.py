"""Benchmark: a full DP-SGD training step with FastDPGRU vs Opacus DPGRU vs nn.GRU.

One step = forward, backward, per-example clipping, noise, optimizer step (for
``nn.GRU``: forward, backward, step, no privacy). Each measurement runs in its own
subprocess, so peak memory is that configuration's alone; implementations are
interleaved and repeated, and the median is reported. Ratios are against ``nn.GRU``
measured in the same run on the same machine.

    python -m simulations.bench_dp_gru                 # the issue's grid, CPU (and GPU if present)
    python -m simulations.bench_dp_gru --quick         # one small shape, for a smoke check
    python -m simulations.bench_dp_gru --json out.json
    python -m simulations.bench_dp_gru --device cuda --batch 256 --hidden 64 --profile   # where a step's time goes

FastDPGRU and Opacus DPGRU take their DP step through the project's ``FusedDPOptimizer``
(what a hospital trains with); ``--dp-optimizer opacus`` times Opacus's own
``DPOptimizer`` instead, to see what the fusion buys.

Peak memory: CPU, growth of the process's peak resident set over the model and data
alone; GPU, ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from common.files import write_json

IMPLS = ("torch", "fast", "opacus")
LABEL = {"torch": "nn.GRU (non-private)", "fast": "FastDPGRU", "opacus": "Opacus DPGRU"}


def one(impl: str, device: str, batch: int, hidden: int, steps: int, features: int = 80, seq: int = 48,
        dp_optimizer: str = "fused", profile: bool = False) -> dict:
    """Run in a fresh process: time ``steps`` training steps after warm-up; with
    ``profile``, also where five steps spend their time (torch.profiler)."""
    import torch
    import torch.nn as nn
    from opacus import GradSampleModule
    from opacus.layers import DPGRU
    from opacus.optimizers import DPOptimizer

    from common.dp_gru import FastDPGRU
    from common.dp_optimizer import FusedDPOptimizer

    torch.manual_seed(0)
    gru_cls = {"torch": nn.GRU, "fast": FastDPGRU, "opacus": DPGRU}[impl]

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.gru = gru_cls(features, hidden, batch_first=True)
            self.head = nn.Linear(hidden, 1)

        def forward(self, x):
            out, _ = self.gru(x)
            return self.head(out[:, -1])

    model = Net().to(device)
    x = torch.randn(batch, seq, features, device=device)
    y = torch.randint(0, 2, (batch,), device=device).float()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    if impl != "torch":
        model = GradSampleModule(model)
        gen = torch.Generator(device=device).manual_seed(0)
        dp_class = {"fused": FusedDPOptimizer, "opacus": DPOptimizer}[dp_optimizer]
        optimizer = dp_class(optimizer, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=batch, generator=gen)
    loss_fn = nn.BCEWithLogitsLoss()
    cuda = device.startswith("cuda")

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x)[:, 0], y)
        loss.backward()
        optimizer.step()

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated()
    else:
        base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(5):  # CUDA graphs are captured and the allocator settles here
        step()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if cuda:
        peak_mb = (torch.cuda.max_memory_allocated() - base_mem) / 2**20
    else:
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024
    result = {"samples_per_s": batch * steps / seconds, "peak_mb": peak_mb}
    if profile:
        result["profile"] = _profile(step, cuda)
    return result


def _profile(step, cuda: bool, steps: int = 5) -> str:
    """Per step: wall time, kernels launched and the GPU's busy time, then the operators
    with the most CPU time of their own (launch-bound code shows here)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
        wall = (time.perf_counter() - start) / steps
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy_ms = sum(e.device_time for e in kernels) / 1000 / steps
    head = (f"per step: {wall * 1000:.2f} ms wall, {len(kernels) / steps:.0f} GPU kernels, GPU busy {busy_ms:.2f} ms"
            if cuda else f"per step: {wall * 1000:.2f} ms wall")
    return head + "\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)


def run_child(impl: str, device: str, batch: int, hidden: int, steps: int, dp_optimizer: str = "fused",
              profile: bool = False) -> dict:
    code = (
        "import json,sys; from simulations.bench_dp_gru import one; "
        f"print(json.dumps(one({impl!r}, {device!r}, {batch}, {hidden}, {steps}, "
        f"dp_optimizer={dp_optimizer!r}, profile={profile!r})))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{impl} B={batch} H={hidden} on {device} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench(devices: list[str], batches: list[int], hiddens: list[int], repeats: int, steps: int,
          impls: tuple[str, ...] = IMPLS, dp_optimizer: str = "fused", profile: bool = False) -> list[dict]:
    rows = []
    for device in devices:
        for batch in batches:
            for hidden in hiddens:
                results: dict[str, list[dict]] = {impl: [] for impl in impls}
                for _ in range(repeats):  # interleaved, so load changes hit all alike
                    for impl in impls:
                        n = max(2, steps // 4) if impl == "opacus" else steps  # DPGRU is slow
                        results[impl].append(run_child(impl, device, batch, hidden, n, dp_optimizer))
                nan = float("nan")
                speed = {impl: statistics.median(r["samples_per_s"] for r in rs) if rs else nan
                         for impl, rs in ((i, results.get(i, [])) for i in IMPLS)}
                mem = {impl: max(r["peak_mb"] for r in rs) if rs else nan
                       for impl, rs in ((i, results.get(i, [])) for i in IMPLS)}
                row = {"device": device, "batch": batch, "hidden": hidden, "seq": 48, "features": 80,
                       "dp_optimizer": dp_optimizer}
                for impl in IMPLS:
                    row[f"{impl}_samples_per_s"] = round(speed[impl], 1)
                    row[f"{impl}_peak_mb"] = round(mem[impl], 1)
                row["fast_vs_torch"] = round(speed["fast"] / speed["torch"], 3)
                row["opacus_vs_torch"] = round(speed["opacus"] / speed["torch"], 3)
                row["fast_vs_opacus"] = round(speed["fast"] / speed["opacus"], 2)
                row["fast_mem_vs_torch"] = round(mem["fast"] / mem["torch"], 2) if mem["torch"] > 0 else None
                rows.append(row)
                print(_format_row(row), flush=True)
                if profile and "fast" in impls:
                    print(f"\nFastDPGRU, {device}, B={batch}, H={hidden}, {dp_optimizer} DP optimizer:")
                    print(run_child("fast", device, batch, hidden, 2, dp_optimizer, profile=True)["profile"], flush=True)
    return rows


HEADER = (
    f"{'device':<6} {'B':>4} {'H':>4} | {'nn.GRU/s':>9} {'Fast/s':>9} {'Opacus/s':>9} | "
    f"{'Fast/GRU':>8} {'Opac/GRU':>8} {'Fast/Opac':>9} | {'mem GRU':>8} {'mem Fast':>8} {'mem Opac':>8} (MB)"
)


def _format_row(r: dict) -> str:
    return (
        f"{r['device']:<6} {r['batch']:>4} {r['hidden']:>4} | {r['torch_samples_per_s']:>9.0f} "
        f"{r['fast_samples_per_s']:>9.0f} {r['opacus_samples_per_s']:>9.0f} | {r['fast_vs_torch']:>8.2f} "
        f"{r['opacus_vs_torch']:>8.3f} {r['fast_vs_opacus']:>9.1f} | {r['torch_peak_mb']:>8.0f} "
        f"{r['fast_peak_mb']:>8.0f} {r['opacus_peak_mb']:>8.0f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one small shape, one repeat")
    parser.add_argument("--device", action="append", help="cpu and/or cuda (default: cpu, plus cuda if present)")
    parser.add_argument("--batch", type=int, action="append")
    parser.add_argument("--hidden", type=int, action="append")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--impl", action="append", choices=IMPLS,
                        help="implementations to time (default: all; ratios need torch)")
    parser.add_argument("--dp-optimizer", choices=("fused", "opacus"), default="fused",
                        help="the DP step: the project's FusedDPOptimizer (default) or Opacus's DPOptimizer")
    parser.add_argument("--profile", action="store_true", help="also profile FastDPGRU's step for each shape")
    args = parser.parse_args(argv)
    import torch

    devices = args.device or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    batches = args.batch or ([64] if args.quick else [64, 256])
    hiddens = args.hidden or ([64] if args.quick else [64, 128])
    repeats = 1 if args.quick else args.repeats
    steps = 5 if args.quick else args.steps
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU cores, threads {torch.get_num_threads()}"
          + (f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""))
    print(HEADER)
    impls = tuple(args.impl) if args.impl else IMPLS
    if "torch" not in impls:
        parser.error("--impl must include torch: every ratio is against it")
    rows = bench(devices, batches, hiddens, repeats, steps, impls, args.dp_optimizer, args.profile)
    if args.json:
        write_json(args.json, rows)  # NaN (an implementation not run) becomes null: valid JSON
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
