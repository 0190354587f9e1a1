"""Where a hospital keeps its privacy ledger.

- Deployment: a JSON file on the hospital's own disk (node config ``ledger-path``),
  created once with ``fedgru ledger init``. A missing file is an error, never a fresh
  start: a hospital that has trained before must not silently restart from epsilon 0.
  Writes are atomic (write, fsync, rename) under an exclusive lock.
- Simulation: the ledger lives in the node's Flower ``context.state`` for the run and
  is saved with the run by the server.
"""

from __future__ import annotations

import fcntl
from pathlib import Path

from flwr.app import ConfigRecord, Context

from common.files import atomic_write_bytes
from common.ledger import Ledger, LedgerError

CONTEXT_KEY = "fedgru-ledger"
REPLY_KEY = "fedgru-last-reply"


class FileLedgerStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def load(self, fingerprint: str) -> Ledger:
        if not self.path.is_file():
            raise LedgerError(
                f"no privacy ledger at {self.path}. If this hospital has never trained on this "
                "data, create it with `fedgru ledger init`; if it has, restore the ledger file "
                "from backup: training without it would restart the privacy budget from zero"
            )
        ledger = Ledger.from_json(self.path.read_text(), source=str(self.path))
        if ledger.fingerprint != fingerprint:
            raise LedgerError(
                f"the ledger at {self.path} belongs to other data (fingerprint {ledger.fingerprint[:12]}..., "
                f"this data {fingerprint[:12]}...). Keep one ledger per patient data set; "
                "create a new one with `fedgru ledger init` only for data about other patients"
            )
        return ledger

    def save(self, ledger: Ledger) -> None:
        write_ledger(self.path, ledger)

    # The last training reply, kept beside the ledger: a restarted SuperNode asked for
    # the same round again resends it instead of releasing (and paying for) a new one.
    def save_reply(self, key: str, payload: bytes) -> None:
        _locked_write(self.path.with_suffix(self.path.suffix + ".last-reply"), key.encode() + b"\n" + payload)

    def load_reply(self, key: str) -> bytes | None:
        path = self.path.with_suffix(self.path.suffix + ".last-reply")
        if not path.is_file():
            return None
        stored_key, _, payload = path.read_bytes().partition(b"\n")
        return payload if stored_key.decode(errors="replace") == key else None


def write_ledger(path: Path, ledger: Ledger) -> None:
    _locked_write(path, ledger.to_json().encode())


def _locked_write(path: Path, data: bytes) -> None:
    """An atomic write under the file's exclusive lock."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(path.suffix + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        atomic_write_bytes(path, data)


class ContextLedgerStore:
    """Simulation: one ledger per simulated hospital and run, in ``context.state``."""

    def __init__(self, context: Context, hospital: str, delta: float, accountant: str):
        self.context = context
        self.hospital = hospital
        self.delta = delta
        self.accountant = accountant

    def load(self, fingerprint: str) -> Ledger:
        record = self.context.state.get(CONTEXT_KEY)
        if record is None:
            return Ledger(self.hospital, fingerprint, self.delta, self.accountant)
        return Ledger.from_json(str(record["json"]), source="the simulated hospital's ledger")

    def save(self, ledger: Ledger) -> None:
        self.context.state[CONTEXT_KEY] = ConfigRecord({"json": ledger.to_json()})

    def save_reply(self, key: str, payload: bytes) -> None:
        self.context.state[REPLY_KEY] = ConfigRecord({"key": key, "payload": payload})

    def load_reply(self, key: str) -> bytes | None:
        record = self.context.state.get(REPLY_KEY)
        if record is None or str(record.get("key")) != key:
            return None
        return bytes(record["payload"])
