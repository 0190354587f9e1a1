"""``fedgru deploy local``: a real deployment on this machine, in one command.

The try-out mode (as NVFlare's proof-of-concept mode is for its users): every process a
consortium runs, on free localhost ports, driven as docs/deployment.md describes.

1. The configured data (``data.path``, ``data.outcomes``; ``data.max_stays`` caps it)
   split N ways in its own format, each hospital's share (stays and outcomes) in a
   folder of its own.
2. Each hospital: ``fedgru hospital init`` with the run config's task and features,
   ``fedgru hospital approve``.
3. The coordinator: ``fedgru deploy init`` with the hospitals' public keys, a SuperLink
   with TLS and SuperNode authentication, the Flower CLI's connection, the keys
   registered.
4. Each hospital: its SuperNode (``--isolation process``) and ``fedgru hospital serve``.
5. The coordinator: ``fedgru status`` (who is connected, and each one's answer to the
   plan), then ``flwr run`` for the rounds asked; the run folder lands in ``OUT/runs``.
6. Every process started is stopped by its process group id, whatever happened.

It returns the run folder, each hospital's ``fedgru hospital show --json`` and the
seconds each step took.
"""

from __future__ import annotations

import csv
import json
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from common.config import ExperimentConfig, load_config
from common.data.records import natural_key
from common.paths import resolve

from .deployment import LocalFederation

STEP_TIMEOUT_S = 600


@dataclass
class LocalDeployment:
    """What ``fedgru deploy local`` made and measured."""

    out: Path
    run_dir: Path | None
    run_exit_code: int | None
    hospitals: dict[str, dict] = field(default_factory=dict)  # name -> its `hospital show --json`
    seconds: dict[str, float] = field(default_factory=dict)  # step -> wall seconds
    status: str = ""  # what `fedgru status` printed before the run


def split_data(cfg: ExperimentConfig, out: Path, names: list[str]) -> dict[str, tuple[Path, Path]]:
    """The configured data cut into ``len(names)`` consecutive shares (by stay id), each
    hospital's stays and outcomes in its own folder, in the data's own format."""
    source, outcomes = resolve(cfg.data.path), resolve(cfg.data.outcomes)
    if cfg.data.format == "physionet2012":
        return _split_physionet(source, outcomes, out, names, cfg.data.max_stays, cfg.data.id_column)
    return _split_long_csv(source, outcomes, out, names, cfg.data.max_stays)


def _shares(ids: list[str], names: list[str], max_stays: int) -> dict[str, set[str]]:
    ids = sorted(ids, key=natural_key)[: max_stays or None]
    per = len(ids) // len(names)
    if per < 1:
        raise ValueError(f"{len(ids)} stays cannot be shared out to {len(names)} hospitals")
    return {name: set(ids[i * per:(i + 1) * per]) for i, name in enumerate(names)}


def _write_outcomes(outcomes: Path, id_column: str, shares: dict[str, set[str]], out: Path) -> dict[str, Path]:
    with open(outcomes, newline="") as handle:
        rows = list(csv.reader(handle))
    header, body = rows[0], rows[1:]
    column = header.index(id_column) if id_column in header else 0
    files = {}
    for name, ids in shares.items():
        path = out / name / "outcomes.csv"
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            writer.writerows(r for r in body if r and r[column].strip() in ids)
        files[name] = path
    return files


def _split_physionet(source: Path, outcomes: Path, out: Path, names: list[str], max_stays: int, id_column: str
                     ) -> dict[str, tuple[Path, Path]]:
    if source.is_dir():
        stays = {p.stem: p.read_bytes for p in source.glob("*.txt")}
    else:
        with tarfile.open(source) as tar:
            members = {Path(m.name).stem: m for m in tar.getmembers() if m.isfile() and m.name.endswith(".txt")}
            contents = {stem: tar.extractfile(m).read() for stem, m in members.items()}
        stays = {stem: (lambda raw=raw: raw) for stem, raw in contents.items()}
    shares = _shares(list(stays), names, max_stays)
    for name, ids in shares.items():
        (out / name / "stays").mkdir(parents=True)
        for stay in ids:
            (out / name / "stays" / f"{stay}.txt").write_bytes(stays[stay]())
    files = _write_outcomes(outcomes, id_column, shares, out)
    return {name: (out / name / "stays", files[name]) for name in names}


def _split_long_csv(source: Path, outcomes: Path, out: Path, names: list[str], max_stays: int
                    ) -> dict[str, tuple[Path, Path]]:
    with open(source, newline="") as handle:
        rows = list(csv.reader(handle))
    header, body = rows[0], rows[1:]
    column = header.index("stay_id")
    shares = _shares(sorted({r[column].strip() for r in body if r}), names, max_stays)
    for name, ids in shares.items():
        (out / name).mkdir(parents=True)
        with open(out / name / "events.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            writer.writerows(r for r in body if r and r[column].strip() in ids)
    files = _write_outcomes(outcomes, "stay_id", shares, out)
    return {name: (out / name / "events.csv", files[name]) for name in names}


def deploy_local(config: Path | None, overrides: list[str], hospitals: int, out: Path, rounds: int | None = None,
                 progress: Callable[[str], None] = print) -> LocalDeployment:
    """Bring up, run and take down a real localhost deployment (see the module doc)."""
    if hospitals < 1:
        raise ValueError("--hospitals must be at least 1")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty: give a new folder")
    cfg = load_config(config, overrides)
    names = [f"hospital-{i + 1}" for i in range(hospitals)]
    # A deployed hospital reads its whole export: max_stays only decides how much data is cut.
    run_overrides = [o for o in overrides if not o.replace(" ", "").startswith("data.max_stays=")]
    settings = " ".join(run_overrides)
    if cfg.strategy.min_hospitals > hospitals:
        settings += f" strategy.min_hospitals={hospitals}"
    fed = LocalFederation(out, run_settings=settings, config_file=config.resolve() if config else None)
    result = LocalDeployment(out, None, None)
    clock = time.monotonic()

    def step(name: str) -> None:
        nonlocal clock
        now = time.monotonic()
        result.seconds[name] = round(now - clock, 1)
        clock = now

    try:
        progress(f"splitting {cfg.data.path} {hospitals} ways into {out / 'data'}")
        data = split_data(cfg, out / "data", names)
        step("split the data")
        progress(f"each hospital: fedgru hospital init and approve ({', '.join(names)})")
        progress("the coordinator: fedgru deploy init, flower-superlink (TLS, node authentication), "
                 "flwr supernode register")
        fed.set_up({n: p for n, (p, _) in data.items()}, {n: o for n, (_, o) in data.items()},
                   max_epsilon=cfg.privacy.max_epsilon, data_format=cfg.data.format, config=config, overrides=overrides)
        step("hospital folders, deploy init, SuperLink")
        progress("each hospital: flower-supernode and fedgru hospital serve")
        fed.start_supernodes(names)
        step("SuperNodes up")
        progress("the coordinator: fedgru status")
        status = fed.flwr(*fed.status_args(rounds or 0), timeout=STEP_TIMEOUT_S)
        result.status = _log_lines(status.stdout + status.stderr)
        progress(result.status)
        step("fedgru status")
        runs = out / "runs"
        progress(f"the coordinator: flwr run ({rounds or cfg.run.rounds} rounds); the run folder goes to {runs}")
        run = fed.run_app(rounds or 0, runs)
        run.wait(timeout=STEP_TIMEOUT_S + 300 * (rounds or cfg.run.rounds))
        result.run_exit_code = run.returncode
        result.run_dir = next(iter(sorted(runs.iterdir())), None) if runs.exists() else None
        step("the run")
    finally:
        fed.stop_all()
        progress("stopped every process this command started (by process group id)")
    for name in names:
        shown = fed.fedgru("hospital", "show", "--hospital-dir", str(fed.hospital_dir(name)), "--json")
        result.hospitals[name] = json.loads(shown.stdout) if shown.returncode == 0 else {"error": shown.stderr[-500:]}
    return result


def _log_lines(text: str) -> str:
    """The ServerApp's own lines of a streamed ``flwr run`` (Flower's prefixes taken off)."""
    keep = []
    for line in text.splitlines():
        _, _, message = line.partition(":      ")
        if message and ("hospital" in message or "accepts" in message or "refuses" in message or "node" in message):
            keep.append(message.strip())
    return "\n".join(keep)
