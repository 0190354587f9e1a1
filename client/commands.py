"""The hospital's own commands (``fedgru hospital ...``): make its folder, approve an
app version, list the hospitals it aggregates with, serve its SuperNode, and show what it
has spent."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
from dataclasses import replace
from pathlib import Path

from common.config import ExperimentConfig, auto_delta, load_config
from common.data.dataset import read_export
from common.definition import DataDefinition
from common.ledger import NOISY, Ledger
from common.messages import HOSPITAL_NAME_RULE, Item, Mechanism, Split, evaluation_mechanism, is_hospital_name
from common.metrics import format_number
from common.signatures import public_key_of
from common.version import app_version

from . import export as exports
from .folder import DataSource, DeclaredCounts, FolderError, HospitalFolder, default_policy, init_folder, write_settings
from .ledger_store import FileLedgerStore
from .policy import Policy


def init(
    out: Path, name: str, data: str, outcomes: str, max_epsilon: float, delta: float | None = None,
    eval_epsilon: float | None = None, data_format: str = "physionet2012", id_column: str = "",
    label_column: str = "", device: str = "auto", cfg: ExperimentConfig | None = None,
) -> str:
    """Create the folder: read the export once by the federation's task and features (it
    must load, and delta is set below 1/n), keep its tensors, declare its split sizes.
    Options are checked before anything is written, and a folder that fails half-way is
    removed again (a retry found "already holds a hospital folder")."""
    for flag, value in (("--max-epsilon", max_epsilon), ("--eval-epsilon", eval_epsilon)):
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise FolderError(f"{flag} {value:g}: a budget must be a positive number")
    cfg = cfg or load_config()
    definition = DataDefinition.of(cfg)
    source = DataSource(str(Path(data).expanduser().resolve()), str(Path(outcomes).expanduser().resolve()),
                        data_format, id_column or cfg.data.id_column, label_column or cfg.task.label_column)
    ds = read_export(Path(source.path), Path(source.outcomes), data_format, source.id_column,
                     replace(definition.task, label_column=source.label_column), definition.features)
    if delta is not None and not 0 < delta < 1 / len(ds):
        # at delta >= 1/n a mechanism that publishes one stay's record whole (each with probability delta) passes
        raise FolderError(f"--delta {delta:g} must be below 1/n = {1 / len(ds):.2g} for the {len(ds)} stays read: at "
                          f"1/n or above, the guarantee allows publishing a stay whole (default {auto_delta(len(ds)):g})")
    delta = delta if delta is not None else auto_delta(len(ds))
    before = set(out.iterdir()) if out.is_dir() else None  # a folder the user made beforehand is kept
    try:
        folder = init_folder(out, name, source, default_policy(max_epsilon, delta, eval_epsilon or max_epsilon), device)
        reg = exports.register(folder, source, definition, ds=ds)
    except BaseException:
        # leave nothing half-made behind (the retry would refuse it), and nothing the user had
        for made in ([out] if before is None else [p for p in out.iterdir() if p not in before]):
            if made.is_dir() and not made.is_symlink():
                shutil.rmtree(made, ignore_errors=True)
            else:
                made.unlink(missing_ok=True)
        raise
    loose = max(max_epsilon, eval_epsilon or 0.0)
    lines = [
        f"made the hospital folder {folder.path} for {name}: {reg.stays} stays read, delta {delta:g}, "
        f"budget epsilon {max_epsilon:g} (training), {eval_epsilon or max_epsilon:g} (validation, test)",
        *([f"  note: a budget of epsilon {loose:g} lets the odds of any outcome move by a factor up to e^{loose:g} = "
           f"{math.exp(loose):.3g} for one stay; above about 10 the guarantee says little (common budgets are 1 to 8)"]
          if loose > 10 else []),
        *_evaluation_runs(cfg, folder.policy, delta),
        *(f"  note: {n}" for n in reg.notes),
        f"  declared split sizes: {_counts(reg.declared)} (released with training replies and histograms)",
        f"  policy and data:   {folder.path / 'hospital.yaml'} (read it; any change to the policy is your privacy officer's decision)",
        f"  what it reads:     {folder.path / 'definition.yaml'} (task and features; `fedgru hospital data` changes it)",
        f"  SuperNode key:     {folder.path / (name + '.key')} (never leaves); give the coordinator {name}.pub",
        f"  ledger and secret: {folder.ledger_file}, {folder.secret_file} (back both up together)",
        f"  next: review the app, then `fedgru hospital approve --hospital-dir {folder.path}`",
    ]
    return "\n".join(lines)


def _evaluation_runs(cfg: ExperimentConfig, policy: Policy, delta: float) -> list[str]:
    """How many runs of ``cfg`` the validation and test budgets allow, composed as the
    hospital's own check composes them (the second run costs less than the first): once
    they are spent the hospital refuses every later run that scores those stays (a new
    user found this out after a three-round try-out)."""
    from .preflight import planned_evaluation_entries  # torch and Opacus behind it: only init needs them

    if not cfg.evaluation.dp:
        return []
    most = 100

    def allowed(config: ExperimentConfig) -> int:
        empty, counts = Ledger("plan", delta), []
        for split in (Split.VAL, Split.TEST):
            entries, runs = planned_evaluation_entries(config, policy, split), 0
            while entries and runs < most and empty.epsilon_with(entries * (runs + 1)) <= policy.eval_max_epsilon + 1e-9:
                runs += 1
            counts.append(runs)
        return min(counts)

    def said(runs: int) -> str:
        return ("no such run" if not runs else f"{runs} such run{'' if runs == 1 else 's'}" if runs < most
                else f"{most} or more such runs")

    runs, other = allowed(cfg), ""
    if evaluation_mechanism(cfg, Item.ONSET_HISTOGRAM) == Mechanism.LAPLACE:
        # the onset histogram's Laplace noise is the smaller in one run, but composes less well over many
        gaussian = allowed(dataclasses.replace(cfg, evaluation=dataclasses.replace(cfg.evaluation, onset_noise="gaussian")))
        if gaussian > runs:
            other = (f" (with evaluation.onset_noise gaussian, {said(gaussian)}: the monitor's Laplace noise is the "
                     "smaller in one run and composes less well over many; policy.onset_noise: [gaussian] keeps to it)")
    return [f"  evaluation budget: the config spends epsilon {cfg.evaluation.val_epsilon:g} on validation and "
            f"{cfg.evaluation.test_epsilon:g} on test stays in every run, so {policy.eval_max_epsilon:g} allows "
            f"{said(runs)}{other}; --eval-epsilon sets it"]


def _counts(c: DeclaredCounts) -> str:
    return f"train {c.train}, validation {c.val}, test {c.test}"


def register_data(
    folder_path: Path, data: str | None = None, outcomes: str | None = None, data_format: str | None = None,
    id_column: str = "", label_column: str = "", cfg: ExperimentConfig | None = None, recount: bool = False,
) -> str:
    """``fedgru hospital data``: register a new export (or the same one read again), a new
    definition (``cfg``'s task and features), or both; declare new counts on ``recount``
    (or when the folder declares none yet)."""
    folder = HospitalFolder(folder_path, registered=False)
    old = folder.settings.data
    fallback = cfg or load_config()
    if cfg is not None:
        definition = DataDefinition.of(cfg)
    else:
        try:
            definition = folder.definition
        except FolderError:  # a folder from before definitions: the federation's default config
            definition = DataDefinition.of(fallback)
    source = DataSource(
        str(Path(data).expanduser().resolve()) if data else old.path,
        str(Path(outcomes).expanduser().resolve()) if outcomes else old.outcomes,
        data_format or old.format,
        id_column or old.id_column or fallback.data.id_column,
        label_column or old.label_column or definition.task.label_column,
    )
    first = folder.settings.declared is None
    reg = exports.register(folder, source, definition, recount=recount)
    lines = [f"{folder.name}: registered {reg.stays} stays of {source.path} ({source.format}), read by "
             f"{folder.path / 'definition.yaml'}"]
    if recount or first:
        lines.append(f"  declared split sizes: {_counts(reg.declared)} (released with training replies and histograms)")
    else:
        lines.append(f"  declared split sizes kept: {_counts(reg.declared)}; the export's splits now hold "
                     f"{_counts(reg.counted)} (`--recount` declares these, itself a release of three counts)")
        drift = max(abs(a - b) / max(b, 1) for a, b in zip(
            (reg.counted.train, reg.counted.val, reg.counted.test), (reg.declared.train, reg.declared.val, reg.declared.test)))
        if drift > 0.05:
            lines.append("  warning: the splits differ from the declared counts by more than 5%: the sample rate and "
                         "noise follow the declared ones, and a coordinator drops an evaluation release with more "
                         "patients than declared; consider --recount")
    lines += [f"  note: {n}" for n in reg.notes]
    return "\n".join(lines)


def approve(folder_path: Path, project: Path | None, note: str) -> str:
    from .launcher import app_hash

    folder = HospitalFolder(folder_path)
    digest = app_hash(project)
    version = app_version(project)
    new = folder.approve(digest, f"[{version}] {note}".strip())
    return (f"{folder.name} approves app {digest} ({version}, {project or 'the installed fedgru'})"
            + ("" if new else "; it was approved before: this approval is recorded beside the earlier one")
            + ("" if note else "; no --note: who approved it and why is worth recording"))



def add_peer(folder_path: Path, name: str, key_file: Path) -> str:
    """List another hospital in this one's ``policy.peer_keys``: from then on, in secure
    aggregation, every other participant must be a listed hospital (``client.peer_keys``).
    The key file is that hospital's ``<name>.pub``, received from its staff, not from the
    coordinator."""
    folder = HospitalFolder(folder_path, registered=False)
    if not is_hospital_name(name):
        raise FolderError(f"hospital name {name!r}: {HOSPITAL_NAME_RULE}")
    if name == folder.name:
        raise FolderError(f"{name} is this hospital: list the others")
    try:
        line = key_file.read_text().strip()
    except OSError as exc:
        raise FolderError(f"{key_file}: cannot be read ({exc.strerror})") from None
    try:
        public_key_of(line)
    except ValueError as exc:
        raise FolderError(f"{key_file}: {exc}") from None
    settings = folder.settings
    same = [other for other, known in settings.policy.peer_keys.items()
            if other != name and known.split()[:2] == line.split()[:2]]
    if same:
        raise FolderError(f"{key_file}: this key is already listed for {same[0]}; one hospital is listed once")
    before = settings.policy.peer_keys.get(name)
    settings.policy.peer_keys = {**settings.policy.peer_keys, name: line}
    write_settings(folder.path, settings)
    verb = "kept" if before == line else "replaced" if before else "added"
    listed = len(settings.policy.peer_keys)
    return (f"{folder.name}: {name} {verb} in policy.peer_keys ({listed} {'hospital' if listed == 1 else 'hospitals'} "
            "listed). "
            "In secure aggregation this hospital now refuses a round in which any other participant is not a "
            "listed hospital.")


def serve(folder_path: Path, runtime_address: str, poll_s: float, task_timeout_s: float = 6 * 3600) -> None:
    from common.logs import attach_to_flower

    from .launcher import Gate

    attach_to_flower(logging.INFO)
    Gate(HospitalFolder(folder_path), runtime_address, poll_s, task_timeout_s=task_timeout_s).serve()


def show(folder_path: Path, as_json: bool = False) -> str:
    """What each group of the hospital's patients has spent (RDP and PRV), per run, and
    the approved app versions; ``as_json``: the same as one JSON object."""
    folder = HospitalFolder(folder_path, registered=False)
    ledger = FileLedgerStore(folder.ledger_file, folder.secret("ledger")).read()
    policy = folder.policy
    budgets = {Split.TRAIN: policy.max_epsilon, Split.VAL: policy.eval_max_epsilon, Split.TEST: policy.eval_max_epsilon}
    groups = {split.value: {"epsilon": ledger.epsilon(split, "rdp"), "epsilon_prv": ledger.epsilon(split, "prv"),
                            "budget": budgets[split], "releases": len(ledger.noisy(split))} for split in Split}
    for split in Split:  # secure aggregation's releases: also the epsilon of this hospital's own noise alone
        if any(e.mechanism == Mechanism.SKELLAM for e in ledger.noisy(split)):
            groups[split.value]["epsilon_alone"] = ledger.epsilon_alone(split)
    runs = []
    for run in ledger.runs():
        entries = [e for e in ledger.entries if e.run_id == run]
        dp = [e for e in entries if e.split == Split.TRAIN and e.noise_multiplier > 0]
        runs.append({"run_id": run, "dp_sgd_rounds": len(dp), "secure_rounds": sum(e.mechanism == Mechanism.SKELLAM
                                                                                  for e in dp), "steps": sum(e.steps for e in dp), "releases": len(entries),
                     "dp_releases": sum(e.mechanism in NOISY for e in entries)})
    approved = sorted(folder.approved())
    if as_json:
        return json.dumps({"hospital": folder.name, "ledger": str(folder.ledger_file), "delta": ledger.delta,
                           "accountant": ledger.accountant, "groups": groups, "runs": runs, "approved_apps": approved},
                          indent=1)
    lines = [
        f"hospital {folder.name}: ledger {folder.ledger_file}, delta {ledger.delta:g}",
        (f"budgets: training patients epsilon {policy.max_epsilon:g}; validation and test patients "
         f"{policy.eval_max_epsilon:g} each"),
    ]
    for split, g in groups.items():
        second = (f"{format_number(g['epsilon_alone'])} with its own noise alone (secure aggregation; "
                  f"policy max_epsilon_alone {policy.max_epsilon_alone:g})" if "epsilon_alone" in g
                  else f"{format_number(g['epsilon_prv'])} by the PRV accountant" + (
                      " (which has no analysis of the Laplace release among them: RDP's)"
                      if any(e.mechanism == Mechanism.LAPLACE for e in ledger.noisy(Split(split))) else ""))
        lines.append(f"  {split:5s} patients: epsilon {format_number(g['epsilon'])} by the RDP accountant, {second}, "
                     f"{g['releases']} DP release(s)")
    for r in runs:
        lines.append(f"  run {r['run_id']}: {r['dp_sgd_rounds']} DP-SGD rounds" + (
            f" ({r['secure_rounds']} by secure aggregation)" if r["secure_rounds"] else "")
            + f", {r['steps']} steps; {r['dp_releases']} DP releases and {r['releases'] - r['dp_releases']} without "
            "DP (declared split sizes, settings) in its ledger")
    lines.append(f"approved app versions: {len(approved)} (each approval: sha256, when, [version] note)"
                 + "".join(f"\n  {line}" for line in folder.approvals()))
    return "\n".join(lines)
