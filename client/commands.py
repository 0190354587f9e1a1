"""The hospital's own commands (``fedgru hospital ...``): make its folder, approve an
app version, serve its SuperNode, and show what it has spent."""

from __future__ import annotations

import logging
from pathlib import Path

from common.config import ExperimentConfig, auto_delta, load_config
from common.data.dataset import load_dataset
from common.messages import Split
from common.metrics import format_number

from .folder import DataSource, HospitalFolder, default_policy, init_folder
from .ledger_store import FileLedgerStore


def init(
    out: Path, name: str, data: str, outcomes: str, max_epsilon: float, delta: float | None = None,
    eval_epsilon: float | None = None, data_format: str = "physionet2012", id_column: str = "",
    label_column: str = "", device: str = "auto", cfg: ExperimentConfig | None = None,
) -> str:
    """Create the folder; read the export once (it must load, and delta is set below 1/n)."""
    cfg = cfg or load_config()
    ds = load_dataset(
        cfg, data_path=Path(data).expanduser().resolve(), outcomes_path=Path(outcomes).expanduser().resolve(),
        data_format=data_format, id_column=id_column or None, label_column=label_column or None,
    )
    delta = delta if delta is not None else auto_delta(len(ds))
    source = DataSource(str(Path(data).expanduser().resolve()), str(Path(outcomes).expanduser().resolve()),
                        data_format, id_column, label_column)
    folder = init_folder(out, name, source, default_policy(max_epsilon, delta, eval_epsilon or max_epsilon), device)
    return (
        f"made the hospital folder {folder.path} for {name}: {len(ds)} stays read, delta {delta:g}, "
        f"budget epsilon {max_epsilon:g} (training), {eval_epsilon or max_epsilon:g} (validation, test)\n"
        f"  policy and data:   {folder.path / 'hospital.yaml'} (read it; edit the policy only to tighten it)\n"
        f"  SuperNode key:     {folder.path / (name + '.key')} (never leaves); give the coordinator {name}.pub\n"
        f"  ledger and secret: {folder.ledger_file}, {folder.secret_file} (back both up together)\n"
        "  next: review the app, then `fedgru hospital approve --hospital-dir " + str(folder.path) + "`"
    )


def approve(folder_path: Path, project: Path | None, note: str) -> str:
    from .launcher import app_hash

    folder = HospitalFolder(folder_path)
    digest = app_hash(project)
    folder.approve(digest, note)
    return f"{folder.name} approves app {digest} ({project or 'the installed fedgru'})"


def serve(folder_path: Path, runtime_address: str, poll_s: float, task_timeout_s: float = 6 * 3600) -> None:
    from common.logs import attach_to_flower

    from .launcher import Gate

    attach_to_flower(logging.INFO)
    Gate(HospitalFolder(folder_path), runtime_address, poll_s, task_timeout_s=task_timeout_s).serve()


def show(folder_path: Path) -> str:
    folder = HospitalFolder(folder_path)
    ledger = FileLedgerStore(folder.ledger_file, folder.secret("ledger")).read()
    policy = folder.policy
    lines = [
        f"hospital {folder.name}: ledger {folder.ledger_file}, delta {ledger.delta:g}",
        f"budgets: training patients epsilon {policy.max_epsilon:g}; validation and test patients "
        f"{policy.eval_max_epsilon:g} each",
    ]
    for split in Split:
        noisy = ledger.noisy(split)
        lines.append(
            f"  {split.value:5s} patients: epsilon {format_number(ledger.epsilon(split, 'rdp'), 4)} (RDP), "
            f"{format_number(ledger.epsilon(split, 'prv'), 4)} (PRV), {len(noisy)} DP release(s)"
        )
    for run in ledger.runs():
        entries = [e for e in ledger.entries if e.run_id == run]
        dp = [e for e in entries if e.split == Split.TRAIN and e.noise_multiplier > 0]
        lines.append(f"  run {run}: {len(dp)} DP-SGD rounds, {sum(e.steps for e in dp)} steps, {len(entries)} releases")
    approved = sorted(folder.approved())
    lines.append(f"approved app versions: {len(approved)}" + "".join(f"\n  {h}" for h in approved))
    return "\n".join(lines)
