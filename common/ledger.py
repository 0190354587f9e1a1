"""A hospital's privacy ledger: every release it made, and what it has cost.

Each time a value leaves a hospital, one :class:`LedgerEntry` records it: the run and
round, the mechanism, whose patients it is about (the training, validation or test
split), the noise when there is some, and a plain statement of what was released.
Entries of one group of patients with a noisy mechanism compose into that group's
epsilon (all of them, across every round and every run recorded in the ledger);
entries of mechanism ``none`` are releases outside the DP guarantee, listed so that
nothing leaves unrecorded.

The ledger belongs to the hospital, not to one export of its data: a new export of the
same patients (more stays, corrected files) continues it, and each entry names the
export it read (``data``, a label keyed with the hospital's secret). Every epsilon in it is stated at the one
``delta`` fixed when it was created, so the epsilons of different runs compose.

On the hospital's disk the ledger is sealed with an HMAC keyed by a secret that never
leaves the hospital's folder (:meth:`Ledger.seal`), so an edit by anyone without the
secret is detected. Copies sent to the coordinator carry the same fields; the
coordinator cannot check the seal (it has no secret) and checks every value instead
(:meth:`Ledger.from_plain` with ``key=None``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from .laplace import laplace_rdp
from .messages import Item, Mechanism, Split
from .privacy import NoisyRelease, epsilon, epsilon_of_rdp, rdp_of
from .skellam import SkellamSensitivity, rdp_vector

LEDGER_FORMAT = "fedgru-ledger/2"
NOISY = (Mechanism.DP_SGD, Mechanism.GAUSSIAN, Mechanism.LAPLACE, Mechanism.SKELLAM)
# mechanisms only the RDP accountant analyses (Opacus's PRV accountant knows the Gaussian only)
RDP_ONLY = (Mechanism.LAPLACE, Mechanism.SKELLAM)


class LedgerError(RuntimeError):
    """The ledger is missing, corrupt, altered or malformed: nothing may be released."""


@dataclass
class LedgerEntry:
    run_id: str
    round: int
    mechanism: Mechanism
    released: str  # what left the hospital, in words
    split: Split = Split.TRAIN  # whose patients it is about
    item: Item = Item.WEIGHTS  # what it released, for machines
    noise_multiplier: float = 0.0  # noise std / sensitivity (noisy mechanisms; Laplace: its sd, sensitivity 1)
    sample_rate: float = 0.0  # Poisson rate (DP-SGD); 1 for a release about everyone in the split
    steps: int = 0  # Gaussian releases made (DP-SGD steps; 1 for a histogram)
    max_grad_norm: float = 0.0  # the sensitivity the noise was scaled to (DP-SGD: clipping norm)
    examples: int = 0  # patients the release is about (split size)
    # Skellam (secure aggregation) only: max_grad_norm is then the L2 sensitivity in integer
    # units, this its L1 sensitivity, noise_multiplier sqrt(counted variance) / L2 with the
    # noise of the min_honest hospitals it counts on, and this the same for its own noise alone
    l1_sensitivity: float = 0.0
    alone_noise_multiplier: float = 0.0
    data: str = ""  # the hospital's keyed label of the data export the release read
    time: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    def rdp(self, alone: bool = False) -> np.ndarray:
        """This release's Renyi DP at fedgru's orders (common.privacy.RDP_ORDERS); ``alone``:
        a Skellam share's, counting only this hospital's own noise."""
        if self.mechanism == Mechanism.SKELLAM:
            sigma = self.alone_noise_multiplier if alone else self.noise_multiplier
            sens = SkellamSensitivity(self.max_grad_norm, self.l1_sensitivity)
            return rdp_vector(self.sample_rate, (sigma * sens.l2) ** 2, sens, self.steps)
        if self.mechanism == Mechanism.LAPLACE:
            return laplace_rdp(self.noise_multiplier, self.steps)
        return rdp_of(self.sample_rate, self.noise_multiplier, self.steps)

    def as_release(self) -> NoisyRelease:
        return NoisyRelease(self.round, self.noise_multiplier, self.sample_rate, self.steps, self.max_grad_norm, self.run_id)

    def check(self, where: str) -> None:
        """Every value sane: a noisy entry must carry noise that an accountant can use."""
        if not isinstance(self.round, int) or not isinstance(self.steps, int) or not isinstance(self.examples, int):
            raise LedgerError(f"{where}: round, steps and examples must be whole numbers")
        numbers = (self.noise_multiplier, self.sample_rate, self.max_grad_norm, self.l1_sensitivity,
                   self.alone_noise_multiplier)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in numbers):
            raise LedgerError(f"{where}: noise multiplier, sample rate and norm must be finite numbers")
        if self.mechanism in NOISY:
            if self.noise_multiplier <= 0 or not 0 < self.sample_rate <= 1 or self.steps < 1 or self.examples < 1:
                raise LedgerError(
                    f"{where}: a {self.mechanism.value} release needs noise multiplier > 0, sample rate in (0, 1], "
                    "at least one step and one patient"
                )
        if self.mechanism == Mechanism.LAPLACE and (self.sample_rate != 1 or self.max_grad_norm != 1):
            raise LedgerError(f"{where}: a laplace release is a count of everyone in its split (sample rate 1, "
                              "sensitivity 1): its accounting has neither subsampling nor another sensitivity")
        if self.mechanism == Mechanism.SKELLAM and not (
                0 < self.alone_noise_multiplier <= self.noise_multiplier and self.max_grad_norm >= 1
                and self.l1_sensitivity >= self.max_grad_norm):
            raise LedgerError(f"{where}: a skellam release needs its own noise (at most the counted noise), an L2 "
                              "sensitivity of at least 1 and an L1 sensitivity at least the L2")
        if self.round < 0 or self.steps < 0 or self.examples < 0:
            raise LedgerError(f"{where}: counts must not be negative")


@dataclass
class Ledger:
    hospital: str
    delta: float  # the delta every epsilon in this ledger is stated at
    accountant: str = "rdp"  # the accountant that drives budget decisions
    entries: list[LedgerEntry] = field(default_factory=list)
    # Each group's composed RDP (a vector over orders), summed once and then kept up to
    # date by record(): an RDP budget check costs the same however long the ledger is.
    # Keyed (group, alone): ``alone`` counts secure aggregation's releases with this
    # hospital's own noise only (the same vector when it made none).
    _rdp: dict[tuple[Split, bool], np.ndarray] = field(default_factory=dict, init=False, repr=False, compare=False)
    # whether a group holds a release only RDP analyses (Skellam, Laplace; kept by record() too)
    _rdp_only: dict[Split, bool] = field(default_factory=dict, init=False, repr=False, compare=False)

    # -- accounting ------------------------------------------------------------
    def noisy(self, split: Split = Split.TRAIN) -> list[LedgerEntry]:
        return [e for e in self.entries if e.mechanism in NOISY and e.split == split]

    def history(self, split: Split = Split.TRAIN) -> list[NoisyRelease]:
        return [e.as_release() for e in self.noisy(split)]

    def _rdp_total(self, split: Split, alone: bool = False) -> np.ndarray:
        if (split, alone) not in self._rdp:
            total = np.zeros(len(rdp_of(1.0, 1.0, 0)))
            for e in self.noisy(split):
                total = total + e.rdp(alone)
            self._rdp[(split, alone)] = total
        return self._rdp[(split, alone)]

    def _uses_rdp(self, split: Split, accountant: str | None, planned: list[LedgerEntry] = ()) -> bool:
        """RDP when asked, and whenever a Skellam or Laplace release is among the group's
        (Opacus's PRV accountant analyses the Gaussian only; RDP's epsilon is an upper bound
        on PRV's)."""
        if (accountant or self.accountant) == "rdp" or any(e.mechanism in RDP_ONLY for e in planned):
            return True
        if split not in self._rdp_only:
            self._rdp_only[split] = any(e.mechanism in RDP_ONLY for e in self.noisy(split))
        return self._rdp_only[split]

    def epsilon(self, split: Split = Split.TRAIN, accountant: str | None = None) -> float:
        """Epsilon of everything ever released about one group of patients."""
        if self._uses_rdp(split, accountant):
            return epsilon_of_rdp(self._rdp_total(split), self.delta)
        return epsilon(self.history(split), self.delta, accountant or self.accountant)

    def epsilon_alone(self, split: Split = Split.TRAIN) -> float:
        """Epsilon of everything released about the group if every other hospital had
        colluded with the coordinator: secure aggregation's releases count only this
        hospital's own share of the noise. Equal to :meth:`epsilon` without secure releases."""
        return epsilon_of_rdp(self._rdp_total(split, alone=True), self.delta)

    def epsilon_with(self, planned: list[LedgerEntry], accountant: str | None = None, alone: bool = False) -> float:
        """Epsilon of ``planned``'s group if ``planned`` were released too (the budget check);
        ``alone`` as in :meth:`epsilon_alone`."""
        split = planned[0].split
        if alone or self._uses_rdp(split, accountant, planned):
            added = sum((e.rdp(alone) for e in planned if e.mechanism in NOISY), np.zeros_like(self._rdp_total(split)))
            return epsilon_of_rdp(self._rdp_total(split, alone) + added, self.delta)
        return epsilon(self.history(split) + [e.as_release() for e in planned], self.delta, accountant or self.accountant)

    def runs(self) -> list[str]:
        return sorted({e.run_id for e in self.entries})

    def releases_in_run(self, run_id: str, split: Split) -> int:
        """How many score histograms of ``split`` the run has had (a test release's
        per-group histograms and importance come with its one histogram)."""
        return self.items_in_run(run_id, split, Item.HISTOGRAM)

    def items_in_run(self, run_id: str, split: Split, item: Item) -> int:
        """How many releases of ``item`` about ``split``'s patients the run has had."""
        return sum(1 for e in self.noisy(split) if e.run_id == run_id and e.item == item)

    def record(self, entry: LedgerEntry) -> None:
        """Add a release; an entry that could not be read back (say, infinite noise) is
        refused here rather than sealed into a ledger every later read would reject."""
        entry.check(f"{self.hospital}'s new ledger entry")
        self.entries.append(entry)
        if entry.mechanism in RDP_ONLY:
            self._rdp_only[entry.split] = True
        if entry.mechanism in NOISY:
            for alone in (False, True):
                if (entry.split, alone) in self._rdp:
                    self._rdp[(entry.split, alone)] = self._rdp[(entry.split, alone)] + entry.rdp(alone)

    # -- serialisation ---------------------------------------------------------
    def body(self) -> dict:
        return {
            "format": LEDGER_FORMAT,
            "hospital": self.hospital,
            "delta": self.delta,
            "accountant": self.accountant,
            "entries": [{**asdict(e), "mechanism": e.mechanism.value, "split": e.split.value, "item": e.item.value}
                        for e in self.entries],
        }

    def seal(self, key: bytes) -> dict:
        """The body with an HMAC-SHA256 over it, keyed by the hospital's secret."""
        body = self.body()
        return {**body, "mac": _mac(key, body)}

    def to_json(self, key: bytes | None = None) -> str:
        """JSON for the hospital's disk (sealed, with ``key``), or unsealed."""
        return json.dumps(self.seal(key) if key is not None else self.body(), indent=1, sort_keys=True)

    def for_coordinator(self) -> str:
        """The copy a reply carries: every entry, without the export it read or when it was
        recorded (the hospital's own ledger keeps both). The export's label changes with
        every patient added or removed, and the times with how long the data took to
        train on; the rest is the message's settings, the policy and declared counts."""
        view = Ledger(self.hospital, self.delta, self.accountant,
                      [dataclasses.replace(e, data="", time="") for e in self.entries])
        return view.to_json()

    @classmethod
    def from_json(cls, text: str, source: str = "ledger", key: bytes | None = None) -> Ledger:
        try:
            data = json.loads(text)
        except ValueError:
            raise LedgerError(f"{source} is not valid JSON: the ledger is corrupt") from None
        return cls.from_plain(data, source, key)

    @classmethod
    def from_plain(cls, data: object, source: str = "ledger", key: bytes | None = None) -> Ledger:
        """Read and check a ledger. With ``key`` (the hospital) the seal must match; without
        (the coordinator) every field is checked, which is all anyone without the secret can do."""
        if not isinstance(data, dict) or data.get("format") != LEDGER_FORMAT:
            raise LedgerError(f"{source} is not a fedgru ledger ({LEDGER_FORMAT})")
        data = dict(data)
        mac = data.pop("mac", None)
        if key is not None and (not isinstance(mac, str) or not hmac.compare_digest(mac, _mac(key, data))):
            raise LedgerError(f"{source}: its seal does not match: the ledger was altered or damaged")
        try:
            ledger = cls(
                hospital=str(data["hospital"]),
                delta=float(data["delta"]),
                accountant=str(data["accountant"]),
                entries=[_entry(e) for e in data["entries"]],
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise LedgerError(f"{source}: malformed ledger ({exc.__class__.__name__})") from None
        if not 0 < ledger.delta < 1 or ledger.accountant not in ("rdp", "prv"):
            raise LedgerError(f"{source}: delta must be in (0, 1) and the accountant rdp or prv")
        for i, entry in enumerate(ledger.entries):
            entry.check(f"{source}, entry {i + 1}")
        return ledger


def _entry(raw: dict) -> LedgerEntry:
    if not isinstance(raw, dict):
        raise TypeError("entry")
    return LedgerEntry(**{**raw, "mechanism": Mechanism(raw["mechanism"]), "split": Split(raw["split"]),
                          "item": Item(raw["item"])})


def _mac(key: bytes, body: dict) -> str:
    return hmac.new(key, json.dumps(body, sort_keys=True).encode(), hashlib.sha256).hexdigest()
