"""One training round under secure aggregation (``privacy.aggregation: secure``).

The coordinator runs the four stages of ``common.secagg`` with the round's active
hospitals and learns one thing: the sum over the hospitals still in the round of their
clipped, scaled, rounded gradient sums plus their Skellam noise (``client.secure``).
It never holds one hospital's unmasked vector: each masked vector is added into the
running sum as it is read and dropped. From the sum it takes one step of gradient
descent (``training.lr``, with ``training.momentum`` as heavy-ball momentum kept here:
post-processing of a DP release, free of privacy cost).

What it can still check without seeing an update (issue 23's item 4): each masked vector
is a vector of the model's trainable size in Z_{2^32}; the sum, decoded, must be finite
and no longer than every sampled patient's clipped gradient pointing one way plus eight
standard deviations of the noise (:func:`plausible`). A hostile hospital can still add
any vector within that bound: secure aggregation without zero-knowledge range proofs
cannot stop it (Bell et al. 2020 assume semi-honest hospitals for correctness); its
reach is the same as a hospital that trains on poisoned data, bounded per round by the
check, and spread over the whole sum.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from common import messages as M
from common import secagg as S
from common.messages import ReplyState, Split
from common.model import trainable_layout
from common.training import training_for_round

from .records import Dropped, HospitalState, Stopped, TrainPhase, TrainReport
from .secagg import (
    UnmaskFailed,
    default_threshold,
    key_lines,
    parse_revealed,
    parse_round_keys,
    policy_least,
    signature_problem,
    unmasked_sum,
)
from .secure_evaluation import secure_evaluate
from .validation import Evaluations

log = logging.getLogger("fedgru.server")

UNITS_PER_CLIP = 2 ** 16  # integers per clipping norm when the federation is small enough
WRAP_ROOM = 2 ** 29  # the sum of every patient's largest coordinate stays below this (2^31: wrap-around)


def scale_for(clip: float, declared_total: int) -> float:
    """Integers per unit of gradient: fine enough that rounding costs little (2^16 per
    clipping norm), coarse enough that the sum of every declared patient's clipped
    gradient cannot wrap around the modulus."""
    units = max(16, min(UNITS_PER_CLIP, WRAP_ROOM // max(1, declared_total)))
    return units / clip


def plausible(gradient_sum: np.ndarray, batch: float, clip: float, variance: float, hospitals: int,
              scale: float) -> bool:
    """The decoded sum could have come from honest hospitals: finite, and no longer than
    ``batch`` clipped gradients in one direction plus eight standard deviations of the
    noise (in gradient units)."""
    if not np.isfinite(gradient_sum).all():
        return False
    noise = 8 * math.sqrt(gradient_sum.size * hospitals * variance) / scale
    return float(np.linalg.norm(gradient_sum)) <= 1.05 * batch * clip + noise


@dataclass
class Session:
    """What one secure aggregation session gave the coordinator."""

    ring: np.ndarray  # the survivors' vectors summed, in Z_{2^32}
    survivors: list[int]
    collected: dict[int, Message]  # the survivors' collect replies (their vectors read and dropped)
    unmasked: dict[int, Message]
    variance: float | list[float]  # the noise every hospital was asked to add (per part of an evaluation vector)
    next_threshold: int = 0  # the next round's threshold, when its setup went with the unmask


class SecureRounds:
    """The coordinator's secure aggregation: the round (:meth:`round`) and the state the
    step keeps across rounds (momentum)."""

    def __init__(self, coordinator):
        self.co = coordinator
        self.velocity: np.ndarray | None = None
        # the next round's setup, answered with this round's unmask: (round, participants, threshold, keys, required)
        self.early: tuple[int, list[int], int, dict, dict] | None = None
        self._told: set[tuple[int, int]] = set()  # (participants, threshold) raised by policies, logged once
        self._left_out: set[tuple] = set()  # what session_nodes warned of (left out, participants, threshold)

    def _policies(self, nodes: list[int]) -> dict[str, tuple[int, int]]:
        """Hospital name -> (min_honest, max_colluding) from the accepted preflight answers of ``nodes``."""
        names = {self.co.hospitals[nid].name for nid in nodes if nid in self.co.hospitals}
        return {a.hospital: (a.min_honest, a.max_colluding) for a in self.co.recorder.preflight
                if a.accepted and a.hospital in names}

    def session_nodes(self) -> list[int]:
        """The active hospitals a session asks. With ``privacy.secure_min_dropouts`` (the
        dropouts every round should survive) and a threshold that leaves fewer: the
        hospitals whose policy set it above the run's own rule (a majority, at least
        ``privacy.min_honest``) are left out, strictest first, as long as that makes a
        round survive more dropouts than with them (asked, they could only hold everyone
        to their threshold or refuse, and a refusal is a dropout already). A hospital whose
        policy raises nothing is never left out, and the run's own rule is not the
        policies' fault: where it leaves fewer dropouts, a warning says so. Each is logged
        once; a hospital left out is told nothing and charged nothing, and the report gives
        the reason."""
        cfg = self.co.cfg
        nodes = sorted(nid for nid, h in self.co.hospitals.items() if h.active)
        wanted = cfg.privacy.secure_min_dropouts
        if cfg.privacy.secure_threshold or not wanted:
            return nodes
        left_out: list[str] = []
        while True:
            policies = self._policies(nodes)
            n, t = len(nodes), default_threshold(cfg, len(nodes), policies.values())
            if n - t >= wanted:
                break
            base = default_threshold(cfg, n)
            # the hospitals whose policy sets this threshold above the run's own rule (the strictest)
            raising = {name for name, policy in policies.items() if base < policy_least(n, policy) == t}
            rest = [nid for nid in nodes if self.co.hospitals[nid].name not in raising]
            rest_t = default_threshold(cfg, len(rest), [p for name, p in policies.items() if name not in raising])
            if not raising or len(rest) - rest_t <= n - t:
                break  # leaving them out would not make a round survive more dropouts
            left_out += sorted(raising)
            nodes = rest
        why = (f"left out of secure aggregation: its policy's least threshold would leave a round fewer than "
               f"privacy.secure_min_dropouts ({wanted}) dropouts")
        for nid, view in self.co.hospitals.items():
            if view.name in left_out and not view.reason:
                view.reason = why
        t = default_threshold(cfg, len(nodes), self._policies(nodes).values())
        told = (tuple(left_out), len(nodes), t)
        if told not in self._left_out:
            self._left_out.add(told)
            if left_out:
                log.warning("secure aggregation: left out %s: its policy's least threshold would leave a round fewer "
                            "than privacy.secure_min_dropouts (%d) dropouts (nothing is asked of it or charged to it)",
                            ", ".join(left_out), wanted)
            if len(nodes) - t < wanted:
                log.warning("secure aggregation: threshold %d of %d: a round survives %d dropout(s), fewer than "
                            "privacy.secure_min_dropouts (%d); %s", t, len(nodes), len(nodes) - t, wanted,
                            "the run's own rule (a majority, at least privacy.min_honest) allows no more at this size"
                            if t == default_threshold(cfg, len(nodes)) else
                            "leaving out the hospitals whose policy raised it would not survive more")
        return nodes

    def threshold(self, nodes: list[int]) -> int:
        """The reconstruction threshold for a session of ``nodes``: the run's rule, raised to
        the least the policies those hospitals stated in their preflight answers accept."""
        policies = self._policies(nodes)
        threshold = default_threshold(self.co.cfg, len(nodes), policies.values())
        if threshold > default_threshold(self.co.cfg, len(nodes)) and (len(nodes), threshold) not in self._told:
            self._told.add((len(nodes), threshold))
            setters = sorted(n for n, policy in policies.items() if default_threshold(self.co.cfg, len(nodes), [policy])
                             == threshold)  # whose policy set it: a round then survives only n - t dropouts
            log.info("secure aggregation: threshold %d of %d, the least the policy of %s accepts (min_honest, "
                     "max_colluding in the preflight answer); a round survives %d dropout(s)", threshold, len(nodes),
                     ", ".join(setters), len(nodes) - threshold)
        return threshold

    # -- messaging -----------------------------------------------------------------
    def _config(self, server_round: int, stage: S.Stage, scale: float, base: dict, **fields) -> ConfigRecord:
        return ConfigRecord({M.EXPERIMENT_JSON: self.co.cfg_json, M.RUN_ID: self.co.run_id, M.SERVER_ROUND: server_round,
                             M.EVALUATE: "", S.STAGE: stage.value, S.SCALE: float(scale), **base, **fields})

    def _ask(self, server_round: int, stage: S.Stage, scale: float, per_node: dict[int, dict],
             model: ArrayRecord | None = None, base: dict | None = None, message_type: str = MessageType.TRAIN,
             what: str = "") -> dict[int, Message]:
        """Send one stage to each node with its fields; the usable replies by node."""
        messages = []
        for nid, fields in per_node.items():
            content = {M.CONFIG: self._config(server_round, stage, scale, base or {}, **fields)}
            if model is not None:
                content[M.ARRAYS] = model
            messages.append(Message(RecordDict(content), dst_node_id=nid, message_type=message_type))
        out = {}
        for nid, reply in self.co._exchange(messages):
            accepted = self.co._accept(nid, reply, f"{what or f'round {server_round}'} (secure aggregation, "
                                       f"{stage.value})", ledger_optional=stage != S.Stage.COLLECT)
            if accepted is None:
                continue
            view, ledger = accepted
            if str(reply.content[M.STATUS].get(M.STATE, "")) == ReplyState.BUDGET_EXHAUSTED:
                view.state = HospitalState.BUDGET_EXHAUSTED
                view.budget = float(reply.content[M.STATUS].get(M.BUDGET, view.budget))
                log.info("round %d: %s stops training: the rest of the run would pass its training budget (epsilon "
                         "%.3f spent of %.3f)", server_round, view.name, view.epsilon, view.budget)
                self.co._phase.stopped.append(Stopped(view.name, view.state, ""))
                continue
            out[nid] = reply
        for nid in per_node:
            if nid not in out and not any(d.node_id == nid for d in self.co._phase.dropped) and \
                    self.co._view(nid).active:
                self.co._phase.dropped.append(Dropped(self.co._view(nid).name, nid,
                                                      f"no usable reply to '{stage.value}'"))
        return out

    def _keys(self, server_round: int, replies: dict[int, Message], field: str = S.REQUIRED_VARIANCE,
              parts: int = 0, session: str = S.TRAINING_SESSION) -> tuple[dict, dict]:
        """Each hospital's public keys and the least noise variance it accepts (``parts``
        > 0: a list of that many, one per part of an evaluation vector), from its setup
        answer for ``session`` (``common.secagg.keys_to_sign``); a malformed answer is dropped."""
        keys, required, signed = {}, {}, set()
        for nid, reply in sorted(replies.items()):
            try:
                own = parse_round_keys(str(reply.content[M.STATUS][S.MY_KEYS]))
                raw = reply.content[M.STATUS][field]
                variance = [float(v) for v in raw] if parts else float(raw)
                values = variance if parts else [variance]
                if (parts and len(values) != parts) or not all(math.isfinite(v) and v > 0 for v in values):
                    raise ValueError("variance")
            except (KeyError, TypeError, ValueError):
                self._drop(server_round, nid, "its secure aggregation keys or required noise are malformed")
                continue
            if self.co.hospital_keys:  # admitted hospitals' signatures only: one bad one leaves only its sender out
                why = signature_problem(self.co.hospital_keys, self.co.run_id, server_round, session, nid, own,
                                        self.co._view(nid).name, signed)
                if why:
                    self._drop(server_round, nid, why)
                    continue
                signed.add(own[2])
            keys[nid], required[nid] = own, variance
        return keys, required

    def _drop(self, server_round: int, nid: int, why: str) -> None:
        view = self.co._view(nid)
        log.warning("round %d: dropped the reply of %s (node %s): %s", server_round, view.name, nid, why)
        self.co._phase.dropped.append(Dropped(view.name, nid, why))

    def _session(self, server_round: int, nodes: list[int], least: int, threshold: int, size: int, scale: float,
                 keys: dict, required: dict, noise_field: str, read: Callable[[int, Message], None],
                 base: dict | None = None, message_type: str = MessageType.TRAIN, following: dict | None = None,
                 what: str = "", masked_key: str = S.MASKED) -> Session | str:
        """Stages 2 to 4 (the setup's answers are ``keys`` and ``required``): the sum of the
        masked vectors, unmasked, or why there is none. ``read`` checks each collected
        reply beyond its vector (raising ValueError drops it); ``following``: the next
        round's setup, sent with the unmask."""
        co = self.co
        ask = dict(base=base, message_type=message_type, what=what)
        # every hospital adds what the most demanding one needs (per part of an evaluation vector)
        values = list(required.values())
        agreed = [max(v) for v in zip(*values)] if isinstance(values[0], list) else max(values)
        # 2. share keys
        shared = self._ask(server_round, S.Stage.SHARE_KEYS, scale,
                           {nid: {S.PUBLIC_KEYS: key_lines(keys), noise_field: agreed} for nid in keys}, **ask)
        outboxes: dict[int, dict[int, str]] = {}
        for nid, reply in shared.items():
            try:
                rows = [line.split(":", 1) for line in str(reply.content[M.STATUS][S.SHARES_OUT]).splitlines()]
                outboxes[nid] = {int(dst): text for dst, text in rows}
            except (KeyError, ValueError):
                self._drop(server_round, nid, "its encrypted shares are malformed")
        if len(outboxes) < least:
            return f"{len(outboxes)} hospitals shared keys; secure aggregation needs {least}"
        if set(outboxes) != set(keys):
            # every hospital masks only with all that got the keys (client.secagg.receive)
            missing = ", ".join(co._view(nid).name for nid in sorted(set(keys) - set(outboxes)))
            return (f"{missing} got the round's keys but sent no shares, and every hospital masks only with all "
                    "that got them; the next setup leaves out whoever does not answer it")
        # 3. collect the masked vectors, adding each into the sum as it is read
        inboxes = {u: {S.CIPHERTEXTS: "\n".join(f"{src}:{box[u]}" for src, box in sorted(outboxes.items())
                                                 if src != u and u in box)} for u in outboxes}
        collected = self._ask(server_round, S.Stage.COLLECT, scale, inboxes, model=co.arrays, **ask)
        masked_sum = np.zeros(size, dtype=np.int64)
        survivors, kept = [], {}
        for nid, reply in collected.items():
            try:
                vector = reply.content[masked_key]["vector"].numpy()
                if vector.shape != (size,) or vector.dtype != np.int64 or vector.min() < 0 or vector.max() >= S.MODULUS:
                    raise ValueError("vector")
                read(nid, reply)
            except Exception:  # noqa: BLE001 - a malformed array raises what numpy's reader raises (EOFError, BadZipFile, ...)
                self._drop(server_round, nid, f"its masked vector is not {size} values in Z_2^32 with its counts")
                continue
            masked_sum = S.to_ring(masked_sum + vector)
            del vector
            survivors.append(nid)
            kept[nid] = reply
        survivors.sort()
        if len(survivors) < least:
            return f"{len(survivors)} masked vectors arrived; secure aggregation needs {least}"
        # 4. unmask (with the next round's setup, for this round's survivors)
        next_threshold = 0
        if following:
            next_threshold = self.threshold(survivors)
            following = {**following, S.PARTICIPANTS: survivors, S.THRESHOLD: next_threshold}
        unmasked = self._ask(server_round, S.Stage.UNMASK, scale,
                             {nid: {S.SURVIVORS: survivors, **(following or {})} for nid in survivors}, **ask)
        revealed = []
        for nid, reply in unmasked.items():
            try:
                revealed += parse_revealed(str(reply.content[M.STATUS][S.REVEALED]))
            except (KeyError, ValueError):
                self._drop(server_round, nid, "its revealed shares are malformed")
        public = {nid: (S.unb64(own[0]), S.unb64(own[1])) for nid, own in keys.items()}
        try:
            ring = unmasked_sum(masked_sum, survivors, sorted(outboxes), revealed, public, threshold, server_round)
        except (UnmaskFailed, ValueError) as exc:
            return f"the sum could not be unmasked ({exc})"
        return Session(ring, survivors, kept, unmasked, agreed, next_threshold)

    # -- the round -------------------------------------------------------------------
    def round(self, server_round: int, scale: float) -> TrainPhase:
        co, cfg = self.co, self.co.cfg
        phase = co._phase = TrainPhase()
        nodes = self.session_nodes()
        threshold = self.threshold(nodes)
        least = max(threshold, cfg.strategy.min_hospitals)

        def skip(why: str) -> TrainPhase:
            log.warning("round %d skipped: %s", server_round, why)
            co._lines.flush()
            phase.skipped = True
            phase.hospitals.clear()
            return phase

        if len(nodes) < least:
            return skip(f"{len(nodes)} active hospitals; secure aggregation needs {least}")
        # the model after the previous round, validated only once some round has trained it
        if server_round in cfg.validation_rounds() and co.trained_rounds:
            phase.validation = self.evaluate(server_round, [Split.VAL], progress=True)  # its drops are this round's
            nodes = self.session_nodes()
            if len(nodes) < least:
                return skip(f"{len(nodes)} active hospitals; secure aggregation needs {least}")
        # 1. setup: fresh keys, and the least noise each hospital accepts (answered with the
        # previous round's unmask when the same hospitals take part)
        early, self.early = self.early, None
        if early is not None and early[0] == server_round and early[1] == nodes and len(early[3]) == len(nodes):
            _, _, threshold, keys, required = early
        else:
            setup = self._ask(server_round, S.Stage.SETUP, scale,
                              {nid: {S.PARTICIPANTS: nodes, S.THRESHOLD: threshold} for nid in nodes})
            keys, required = self._keys(server_round, setup)
        if len(keys) < least:
            return skip(f"{len(keys)} hospitals sent keys; secure aggregation needs {least}")
        layout = trainable_layout(cfg)
        size = sum(math.prod(shape) for _, shape in layout)
        batch = 0.0
        rate = cfg.training.sample_rate or 1.0

        def read(nid: int, reply: Message) -> None:
            nonlocal batch
            metrics = reply.content[M.METRICS]
            n = int(metrics[M.NUM_EXAMPLES])
            if not 0 < n <= cfg.strategy.max_examples:
                raise ValueError("count")
            batch += rate * n
            view = co._view(nid)
            phase.hospitals[view.name] = TrainReport(num_examples=n, steps=1, epsilon=float(metrics[M.EPSILON]),
                                                     delta=float(metrics[M.DELTA]), budget=float(metrics[M.BUDGET]))
            view.budget = float(metrics[M.BUDGET])

        following = {}
        if server_round < cfg.run.rounds:
            # the next round's setup goes to this round's survivors, with the unmask
            following = {S.NEXT_ROUND: server_round + 1}
        result = self._session(server_round, nodes, least, threshold, size, scale, keys, required, S.NOISE_VARIANCE,
                               read, following=following or None)
        if isinstance(result, str):
            return skip(result)
        if following:
            answered = {nid: r for nid, r in result.unmasked.items() if S.MY_KEYS in r.content[M.STATUS]}
            if len(answered) == len(result.survivors):
                keys_next, required_next = self._keys(server_round + 1, answered)
                self.early = (server_round + 1, result.survivors, result.next_threshold, keys_next, required_next)
        gradient_sum = S.decode(result.ring, scale)
        if not plausible(gradient_sum, batch, cfg.privacy.max_grad_norm, result.variance, len(result.survivors), scale):
            return skip("the unmasked sum is longer than honest hospitals' clipped gradients and noise can make")
        self._step(server_round, layout, gradient_sum / max(batch, 1.0))
        for nid in result.survivors:
            co._view(nid).rounds_trained += 1
        co.trained_rounds += 1
        co._lines.flush()
        return phase

    MOMENTUM_STATE = "secure-momentum"  # the checkpoint's strategy state: the heavy-ball velocity

    def state_dict(self) -> dict:
        return {self.MOMENTUM_STATE: {"velocity": self.velocity}} if self.velocity is not None else {}

    def load_state_dict(self, state: dict) -> None:
        """Take the velocity out of a checkpoint's strategy state (a resumed run keeps its momentum)."""
        saved = state.pop(self.MOMENTUM_STATE, None)
        if saved is not None:
            self.velocity = np.asarray(saved["velocity"], dtype=np.float64)

    def evaluate(self, server_round: int, splits: list[Split], progress: bool = False,
                 threshold: float | None = None, hour_thresholds: list[float] | None = None) -> dict[str, Evaluations]:
        """A secure evaluation (``server.secure_evaluation``)."""
        return secure_evaluate(self, server_round, splits, progress, threshold, hour_thresholds)

    def _step(self, server_round: int, layout: list[tuple[str, tuple[int, ...]]], mean_gradient: np.ndarray) -> None:
        training = training_for_round(self.co.cfg, server_round)
        if self.velocity is None or self.velocity.shape != mean_gradient.shape:
            self.velocity = np.zeros_like(mean_gradient)
        self.velocity = training.momentum * self.velocity + mean_gradient
        arrays = {k: v.numpy() for k, v in self.co.arrays.items()}
        offset = 0
        for name, shape in layout:
            count = math.prod(shape)
            step = self.velocity[offset:offset + count].reshape(shape)
            arrays[name] = (arrays[name] - training.lr * step).astype(arrays[name].dtype)
            offset += count
        self.co.arrays = ArrayRecord({k: Array(v) for k, v in arrays.items()})
