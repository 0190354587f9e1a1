"""Checks every reply must pass before it may touch the global model.

A reply that fails is dropped with a reason that names the hospital; the round goes on
with the others. Checks: the reply is not an error; it carries exactly the expected
weight arrays, with the global model's keys, shapes and a floating dtype; every value
is finite; the metric record has the expected keys, finite values and an example count
that is a whole number in ``[1, max_examples]``.
"""

from __future__ import annotations

import math

import numpy as np
from flwr.app import ArrayRecord, Message

from common import messages as M


class ReplyRejected(ValueError):
    pass


def hospital_of(msg: Message, fallback: str) -> str:
    if msg.has_content() and M.STATUS in msg.content.config_records:
        name = msg.content[M.STATUS].get(M.HOSPITAL)
        if name:
            return str(name)
    return fallback


def expected_layout(arrays: ArrayRecord) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    return {k: (tuple(a.shape), np.dtype(a.numpy().dtype)) for k, a in arrays.items()}


def check_train_reply(
    msg: Message,
    layout: dict[str, tuple[tuple[int, ...], np.dtype]],
    max_examples: int,
    current: ArrayRecord | None = None,
) -> None:
    """Raise :class:`ReplyRejected` with the reason when the reply is unusable.

    With ``current`` (the global model sent out), a reply equal to it is rejected too:
    it carries no update, and Flower's hospital-level DP clipping divides by its norm.
    """
    if msg.has_error():
        raise ReplyRejected(f"the hospital reported an error ({msg.error.reason})")
    content = msg.content
    if M.ARRAYS not in content.array_records or len(content.array_records) != 1:
        raise ReplyRejected("reply must carry exactly one weight record named 'arrays'")
    arrays = content[M.ARRAYS]
    got, want = set(arrays.keys()), set(layout)
    if got != want:
        missing, extra = sorted(want - got), sorted(got - want)
        raise ReplyRejected(f"weight keys differ from the global model (missing {missing}, unexpected {extra})")
    for key, (shape, _dtype) in layout.items():
        arr = arrays[key].numpy()
        if tuple(arr.shape) != shape:
            raise ReplyRejected(f"weight '{key}' has shape {tuple(arr.shape)}, expected {shape}")
        if not np.issubdtype(arr.dtype, np.floating):
            raise ReplyRejected(f"weight '{key}' has dtype {arr.dtype}, expected a float type")
        if not np.isfinite(arr).all():
            raise ReplyRejected(f"weight '{key}' contains NaN or infinite values")
    if current is not None and all(np.array_equal(arrays[k].numpy(), current[k].numpy()) for k in layout):
        raise ReplyRejected("the update is empty (the weights equal the global model)")
    check_metrics(msg, M.TRAIN_METRIC_KEYS, max_examples)


def check_metrics(msg: Message, keys: tuple[str, ...], max_examples: int) -> dict:
    content = msg.content
    if M.METRICS not in content.metric_records or len(content.metric_records) != 1:
        raise ReplyRejected("reply must carry exactly one metric record named 'metrics'")
    metrics = content[M.METRICS]
    missing = [k for k in keys if k not in metrics]
    if missing:
        raise ReplyRejected(f"metric record lacks {', '.join(missing)}")
    for key, value in metrics.items():
        values = value if isinstance(value, list) else [value]
        if any(not math.isfinite(float(v)) for v in values):
            raise ReplyRejected(f"metric '{key}' is NaN or infinite")
    n = metrics[M.NUM_EXAMPLES]
    if isinstance(n, list) or float(n) != int(n) or not 1 <= int(n) <= max_examples:
        raise ReplyRejected(f"example count must be a whole number in [1, {max_examples}]")
    return dict(metrics)


def check_eval_reply(msg: Message, num_classes: int, bins: int, max_examples: int):
    """Validate an evaluation reply and return its ScoreSummary."""
    from common.metrics import ScoreSummary

    if msg.has_error():
        raise ReplyRejected(f"the hospital reported an error ({msg.error.reason})")
    content = msg.content
    if M.EVALUATION not in content.array_records:
        raise ReplyRejected("reply lacks the evaluation summary")
    arrays = {k: v.numpy() for k, v in content[M.EVALUATION].items()}
    if set(arrays) != set(M.SUMMARY_FIELDS):
        raise ReplyRejected("evaluation summary has unexpected fields")
    k_score = 1 if num_classes == 2 else num_classes
    if arrays["histogram"].shape != (num_classes, k_score, bins):
        raise ReplyRejected(f"score histogram has shape {arrays['histogram'].shape}, expected {(num_classes, k_score, bins)}")
    if arrays["confusion"].shape != (num_classes, num_classes):
        raise ReplyRejected("confusion matrix has the wrong shape")
    for key in ("histogram", "confusion", "n"):
        if not np.issubdtype(arrays[key].dtype, np.integer) or (arrays[key] < 0).any():
            raise ReplyRejected(f"'{key}' must hold non-negative counts")
    summary = ScoreSummary.from_arrays(arrays)
    if not math.isfinite(summary.brier_sum) or summary.brier_sum < 0:
        raise ReplyRejected("Brier sum must be finite and non-negative")
    if not 0 <= summary.n <= max_examples:
        raise ReplyRejected("evaluation count is out of range")
    if int(summary.histogram[:, 0].sum()) != summary.n or int(summary.confusion.sum()) != summary.n:
        raise ReplyRejected("evaluation counts do not add up")
    return summary
