"""Fault drills for simulations: make chosen hospitals misbehave.

``fedgru simulate --fault medical=nan --fault surgical=crash`` wraps the real ClientApp
in a Flower mod that corrupts those hospitals' training replies, so the server's
validation and the round's robustness can be watched on a real run. ``KIND@N`` starts
the fault at training round N and leaves evaluations alone (``crash_mid_round@2``: a
second hospital lost from round 2 on, while the final test still hears from it).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MessageType, MetricRecord

from client.hospital import node_hospital_name
from common import messages as M
from common.config import ExperimentConfig

FaultFn = Callable[[Message], Message]
FAULTS: dict[str, FaultFn] = {}


def register_fault(name: str):
    def decorator(fn: FaultFn) -> FaultFn:
        FAULTS[name] = fn
        return fn

    return decorator


def _replace_arrays(reply: Message, change: Callable[[str, np.ndarray], np.ndarray]) -> Message:
    arrays = reply.content[M.ARRAYS]
    reply.content[M.ARRAYS] = ArrayRecord({k: Array(change(k, v.numpy().copy())) for k, v in arrays.items()})
    return reply


@register_fault("nan")
def _nan(reply: Message) -> Message:
    def poison(key, value):
        value.flat[0] = np.nan
        return value

    return _replace_arrays(reply, poison)


@register_fault("inf")
def _inf(reply: Message) -> Message:
    return _replace_arrays(reply, lambda k, v: np.full_like(v, np.inf))


@register_fault("huge_count")
def _huge_count(reply: Message) -> Message:
    metrics = dict(reply.content[M.METRICS])
    metrics[M.NUM_EXAMPLES] = 10**12
    reply.content[M.METRICS] = MetricRecord(metrics)
    return reply


@register_fault("crash")
def _crash(reply: Message) -> Message:
    raise RuntimeError("fault drill: this hospital crashed during training")


@register_fault("crash_mid_round")
def _crash_mid_round(reply: Message) -> Message:
    """Secure aggregation: the hospital shared its keys, then dies before its masked vector
    leaves (the others' pair masks with it must be rebuilt from its key's shares), in
    every training round and every evaluation."""
    if any(key.startswith("secagg-masked") for key in reply.content.array_records):
        raise RuntimeError("fault drill: this hospital crashed in the middle of a secure aggregation round")
    return reply


def fault_mod(faults: dict[str, str], simulation: ExperimentConfig):
    """A Flower mod applying ``faults`` (hospital -> fault name) to the training replies of
    the simulated hospitals ``simulation`` defines (``crash_mid_round`` to their secure
    evaluations too)."""
    parsed = {hospital: parse_fault(spec) for hospital, spec in faults.items()}

    def mod(msg: Message, context: Context, call_next) -> Message:
        reply = call_next(msg, context)
        if msg.metadata.message_type not in (MessageType.TRAIN, MessageType.EVALUATE) or reply.has_error():
            return reply
        kind, first_round = parsed.get(node_hospital_name(context, simulation), (None, None))
        if kind is None:
            return reply
        if msg.metadata.message_type == MessageType.EVALUATE and (kind != "crash_mid_round" or first_round):
            return reply  # the other faults are training faults
        if first_round and int(msg.content[M.CONFIG].get(M.SERVER_ROUND, 0)) < first_round:
            return reply
        return FAULTS[kind](reply)

    return mod


def parse_fault(spec: str) -> tuple[str, int | None]:
    """``KIND`` or ``KIND@N`` (from training round N on) -> (kind, N or None)."""
    kind, at, first = spec.partition("@")
    if kind not in FAULTS:
        raise ValueError(f"unknown fault {kind!r}; known: {', '.join(sorted(FAULTS))}")
    if at and not (first.isdigit() and int(first) >= 1):
        raise ValueError(f"fault {spec!r}: after '@' comes the first training round it hits (1 or more)")
    return kind, int(first) if at else None
