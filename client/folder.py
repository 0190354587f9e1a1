"""A hospital's own folder: everything the hospital keeps, decides and never hands over.

    hospital.yaml        name, where the data is, the counts it declares, and the privacy
                         policy (client.policy)
    definition.yaml      what it reads: its task and features (common.definition)
    cache/               its stays, read from its export by its definition (mode 0700)
    secret.key           32 random bytes (mode 0600): seals the ledger and fixes which split
                         each stay belongs to; never leaves the folder
    <name>.key, .pub     the SuperNode's authentication key pair (the private key is made
                         here with mode 0600 and never leaves; the coordinator gets .pub)
    ledger.json          the privacy ledger, sealed with secret.key
    approved-apps.txt    the FAB hashes (sha256) of the app versions the staff approved

``fedgru hospital init`` writes it, ``fedgru hospital data`` registers a new export or
definition (``client.export``), ``fedgru hospital approve`` adds an app version,
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

from common.config import ConfigError
from common.definition import DataDefinition
from common.files import atomic_write_text, json_safe, write_private
from common.ledger import Ledger
from common.messages import HOSPITAL_NAME_RULE, Split, is_hospital_name
from common.typed import TypedDataError, build

from .peer_keys import SigningKey, load_signing_key
from .policy import Policy, SplitFractions, default_policy  # noqa: F401 - default_policy: hospital init writes it

SETTINGS_FILE = "hospital.yaml"
DEFINITION_FILE = "definition.yaml"
CACHE_DIR = "cache"
SECRET_FILE = "secret.key"
LEDGER_FILE = "ledger.json"
APPROVED_FILE = "approved-apps.txt"


class FolderError(ValueError):
    """The hospital folder is missing, incomplete or malformed; the message says how to mend it."""


@dataclass
class DataSource:
    path: str  # PhysioNet folder / .tar.gz, or a long-format CSV of stays (relative: to the folder)
    outcomes: str  # PhysioNet Outcomes-*.txt, or a CSV with stay_id,label
    format: Literal["physionet2012", "long_csv"]
    id_column: str  # stay id column of the outcomes file
    label_column: str  # outcomes column holding the task's label (the definition's task.label_column, by another name)


@dataclass
class DeclaredCounts:
    """How many stays a hospital says each of its splits holds: released without DP (the
    training count with every training reply, as Flower's weighting needs it; the
    evaluated split's with every histogram), and every sample rate, noise calibration and
    per-round cost it computes uses them. Fixed numbers, counted when the staff register
    an export and kept until they recount, so nothing a hospital sends depends on whether
    one patient is in its data (the true split sizes never leave it)."""

    train: int
    val: int
    test: int

    def of(self, split: Split) -> int:
        return {Split.TRAIN: self.train, Split.VAL: self.val, Split.TEST: self.test}[split]

    def validate(self, where: str) -> None:
        if min(self.train, self.val, self.test) < 0 or self.train < 1:
            raise FolderError(f"{where}: 'declared' counts must be whole numbers >= 0, at least 1 training stay")


@dataclass
class HospitalSettings:
    name: str
    data: DataSource
    device: Literal["auto", "cpu", "cuda"]
    policy: Policy
    declared: DeclaredCounts | None = None  # None: a folder from before declared counts (`hospital data` sets them)


class HospitalFolder:
    """A hospital's folder, read and checked. ``registered=False`` opens one whose export
    is not registered yet (``fedgru hospital data`` does, for a folder made by an older
    fedgru); everything that serves a message needs a registered one."""

    def __init__(self, path: str | Path, registered: bool = True):
        self.path = Path(path)
        self._definition: DataDefinition | None = None
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
        try:
            self.settings.policy.validate(str(settings_file))
        except ValueError as exc:  # a policy the staff edited by hand: an error naming the key, not a traceback
            raise FolderError(str(exc)) from None
        if self.settings.policy.allow_without_dp:
            raise FolderError(f"{settings_file}: 'policy.allow_without_dp' is for simulations; a hospital never sets it")
        if not self.secret_file.is_file():
            raise FolderError(f"{self.secret_file} is missing: restore it from backup (the ledger cannot be read without it)")
        if self.settings.declared is not None:
            self.settings.declared.validate(str(settings_file))
        if registered:
            self.require_registered()

    def require_registered(self) -> None:
        missing = [what for ok, what in (
            (self.settings.declared is not None, "the counts it declares"),
            ((self.path / DEFINITION_FILE).is_file(), f"its data definition ({DEFINITION_FILE})"),
            (bool(self.settings.data.id_column and self.settings.data.label_column), "its outcomes' column names"),
        ) if not ok]
        if missing:
            raise FolderError(
                f"{self.path} has no registered export (it lacks {'; '.join(missing)}): it was made by an earlier "
                f"fedgru. Run `fedgru hospital data --hospital-dir {self.path}` once: it reads the export, fixes what "
                "this hospital reads and the counts it declares"
            )

    @property
    def declared(self) -> DeclaredCounts:
        self.require_registered()
        return self.settings.declared

    @property
    def definition(self) -> DataDefinition:
        """What this hospital reads (definition.yaml): its task and features."""
        if self._definition is None:
            path = self.path / DEFINITION_FILE
            try:
                self._definition = DataDefinition.from_plain(yaml.safe_load(path.read_text()), str(path))
            except OSError:
                raise FolderError(f"{path} is missing: run `fedgru hospital data --hospital-dir {self.path}`") from None
            except (yaml.YAMLError, ConfigError) as exc:
                raise FolderError(f"{path}: {exc}") from None
        return self._definition

    @property
    def cache_path(self) -> Path:
        return self.path / CACHE_DIR

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

    def signing_key(self) -> SigningKey:
        """The hospital's own long-term key (``<name>.key``, its SuperNode key): it signs the
        round keys of secure aggregation (``client.peer_keys``)."""
        path = self.path / f"{self.name}.key"
        if not path.is_file():
            raise FolderError(f"{path} is missing: restore it from backup (it is this hospital's identity)")
        return load_signing_key(path)

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

    def approvals(self) -> list[str]:
        """Every approval line: the app's sha256, when, and the note (version, who, why)."""
        path = self.path / APPROVED_FILE
        return [line for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")] \
            if path.is_file() else []

    def approve(self, fab_hash: str, note: str) -> bool:
        """Record an approval: one line per approval, so a second one (with the reviewer's
        note, say) is kept beside the first as the audit trail. True: the version was new."""
        path = self.path / APPROVED_FILE
        lines = path.read_text() if path.is_file() else "# sha256 of each approved app version (FAB), when, and a note\n"
        new = fab_hash not in self.approved()
        lines += f"{fab_hash} {time.strftime('%Y-%m-%dT%H:%M:%S%z')} {' '.join(note.split())}\n"
        atomic_write_text(path, lines)
        return new


def split_of(stay_ids: list[str], key: bytes, fractions: SplitFractions) -> list[Split]:
    """Each stay's split, from a keyed hash of its id: the same stay is always in the
    same group of patients, in every export and every run, and nobody without the
    hospital's secret can tell which."""
    out = []
    for stay in stay_ids:
        u = int.from_bytes(hmac.new(key, stay.encode(), hashlib.sha256).digest()[:8], "big") / 2**64
        out.append(Split.TRAIN if u < fractions.train else Split.VAL if u < fractions.train + fractions.val else Split.TEST)
    return out


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
    "max_model_parameters": "the largest model (weights) a run may send to train or score",
    "max_message_bytes": "the most bytes of weights one message may carry",
    "max_micro_batch": "examples whose per-example gradients are held at once (memory)",
    "min_honest": "secure aggregation: the fewest hospitals whose noise it counts on, itself included",
    "max_epsilon_alone": "secure aggregation: the epsilon its own noise alone must keep if all others collude",
    "max_colluding": "secure aggregation: other hospitals that may side with a hostile coordinator",
    "peer_keys": "secure aggregation: hospitals accepted in a sum, name: its <name>.pub line ({}: any)",
    "onset_noise": "the monitor's onset histogram's noise it accepts: laplace (one run), gaussian (many)",
}


def init_folder(
    out: Path, name: str, data: DataSource, policy: Policy, device: str = "auto"
) -> HospitalFolder:
    """Create a hospital folder (keys, secret, empty ledger); refuses to touch an existing
    one. Its export is registered next (``client.export.register``)."""
    if not is_hospital_name(name):
        raise FolderError(f"hospital name {name!r}: {HOSPITAL_NAME_RULE}")
    if (out / SETTINGS_FILE).exists() or (out / SECRET_FILE).exists() or (out / LEDGER_FILE).exists():
        raise FolderError(f"{out} already holds a hospital folder; it is never overwritten")
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    write_settings(out, HospitalSettings(name=name, data=data, device=device, policy=policy))
    write_private(out / SECRET_FILE, secrets.token_bytes(32))
    make_supernode_keypair(out, name)
    folder = HospitalFolder(out, registered=False)
    write_private(folder.ledger_file, Ledger(name, policy.delta).to_json(folder.secret("ledger")).encode())
    return folder


def write_settings(folder: Path, settings: HospitalSettings) -> None:
    atomic_write_text(folder / SETTINGS_FILE, _settings_yaml(settings))


def _settings_yaml(settings: HospitalSettings) -> str:
    plain = json_safe(asdict(settings))
    head = (
        f"# fedgru hospital folder of {settings.name}: what this hospital allows and where its data is.\n"
        "# Written by `fedgru hospital init` and `fedgru hospital data`. The coordinator never sees or sets\n"
        "# the data or the policy; a run's config may ask for less than this policy allows, never for more.\n"
    )
    body = yaml.safe_dump({k: plain[k] for k in ("name", "data", "device")}, sort_keys=False)
    lines = []
    if settings.declared is not None:
        lines += [
            "# The stays this hospital says each split holds. Released without DP (the training count with",
            "# every training reply, an evaluated split's with its histogram) and used for every sample rate",
            "# and noise level, so no reply depends on any one patient. Counted when an export is registered;",
            "# `fedgru hospital data --recount` counts again (itself a release of these three numbers).",
            "declared: " + yaml.safe_dump(plain["declared"], default_flow_style=True, width=1000, sort_keys=False).strip(),
        ]
    lines.append("policy:")
    for key, value in plain["policy"].items():
        if key == "allow_without_dp":
            continue
        if key == "peer_keys" and value:  # a key line each: they are long
            lines.append(f"  {key + ':':<42} # {POLICY_COMMENTS[key]}")
            lines += ["    " + yaml.safe_dump({name: line}, width=1000).strip() for name, line in value.items()]
            continue
        text = yaml.safe_dump({key: value}, default_flow_style=True, width=1000, sort_keys=False).strip()[1:-1]
        lines.append(f"  {text:<42} # {POLICY_COMMENTS[key]}")
    return head + body + "\n".join(lines) + "\n"


def write_definition(folder: Path, definition: DataDefinition) -> None:
    """definition.yaml: the task and features this hospital reads, one variable a line."""
    plain = definition.to_plain()
    head = (
        "# What this hospital reads: its task (outcome column, classes, unknown-outcome codes) and its\n"
        "# features (variables, selection, window, descriptors). Every run's config must read the same,\n"
        "# or the hospital refuses it, naming the key. Change it only with `fedgru hospital data --config`.\n"
    )
    return atomic_write_text(folder / DEFINITION_FILE, head + yaml.safe_dump(
        plain, sort_keys=False, default_flow_style=None, width=1000, allow_unicode=True))


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
