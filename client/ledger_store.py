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
import logging
import os
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flwr.app import ConfigRecord, Context

from common.files import atomic_write_bytes
from common.ledger import Ledger, LedgerError

CONTEXT_KEY = "fedgru-ledger"
REPLY_KEY = "fedgru-last-reply"
MAX_REPLY_RUNS = 16  # runs whose last training reply a hospital keeps for resending

log = logging.getLogger("fedgru.hospital")


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
    # the reply a resumed first run asks for; the MAX_REPLY_RUNS runs that saved a reply
    # most recently keep theirs. A slot is "<sequence> <sha256 of the key>\n<payload>":
    # the sequence, not a file time, orders the slots (clocks and backup tools move times).
    @property
    def _replies(self) -> Path:
        return self.path.with_name(self.path.name + ".replies")

    def _reply_file(self, run_id: str) -> Path:
        return self._replies / _digest(run_id)[:32]  # the id comes from the coordinator: hashed

    def save_reply(self, run_id: str, key: str, payload: bytes) -> None:
        """Best effort: the round is charged and trained by now, and a slot that cannot be
        written must not turn the reply into a refusal (it only means a resumed
        coordinator's repeat of this round would be trained and charged again)."""
        try:
            with self._locked():
                self._save_reply(run_id, key, payload)
        except OSError as err:
            log.warning("the reply of this round could not be kept for resending (%s); a repeat of the "
                        "round would be trained and charged again", type(err).__name__)

    def _save_reply(self, run_id: str, key: str, payload: bytes) -> None:
        folder, path = self._replies, self._reply_file(run_id)
        folder.mkdir(exist_ok=True)
        os.chmod(folder, 0o700)  # like the rest of the hospital's folder: its owner only
        slots = {}
        for f in folder.iterdir():
            if f.name.endswith(".tmp"):  # left by a crash inside atomic_open; under the lock, stale
                f.unlink(missing_ok=True)
            elif _SLOT_NAME.fullmatch(f.name) and f != path:
                slots[f] = _sequence(f)
        sequence = max(slots.values(), default=0) + 1
        atomic_write_bytes(path, f"{sequence} {_digest(key)}\n".encode() + payload)
        for stale in sorted(slots, key=slots.get)[: max(0, len(slots) + 1 - MAX_REPLY_RUNS)]:
            stale.unlink(missing_ok=True)

    def load_reply(self, run_id: str, key: str) -> bytes | None:
        try:
            header, _, payload = self._reply_file(run_id).read_bytes().partition(b"\n")
        except OSError:  # none kept (or pruned meanwhile): train as usual
            return None
        parts = header.decode(errors="replace").split(" ")
        return payload if len(parts) == 2 and parts[1] == _digest(key) else None


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


_SLOT_NAME = re.compile(r"[0-9a-f]{32}")


def _sequence(slot: Path) -> int:
    """A slot's place in the order of saving; 0 for one that cannot be read (pruned first)."""
    try:
        with open(slot, "rb") as f:
            return int(f.readline(64).split(b" ")[0])
    except (OSError, ValueError):
        return 0


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
