"""A hospital's privacy ledger: every release it made, and what it has cost.

Each time a value leaves a hospital, one :class:`LedgerEntry` records it: the run and
round, the mechanism, the DP-SGD parameters when there are any, and a plain statement
of what was released. Entries of mechanism ``dp-sgd`` compose into the hospital's
epsilon (all of them, across every round and every run recorded in the ledger);
entries of mechanism ``none`` are releases outside the DP guarantee, listed so that
nothing leaves unrecorded.

The ledger is bound to one data set (``fingerprint``: sha256 of the files) and one
reporting ``delta`` chosen when it was created, so epsilons of different runs compose.
Its JSON form carries a checksum; a ledger whose checksum does not match is corrupt
and must not be trusted (``LedgerError``).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field

from .messages import Mechanism, Split
from .privacy import DPSGDEntry, epsilon

LEDGER_FORMAT = "fedgru-ledger/1"


class LedgerError(RuntimeError):
    """The ledger is missing, corrupt, or belongs to other data: do not train."""


@dataclass
class LedgerEntry:
    run_id: str
    round: int
    mechanism: Mechanism
    released: str  # what left the hospital, in words
    split: Split = Split.TRAIN  # whose patients it is about
    noise_multiplier: float = 0.0
    sample_rate: float = 0.0
    steps: int = 0
    max_grad_norm: float = 0.0
    time: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    def as_dp_sgd(self) -> DPSGDEntry:
        return DPSGDEntry(self.round, self.noise_multiplier, self.sample_rate, self.steps, self.max_grad_norm, self.run_id)


@dataclass
class Ledger:
    hospital: str
    fingerprint: str  # of the hospital's data files
    delta: float  # the delta every epsilon in this ledger is stated at
    accountant: str = "rdp"  # the accountant that drives budget decisions
    entries: list[LedgerEntry] = field(default_factory=list)

    # -- accounting ------------------------------------------------------------
    def dp_history(self) -> list[DPSGDEntry]:
        return [e.as_dp_sgd() for e in self.entries if e.mechanism == Mechanism.DP_SGD]

    def epsilon(self, accountant: str | None = None) -> float:
        return epsilon(self.dp_history(), self.delta, accountant or self.accountant)

    def epsilon_with(self, planned: DPSGDEntry, accountant: str | None = None) -> float:
        """Epsilon if ``planned`` were released too (for the budget check)."""
        return epsilon(self.dp_history() + [planned], self.delta, accountant or self.accountant)

    def runs(self) -> list[str]:
        return sorted({e.run_id for e in self.entries})

    def record(self, entry: LedgerEntry) -> None:
        self.entries.append(entry)

    # -- serialisation ---------------------------------------------------------
    def _body(self) -> dict:
        return {
            "hospital": self.hospital,
            "fingerprint": self.fingerprint,
            "delta": self.delta,
            "accountant": self.accountant,
            "entries": [{**asdict(e), "mechanism": e.mechanism.value, "split": e.split.value} for e in self.entries],
        }

    def to_plain(self) -> dict:
        body = self._body()
        checksum = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        return {"format": LEDGER_FORMAT, "checksum": checksum, **body}

    def to_json(self) -> str:
        return json.dumps(self.to_plain(), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "ledger") -> Ledger:
        try:
            data = json.loads(text)
        except ValueError:
            raise LedgerError(f"{source} is not valid JSON: the ledger is corrupt") from None
        if not isinstance(data, dict) or data.get("format") != LEDGER_FORMAT:
            raise LedgerError(f"{source} is not a fedgru ledger ({LEDGER_FORMAT})")
        checksum = data.pop("checksum", None)
        data.pop("format")
        if hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest() != checksum:
            raise LedgerError(f"{source}: checksum mismatch, the ledger was altered or damaged")
        try:
            return cls(
                hospital=str(data["hospital"]),
                fingerprint=str(data["fingerprint"]),
                delta=float(data["delta"]),
                accountant=str(data.get("accountant", "rdp")),
                entries=[LedgerEntry(**{**e, "mechanism": Mechanism(e["mechanism"]), "split": Split(e.get("split", "train"))}) for e in data["entries"]],
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise LedgerError(f"{source}: malformed ledger ({exc.__class__.__name__})") from None

