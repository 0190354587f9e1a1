"""Run a whole federation on one machine with Flower's simulation runtime.

One virtual SuperNode per simulated hospital runs the real ClientApp; the real
ServerApp coordinates them. ``fedgru simulate`` is a thin shell around :func:`simulate`.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

from common.config import ExperimentConfig
from common.data.dataset import load_dataset
from common.data.partition import make_partition
from common.paths import resolve

log = logging.getLogger("fedgru.simulate")


def simulate(
    cfg: ExperimentConfig, run_dir: Path, cpus_per_hospital: int = 1, faults: dict[str, str] | None = None,
    client_app=None,
) -> Path:
    """Run the experiment; returns the run folder. ``faults``: hospital -> fault drill;
    ``client_app``: the hospitals' app when not the standard one (a privacy audit's)."""
    from flwr.simulation import run_simulation

    from client.app import build_client_app
    from server.app import make_server_app

    from .faults import fault_mod

    if client_app is None:
        client_app = build_client_app([fault_mod(faults)] if faults else None)

    ds = load_dataset(cfg)  # also warms the cache the simulated hospitals read
    n_hospitals = len(make_partition(ds, cfg))
    cpus = os.cpu_count() or 1
    backend = {
        "client_resources": {"num_cpus": min(cpus_per_hospital, cpus), "num_gpus": 0.0},
        "init_args": {"num_cpus": cpus, "include_dashboard": False, "log_to_driver": True},
    }
    if cfg.training.device in ("auto", "cuda"):
        try:
            import torch

            if torch.cuda.is_available():
                backend["client_resources"]["num_gpus"] = 1.0 / n_hospitals
                backend["init_args"]["num_gpus"] = 1
        except ImportError:  # pragma: no cover
            pass
    run_dir.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        run_simulation(
            server_app=make_server_app(cfg, run_dir),
            client_app=client_app,
            num_supernodes=n_hospitals,
            backend_config=backend,
        )
    if not (run_dir / "model.pt").is_file():
        raise RuntimeError(f"the simulation ended without writing {run_dir / 'model.pt'}; see the log above")
    return run_dir


def default_run_dir(cfg: ExperimentConfig) -> Path:
    from server.outputs import make_run_dir

    return make_run_dir(resolve(cfg.run.out_dir))
