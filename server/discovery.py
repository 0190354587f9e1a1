"""Finding the hospitals: which hospital each connected node is, and what each reads.

At the start of a run the coordinator asks every connected node who it is (bounded
wait); each hospital answers with its name and its data definition (the task and
features it reads, ``common.definition``). The run then reads data as its hospitals do:
their definition replaces the config's task and features when they differ (a hospital
refuses any other), and a hospital whose definition differs from the others' (the
largest group that agrees) is left out with the key that differs. Before each round of
a deployment, nodes that connected since are asked too: a hospital back on a new node
takes its old place.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from common import messages as M
from common.config import ConfigError, ExperimentConfig
from common.definition import DataDefinition
from common.ledger import Ledger
from common.messages import NodeMode, ReplyState

from .exchange import exchange
from .records import HospitalState, HospitalStatus

log = logging.getLogger("fedgru.server")


@dataclass
class HospitalView:
    """What the coordinator knows about one hospital (no patient data)."""

    name: str
    node_id: int
    ledger: Ledger | None = None  # the hospital's ledger as it last reported it
    epsilon: float = 0.0  # recomputed here from the ledger
    budget: float = math.inf
    rounds_trained: int = 0
    state: HospitalState = HospitalState.ACTIVE
    reason: str = ""
    noise_multiplier: float | None = None  # the DP-SGD noise it accepted at the preflight (None: no preflight yet)

    @property
    def active(self) -> bool:
        return self.state == HospitalState.ACTIVE

    def status(self) -> HospitalStatus:
        return HospitalStatus(
            self.name, self.state, self.reason, self.rounds_trained,
            self.budget if math.isfinite(self.budget) else None, self.ledger.to_json() if self.ledger else "",
            self.noise_multiplier,
        )

    def restore(self, saved: HospitalStatus, accountant: str) -> None:
        self.state, self.reason, self.rounds_trained = saved.state, saved.reason, saved.rounds_trained
        self.budget = saved.budget if saved.budget is not None else math.inf
        self.noise_multiplier = saved.noise_multiplier
        if saved.ledger_json:
            self.ledger = Ledger.from_json(saved.ledger_json, source=f"the checkpointed ledger of {self.name}")
            self.epsilon = self.ledger.epsilon(accountant)


def who_are_you(run_id: str) -> RecordDict:
    """The question every node is asked first (a hospital answers from its own folder)."""
    return RecordDict({M.CONFIG: ConfigRecord({M.RUN_ID: run_id, M.SERVER_ROUND: 0})})


@dataclass
class Roster:
    """The hospitals of a run: node id -> view, what each reads, and the nodes that are not hospitals."""

    hospitals: dict[int, HospitalView] = field(default_factory=dict)
    definitions: dict[str, DataDefinition] = field(default_factory=dict)  # hospital name -> what it reads
    modes: set[str] = field(default_factory=set)
    not_hospitals: set[int] = field(default_factory=set)
    errors: dict[int, str] = field(default_factory=dict)  # node -> why it could not say who it is (its last error)

    @property
    def simulated(self) -> bool:
        return bool(self.hospitals) and self.modes == {NodeMode.SIMULATION.value}

    def identify(self, grid: Grid, node_ids: list[int], query: Callable[[], RecordDict], timeout: float) -> set[int]:
        """Ask nodes which hospital they are; map new ones, remap a hospital that came
        back on another node. Returns the nodes that answered."""
        answered: set[int] = set()
        messages = [Message(query(), dst_node_id=nid, message_type=MessageType.QUERY) for nid in node_ids]
        for nid, reply in exchange(grid, messages, timeout):
            if reply.has_error():
                log.warning("node %s could not say which hospital it is: %s", nid, reply.error.reason)
                self.errors[nid] = str(reply.error.reason)
                continue
            answered.add(nid)
            status = reply.content[M.STATUS]
            name = str(status.get(M.HOSPITAL, ""))
            if str(status.get(M.STATE)) != ReplyState.READY or not name:
                self.not_hospitals.add(nid)
                continue
            definition = self._definition(status, name)
            self.modes.add(str(status.get(M.MODE, "")))
            previous = next((old for old, h in self.hospitals.items() if h.name == name), None)
            if previous is None:
                self.hospitals[nid] = HospitalView(name, nid)
            elif previous != nid:
                if previous in set(grid.get_node_ids()):
                    log.warning("two nodes claim hospital %r; keeping the first", name)
                    continue
                view = self.hospitals.pop(previous)
                view.node_id = nid
                self.hospitals[nid] = view
                log.info("%s rejoined (node %s)", name, nid)
            if definition is not None:
                self.definitions[name] = definition
        return answered

    @staticmethod
    def _definition(status, name: str) -> DataDefinition | None:
        text = status.get(M.DEFINITION)
        if text is None:
            return None  # a hospital app from before definitions: it reads as the config says
        try:
            return DataDefinition.from_json(str(text), f"the data definition of {name}")
        except ConfigError as exc:
            log.warning("%s: its data definition cannot be read (%s); it is left out", name, exc)
            return None

    def discover(self, grid: Grid, query: Callable[[], RecordDict], wait_s: float, min_hospitals: int) -> None:
        """Ask every connected node which hospital it is. Stops when all connected nodes
        have answered and at least ``min_hospitals`` are hospitals, or after ``wait_s``."""
        deadline = time.monotonic() + wait_s
        answered: set[int] = set()
        while True:
            pending = [n for n in grid.get_node_ids() if n not in answered]
            answered |= self.identify(grid, pending, query, timeout=max(1.0, deadline - time.monotonic()))
            everyone = set(grid.get_node_ids()) <= answered
            if (everyone and len(self.hospitals) >= min_hospitals) or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        names = sorted(h.name for h in self.hospitals.values())
        shown = ", ".join(names[:10]) + (f", ... ({len(names)} in all)" if len(names) > 10 else "")
        log.info("hospitals: %s", shown or "none")
        if len(self.hospitals) < min_hospitals:
            raise RuntimeError(
                f"only {len(self.hospitals)} hospital(s) answered within {wait_s:.0f} s; strategy.min_hospitals is {min_hospitals}"
            )

    def rediscover(self, grid: Grid, query: Callable[[], RecordDict], timeout: float) -> None:
        """Identify nodes that connected since (a hospital back from a crash, or a late
        one). Quick when nothing is new."""
        new = [n for n in grid.get_node_ids() if n not in self.hospitals and n not in self.not_hospitals]
        if new:
            self.identify(grid, new, query, timeout)

    def agreed_config(self, cfg: ExperimentConfig, resumed: bool = False) -> ExperimentConfig:
        """``cfg`` reading data as its hospitals do. The largest group of hospitals that
        read alike sets the definition (ties: the one the config already reads, then the
        first by name); a hospital outside it cannot train this run's model and is left
        out, named with the first key that differs."""
        if not self.definitions:
            return cfg
        groups: dict[str, list[str]] = {}
        for name, definition in sorted(self.definitions.items()):
            groups.setdefault(definition.reading_json(), []).append(name)  # presentation keys do not split them
        own = DataDefinition.of(cfg).reading_json()
        chosen_json = min(groups, key=lambda j: (-len(groups[j]), j != own, groups[j][0]))
        chosen = self.definitions[groups[chosen_json][0]]
        for name, definition in self.definitions.items():
            if name not in groups[chosen_json]:
                key = definition.difference(chosen.apply_to(cfg)) or "task"
                view = next(v for v in self.hospitals.values() if v.name == name)
                view.state, view.reason = HospitalState.REFUSED, f"reads its data otherwise than the others ({key})"
                log.error("%s is left out: it reads its data otherwise than %s (%s)", name,
                          ", ".join(groups[chosen_json]), key)
        differs = chosen.difference(cfg)
        if differs is None:
            return cfg
        if resumed:
            raise RuntimeError(f"the hospitals now read their data otherwise than when this run started ({differs}); "
                               "start a new run")
        log.info("the hospitals read their data by their own definition, which differs from the config at %s: "
                 "the run reads as they do", differs)
        return chosen.apply_to(cfg)
