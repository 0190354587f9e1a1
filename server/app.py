"""The coordinator side: a Flower ServerApp.

``flwr run .`` starts it with the run config from ``pyproject.toml``
(``[tool.flwr.app.config]``); ``fedgru simulate`` builds one with
:func:`make_server_app` around an already loaded config.
"""

from __future__ import annotations

import json
import logging
import secrets
from functools import partial
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.config import ExperimentConfig, config_from_run_config
from common.data.dataset import load_dataset
from common.data.partition import format_table, make_partition, partition_table
from common.logs import attach_to_flower
from common.paths import project_root, resolve
from common.signatures import PublicKey

from .checkpoint import RunSnapshot, load_checkpoint
from .coordinator import Coordinator
from .discovery import Roster, who_are_you
from .outputs import RunRecorder, make_run_dir
from .preflight import connected_status
from .records import Partition, RunMetrics, StartRecord, load_record
from .secagg import load_hospital_keys
from .start_model import StartModel, load_start_model

log = logging.getLogger("fedgru.server")


def start_of_run(cfg: ExperimentConfig, run_dir: Path, resumed: bool,
                 start: StartModel | None = None) -> tuple[StartModel | None, StartRecord | None]:
    """The model a run starts from (``model.init_from``) and its record. A resumed run reads
    no start file (it may have changed or gone since; the checkpoint holds the model): its
    record is the one metrics.json kept from before the restart. ``start``: already loaded."""
    if resumed:
        return None, getattr(load_record(run_dir / "metrics.json", RunMetrics), "start", None)
    if start is None and cfg.model.init_from:
        start = load_start_model(cfg)
    if start is None:
        return None, None
    return start, StartRecord(str(start.path), start.sha256, start.source_run)


def run_server(cfg: ExperimentConfig, grid: Grid, run_dir: Path, resume: RunSnapshot | None = None,
               start: StartModel | None = None, hospital_keys: dict[str, PublicKey] | None = None) -> Path:
    attach_to_flower()
    run_id = resume.run_id if resume else secrets.token_hex(6)
    # Who takes part and what they read, first: the run reads data as its hospitals do.
    roster = Roster()
    roster.discover(grid, partial(who_are_you, run_id), cfg.strategy.discovery_timeout_s, cfg.strategy.min_hospitals)
    agreed = roster.agreed_config(cfg, resumed=resume is not None)
    if agreed is not cfg and start is not None:
        start = load_start_model(agreed)  # the start must read as the hospitals do (a clear error if not)
    cfg = agreed
    start, start_record = start_of_run(cfg, run_dir, resume is not None, start)
    recorder = RunRecorder(run_dir, cfg, run_id)
    recorder.start = start_record
    log.info("run %s: writing to %s", run_id, run_dir)
    if start is not None:
        log.info("the global model starts from %s (sha256 %s...%s)", start.path, start.sha256[:12],
                 f", the model of run {start.source_run}" if start.source_run else "")
    coord = Coordinator(cfg, grid, recorder, run_id, start, roster, hospital_keys)
    if resume:
        # the plan agreed before the restart holds: each hospital's noise is in the checkpoint
        recorder.preflight = list(getattr(load_record(run_dir / "metrics.json", RunMetrics), "preflight", []) or [])
        coord.restore(resume)
    elif not coord.agree_plan():
        accepted = sum(a.accepted for a in recorder.preflight)
        coord.not_started = (
            f"the run did not start: {accepted} of {len(recorder.preflight)} hospitals accepted its plan, and "
            f"strategy.min_hospitals is {cfg.strategy.min_hospitals}; nothing was trained or released (each "
            "refusal above names the change that would fit)"
        )
    if coord.simulated:
        # A simulation holds every hospital's data on this machine: the partition
        # table is the simulation's own description, not something hospitals sent.
        ds = load_dataset(cfg)
        hospitals = make_partition(ds, cfg)
        rows = partition_table(ds, hospitals, cfg.task.classes)
        log.info("simulated hospitals (%s partition):\n%s", cfg.partition.scheme, format_table(rows))
        for note in ds.summary.notes() if ds.summary else []:
            log.warning("data: %s", note)
        recorder.write_partition(Partition(cfg.partition.scheme, rows, ds.summary))
    coord.run()  # its last lines: the run's summary and where the report is
    return run_dir


def make_server_app(cfg: ExperimentConfig, run_dir: Path) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(cfg, grid, run_dir)

    return app


app = ServerApp()


def resumed_config(config_json: str, source: str) -> ExperimentConfig:
    """A checkpoint's config, read over default.yaml: a checkpoint written before a key
    existed (model.carry_units, say) resumes with that key's default, as a model bundle
    does."""
    return ExperimentConfig.from_dict(json.loads(config_json), origin=source, fill_defaults=True)


@app.main()
def main(grid: Grid, context: Context) -> None:
    if str(context.run_config.get("status", False)).lower() == "true":  # fedgru status: no run, nothing spent
        attach_to_flower()
        cfg = config_from_run_config(dict(context.run_config))
        for line in connected_status(grid, cfg).splitlines():
            log.info("%s", line)
        return
    # deployed: the admitted hospitals' <name>.pub files (deploy init's hospitals/), read before anything runs
    keys_dir = str(context.run_config.get("hospital-keys", ""))
    hospital_keys = load_hospital_keys(resolve(keys_dir)) if keys_dir else None
    resume_dir = str(context.run_config.get("resume", ""))
    if resume_dir:
        # Same run, same config: everything comes from the run folder's checkpoint.
        run_dir = resolve(resume_dir)
        snapshot = load_checkpoint(run_dir / "checkpoint.pt")
        cfg = resumed_config(snapshot.config_json, str(run_dir / "checkpoint.pt"))
        run_server(cfg, grid, run_dir, resume=snapshot, hospital_keys=hospital_keys)
        return
    cfg = config_from_run_config(dict(context.run_config))
    start = load_start_model(cfg) if cfg.model.init_from else None  # a bad start fails before a run folder exists
    out = str(context.run_config.get("out-dir", "")) or cfg.run.out_dir
    out_dir = Path(out) if Path(out).is_absolute() else project_root() / out
    run_server(cfg, grid, make_run_dir(out_dir), start=start, hospital_keys=hospital_keys)
