"""A hospital's own folder: everything the hospital keeps, decides and never hands over.

    hospital.yaml        name, where the data is, and the privacy policy (client.policy)
    secret.key           32 random bytes (mode 0600): seals the ledger and fixes which split
                         each stay belongs to; never leaves the folder
    <name>.key, .pub     the SuperNode's authentication key pair (the private key is made
                         here with mode 0600 and never leaves; the coordinator gets .pub)
    ledger.json          the privacy ledger, sealed with secret.key
    approved-apps.txt    the FAB hashes (sha256) of the app versions the staff approved

``fedgru hospital init`` writes it, ``fedgru hospital approve`` adds an app version,
``fedgru hospital serve`` runs the approved app for the SuperNode, and the SuperNode's
only node-config key is ``hospital-dir``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from common.files import atomic_write_text, json_safe, write_private
from common.ledger import Ledger
from common.messages import Split
from common.typed import TypedDataError, build

from .policy import Policy, SplitFractions

SETTINGS_FILE = "hospital.yaml"
SECRET_FILE = "secret.key"
LEDGER_FILE = "ledger.json"
APPROVED_FILE = "approved-apps.txt"


class FolderError(ValueError):
    """The hospital folder is missing, incomplete or malformed; the message says how to mend it."""


@dataclass
class DataSource:
    path: str  # PhysioNet folder / .tar.gz, or a long-format CSV of stays
    outcomes: str  # PhysioNet Outcomes-*.txt, or a CSV with stay_id,label
    format: Literal["physionet2012", "long_csv"]
    id_column: str  # stay id column of the outcomes file ("" = the experiment's, else stay_id)
    label_column: str  # outcomes column holding the experiment's label ("" = the experiment's, else label)


@dataclass
class HospitalSettings:
    name: str
    data: DataSource
    device: Literal["auto", "cpu", "cuda"]
    policy: Policy


class HospitalFolder:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        settings_file = self.path / SETTINGS_FILE
        if not settings_file.is_file():
            raise FolderError(
                f"{self.path} is not a hospital folder (no {SETTINGS_FILE}); make one with `fedgru hospital init`"
            )
        try:
            raw = yaml.safe_load(settings_file.read_text())
            self.settings: HospitalSettings = build(HospitalSettings, raw, str(settings_file))
        except (yaml.YAMLError, TypedDataError) as exc:
            raise FolderError(f"{settings_file}: {exc}") from None
        self.settings.policy.validate(str(settings_file))
        if self.settings.policy.allow_without_dp:
            raise FolderError(f"{settings_file}: 'policy.allow_without_dp' is for simulations; a hospital never sets it")
        if not self.secret_file.is_file():
            raise FolderError(f"{self.secret_file} is missing: restore it from backup (the ledger cannot be read without it)")

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def policy(self) -> Policy:
        return self.settings.policy

    @property
    def secret_file(self) -> Path:
        return self.path / SECRET_FILE

    @property
    def ledger_file(self) -> Path:
        return self.path / LEDGER_FILE

    def secret(self, purpose: str) -> bytes:
        """A key for one purpose, derived from the folder's secret (so a leaked ledger
        key says nothing about the split, and the other way round)."""
        return hmac.new(self.secret_file.read_bytes(), purpose.encode(), hashlib.sha256).digest()

    def resolve(self, path: str) -> Path:
        p = Path(path).expanduser()
        return p if p.is_absolute() else self.path / p

    # -- approved app versions ---------------------------------------------------------
    def approved(self) -> set[str]:
        path = self.path / APPROVED_FILE
        if not path.is_file():
            return set()
        return {line.split()[0] for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")}

    def approve(self, fab_hash: str, note: str) -> None:
        path = self.path / APPROVED_FILE
        lines = path.read_text() if path.is_file() else "# sha256 of each approved app version (FAB), when, and a note\n"
        if fab_hash not in self.approved():
            lines += f"{fab_hash} {time.strftime('%Y-%m-%dT%H:%M:%S%z')} {note}\n"
        atomic_write_text(path, lines)


def split_of(stay_ids: list[str], key: bytes, fractions: SplitFractions) -> list[Split]:
    """Each stay's split, from a keyed hash of its id: the same stay is always in the
    same group of patients, in every export and every run, and nobody without the
    hospital's secret can tell which."""
    out = []
    for stay in stay_ids:
        u = int.from_bytes(hmac.new(key, stay.encode(), hashlib.sha256).digest()[:8], "big") / 2**64
        out.append(Split.TRAIN if u < fractions.train else Split.VAL if u < fractions.train + fractions.val else Split.TEST)
    return out


def default_policy(max_epsilon: float, delta: float, eval_epsilon: float) -> Policy:
    """What ``fedgru hospital init`` writes unless told otherwise (each line commented there)."""
    return Policy(
        max_epsilon=max_epsilon,
        delta=delta,
        eval_max_epsilon=eval_epsilon,
        min_noise_multiplier=0.5,
        max_epsilon_per_round=max_epsilon / 2,
        clipping_norm=[0.01, 10.0],
        evaluation_splits=[Split.VAL, Split.TEST],
        max_evaluations_per_run={Split.VAL.value: 10, Split.TEST.value: 1},
        max_histogram_bins=20,
        split=SplitFractions(0.7, 0.1, 0.2),
    )


POLICY_COMMENTS = {
    "max_epsilon": "training patients: epsilon of everything ever released about them (all runs)",
    "delta": "the delta every epsilon in the ledger is stated at (below 1/n)",
    "eval_max_epsilon": "validation patients, and test patients: each group's own budget",
    "min_noise_multiplier": "DP-SGD: a floor on the noise multiplier",
    "max_epsilon_per_round": "DP-SGD: a ceiling on what one round may cost",
    "clipping_norm": "DP-SGD: per-example clipping norms allowed [smallest, largest]",
    "evaluation_splits": "patients that may be scored (never the training split)",
    "max_evaluations_per_run": "score histograms one run may ask for, per split",
    "max_histogram_bins": "bins per class of a released score histogram",
    "split": "this hospital's train/validation/test shares (fixed per stay by secret.key)",
}


def init_folder(
    out: Path, name: str, data: DataSource, policy: Policy, device: str = "auto"
) -> HospitalFolder:
    """Create a hospital folder; refuses to touch an existing one."""
    if not name or not all(c.isalnum() or c in "-_" for c in name):
        raise FolderError(f"hospital name {name!r}: use letters, digits, '-' and '_' only")
    if (out / SETTINGS_FILE).exists() or (out / SECRET_FILE).exists() or (out / LEDGER_FILE).exists():
        raise FolderError(f"{out} already holds a hospital folder; it is never overwritten")
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    settings = HospitalSettings(name=name, data=data, device=device, policy=policy)
    atomic_write_text(out / SETTINGS_FILE, _settings_yaml(settings))
    write_private(out / SECRET_FILE, secrets.token_bytes(32))
    make_supernode_keypair(out, name)
    folder = HospitalFolder(out)
    write_private(folder.ledger_file, Ledger(name, policy.delta).to_json(folder.secret("ledger")).encode())
    return folder


def _settings_yaml(settings: HospitalSettings) -> str:
    plain = json_safe(asdict(settings))
    head = (
        f"# fedgru hospital folder of {settings.name}: what this hospital allows and where its data is.\n"
        "# Written by `fedgru hospital init`. The coordinator never sees or sets any of it; a run's\n"
        "# config may ask for less than this policy allows, never for more.\n"
    )
    body = yaml.safe_dump({k: plain[k] for k in ("name", "data", "device")}, sort_keys=False)
    lines = ["policy:"]
    for key, value in plain["policy"].items():
        if key == "allow_without_dp":
            continue
        text = yaml.safe_dump({key: value}, default_flow_style=True, width=1000, sort_keys=False).strip()[1:-1]
        lines.append(f"  {text:<42} # {POLICY_COMMENTS[key]}")
    return head + body + "\n".join(lines) + "\n"


def make_supernode_keypair(out: Path, name: str) -> tuple[Path, Path]:
    """``<name>.key`` (OpenSSH private, mode 0600 from creation on) and ``<name>.pub``:
    the elliptic-curve key (SECP384R1) ``flower-supernode --auth-supernode-private-key``
    reads; the coordinator registers the public half with ``flwr supernode register``."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    write_private(out / f"{name}.key", private)
    (out / f"{name}.pub").write_bytes(public + b"\n")
    return out / f"{name}.key", out / f"{name}.pub"
