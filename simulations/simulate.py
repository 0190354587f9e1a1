"""Run a whole federation on one machine with Flower's simulation runtime.

One virtual SuperNode per simulated hospital runs the real ClientApp; the real
ServerApp coordinates them. ``fedgru simulate`` is a thin shell around :func:`simulate`.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

from common.config import ConfigError, ExperimentConfig
from common.data.dataset import load_dataset
from common.data.partition import make_partition
from common.paths import resolve

log = logging.getLogger("fedgru.simulate")


def simulate(
    cfg: ExperimentConfig, run_dir: Path, cpus_per_hospital: int = 1, faults: dict[str, str] | None = None,
    client_app=None, gpus_per_hospital: float | None = None, ray_address: str | None = None, verbose: bool = False,
) -> Path:
    """Run the experiment; returns the run folder. ``faults``: hospital -> fault drill;
    ``client_app``: the hospitals' app when not the standard one (a privacy audit's);
    ``gpus_per_hospital``: each simulated hospital's share of a GPU (default: the
    hospitals share one GPU equally when training may use CUDA and one is present);
    ``ray_address``: an existing Ray cluster to run the hospitals on (``auto``, or
    ``HOST:PORT`` of its head) instead of a Ray instance on this machine."""
    from flwr.simulation import run_simulation

    from client.app import build_client_app
    from common.logs import quiet_console
    from server import outputs
    from server.app import make_server_app

    from .faults import fault_mod

    quiet_console(verbose)  # after the imports: Opacus installs its duplicating handler on import
    outputs.SUMMARY_TO_LOG = False  # the caller prints the summary (stdout): results apart from progress

    if client_app is None:
        client_app = build_client_app([fault_mod(faults, cfg)] if faults else None, simulation=cfg)

    ds = load_dataset(cfg)  # also warms the cache the simulated hospitals read
    n_hospitals = len(make_partition(ds, cfg))
    backend = backend_config(cfg, n_hospitals, cpus_per_hospital, gpus_per_hospital, ray_address, verbose)
    run_dir.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        if not verbose:
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
        run_simulation(
            server_app=make_server_app(cfg, run_dir),
            client_app=client_app,
            num_supernodes=n_hospitals,
            backend_config=backend,
            verbose_logging=verbose,
        )
    if not (run_dir / "model.pt").is_file():
        from server.records import RunMetrics, load_record

        metrics = load_record(run_dir / "metrics.json", RunMetrics)
        if metrics is not None and metrics.not_evaluated:  # the run said why (no hospital trained, or none started)
            raise RunEndedEmpty(f"{metrics.not_evaluated} (report: {run_dir / 'report.md'})")
        raise RuntimeError(f"the simulation ended without writing {run_dir / 'model.pt'}; see the log above")
    return run_dir


class RunEndedEmpty(ConfigError):
    """The run ended without a model: no hospital accepted its plan, or none trained."""


def backend_config(cfg: ExperimentConfig, n_hospitals: int, cpus_per_hospital: int = 1,
                   gpus_per_hospital: float | None = None, ray_address: str | None = None,
                   verbose: bool = False) -> dict:
    """Flower's Ray backend settings: what each simulated hospital may use, and where.

    Ray places as many hospitals at once as their shares fit (``num_cpus``, ``num_gpus``
    per hospital): with a GPU shared by fractions, hospitals train side by side on it.
    On an existing cluster (``ray_address``) the cluster's own resources count, so none
    are declared here."""
    cpus = os.cpu_count() or 1
    if gpus_per_hospital is None:
        gpus_per_hospital = 0.0
        if cfg.training.device in ("auto", "cuda") and _cuda_available():
            gpus_per_hospital = 1.0 / n_hospitals
    if not 0.0 <= gpus_per_hospital <= 1.0:
        raise ValueError("gpus_per_hospital must be a share of one GPU, between 0 and 1")
    # "local": a Ray instance of this run's own, even when a cluster started with `ray
    # start` runs on this machine (Ray would otherwise join it unasked).
    init: dict = {"include_dashboard": False, "log_to_driver": verbose, "address": ray_address or "local"}
    if not ray_address:
        init["num_cpus"] = cpus
        if gpus_per_hospital > 0:
            init["num_gpus"] = 1
    return {
        "client_resources": {"num_cpus": cpus_per_hospital if ray_address else min(cpus_per_hospital, cpus),
                             "num_gpus": float(gpus_per_hospital)},
        "init_args": init,
    }


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return False


def default_run_dir(cfg: ExperimentConfig) -> Path:
    from server.outputs import make_run_dir

    return make_run_dir(resolve(cfg.run.out_dir))
