"""Where a hospital keeps its privacy ledger, and the one way to change it.

Every release goes through :meth:`LedgerStore.transaction`: the ledger is read (its seal
checked), the budget checked, the release recorded and the ledger saved, all while one
exclusive lock is held, so two trainings at once can never lose an entry or both pass
a budget that only one of them fits.

- Deployment (:class:`FileLedgerStore`): ``ledger.json`` in the hospital's folder, sealed
  with a key derived from the folder's secret. A missing file is an error, never a
  fresh start: a hospital that has released before must not restart from epsilon 0.
- Simulation (:class:`ContextLedgerStore`): the ledger of one simulated hospital for one
  run, in Flower's ``context.state``, sealed with a key that lives only in that state.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flwr.app import ConfigRecord, Context

from common.files import atomic_write_bytes
from common.ledger import Ledger, LedgerError

CONTEXT_KEY = "fedgru-ledger"
REPLY_KEY = "fedgru-last-reply"
MAX_REPLY_RUNS = 16  # runs whose last training reply a hospital keeps for resending


class FileLedgerStore:
    def __init__(self, path: Path, key: bytes):
        self.path = Path(path)
        self.key = key

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _read(self) -> Ledger:
        if not self.path.is_file():
            raise LedgerError(
                f"no privacy ledger at {self.path}. It is made once by `fedgru hospital init`; if this hospital "
                "has released anything before, restore the file from backup: without it the privacy budget "
                "would restart from zero"
            )
        return Ledger.from_json(self.path.read_text(), source=str(self.path), key=self.key)

    def read(self) -> Ledger:
        with self._locked():
            return self._read()

    @contextmanager
    def transaction(self) -> Iterator[Ledger]:
        """The ledger, locked until the block ends; saved then unless the block raised."""
        with self._locked():
            ledger = self._read()
            yield ledger
            atomic_write_bytes(self.path, ledger.to_json(self.key).encode())

    # The last training reply of each run, kept beside the ledger: a restarted coordinator
    # that asks for the same round again gets it resent instead of a new release (and a
    # new charge). One slot per run, so a second run at the same hospital cannot push out
    # the reply a resumed first run asks for; the slots of the MAX_REPLY_RUNS most recent
    # runs are kept.
    def _reply_file(self, run_id: str) -> Path:
        # a hash of the run id names the slot: the id comes from the coordinator
        name = hashlib.sha256(run_id.encode()).hexdigest()[:32]
        return self.path.with_name(self.path.name + ".replies") / name

    def save_reply(self, run_id: str, key: str, payload: bytes) -> None:
        path = self._reply_file(run_id)
        with self._locked():
            path.parent.mkdir(mode=0o700, exist_ok=True)  # like the rest of the folder: its owner only
            others = [f for f in path.parent.iterdir() if f != path]
            atomic_write_bytes(path, key.encode() + b"\n" + payload)
            # the newest slot's time is strictly the largest, even within the clock's resolution
            newest = max([time.time_ns()] + [f.stat().st_mtime_ns + 1 for f in others])
            os.utime(path, ns=(newest, newest))
            for stale in sorted(others, key=lambda f: f.stat().st_mtime_ns)[: max(0, len(others) + 1 - MAX_REPLY_RUNS)]:
                stale.unlink(missing_ok=True)

    def load_reply(self, run_id: str, key: str) -> bytes | None:
        path = self._reply_file(run_id)
        if not path.is_file():
            return None
        stored_key, _, payload = path.read_bytes().partition(b"\n")
        return payload if stored_key.decode(errors="replace") == key else None


class ContextLedgerStore:
    """Simulation: one ledger per simulated hospital and run, in ``context.state``."""

    def __init__(self, context: Context, hospital: str, delta: float, accountant: str):
        self.context = context
        self.hospital = hospital
        self.delta = delta
        self.accountant = accountant

    def _key(self) -> bytes:
        record = self.context.state.get(CONTEXT_KEY)
        return bytes(record["key"]) if record is not None else secrets.token_bytes(32)

    def read(self) -> Ledger:
        record = self.context.state.get(CONTEXT_KEY)
        if record is None:
            return Ledger(self.hospital, self.delta, self.accountant)
        return Ledger.from_json(str(record["json"]), source="the simulated hospital's ledger", key=bytes(record["key"]))

    @contextmanager
    def transaction(self) -> Iterator[Ledger]:
        key = self._key()  # a simulation node serves one message at a time: no lock needed
        ledger = self.read()
        yield ledger
        self.context.state[CONTEXT_KEY] = ConfigRecord({"json": ledger.to_json(key), "key": key})

    # A simulated hospital's context holds one run (Flower makes one per node and run),
    # so one slot is one per run here too.
    def save_reply(self, run_id: str, key: str, payload: bytes) -> None:
        self.context.state[REPLY_KEY] = ConfigRecord({"key": key, "payload": payload})

    def load_reply(self, run_id: str, key: str) -> bytes | None:
        record = self.context.state.get(REPLY_KEY)
        if record is None or str(record.get("key")) != key:
            return None
        return bytes(record["payload"])
