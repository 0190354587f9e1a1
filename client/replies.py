"""How a hospital answers: every failure becomes a reply the coordinator may read, and a
training reply already released can be kept and sent again.

Every refusal is a reply, never an exception: a request outside the policy gets
``refused-policy`` and the name of the setting; a missing ledger or an unreadable folder
gets ``refused`` and the kind of problem. The details (file, line) stay in the
hospital's own log, because file names can be stay ids and nothing about a patient
leaves. A failure after the hospital has read patient data says only that it failed:
which exception, like the data that raised it, stays in the log.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Callable
from pathlib import Path

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from common import messages as M
from common.config import ConfigError
from common.data.records import DataError
from common.ledger import Ledger, LedgerError
from common.logs import attach_to_flower
from common.messages import ReplyState

from .folder import FolderError
from .policy import PolicyRefusal

log = logging.getLogger("fedgru.client")


class Refused(Exception):
    """Reply ``state`` with ``reason`` (a setting or a kind of problem, no patient value)."""

    def __init__(self, state: ReplyState, reason: str):
        super().__init__(reason)
        self.state, self.reason = state, reason


class AfterReading(Exception):
    """A failure once patient data was read: the reply says only that it failed."""


def status(hospital: str, state: ReplyState, **extra) -> ConfigRecord:
    return ConfigRecord({M.HOSPITAL: hospital, M.STATE: state.value, **extra})


def answer(msg: Message, hospital: str, state: ReplyState, ledger: Ledger | None, content: dict | None = None,
           **extra) -> Message:
    """A reply to ``msg``: ``content``'s records and the status, with the copy of the ledger
    the coordinator may see (``ledger`` None: none, e.g. secure aggregation's key stages)."""
    records = dict(content or {})
    ledger_copy = {M.LEDGER: ledger.for_coordinator()} if ledger is not None else {}
    records[M.STATUS] = status(hospital, state, **ledger_copy, **extra)
    return Message(RecordDict(records), reply_to=msg)


# An absolute, relative (./, ../), home (~/, ~user/) or network (\\\\server) path, not a slash inside a word
# ("train/validation") or a number ("1/(10 n)"); a sentence's full stop is not part of it.
_PATH = re.compile(r"(?<![\w.)])(?:~\w*/|/|\.{1,2}/|[A-Za-z]:\\|\\\\)[^\s'\",;]*[^\s'\",;.:)]")


def without_paths(reason: str, known: tuple[str, ...] = ()) -> str:
    """A refusal reason as the coordinator may read it: file paths of the hospital's
    machine (its folder, user names, mount points) become ``<path>``; the hospital's own
    log keeps the full text. ``known``: paths to take out first, whole (a folder name
    with spaces in it, say, which the pattern alone would cut at the space)."""
    for prefix in sorted({k for k in known if k and k not in ("/", ".")}, key=len, reverse=True):
        reason = reason.replace(prefix, "<path>")
    return re.sub(r"(?:<path>)+", "<path>", _PATH.sub("<path>", reason))


def _local_paths(context: Context) -> tuple[str, ...]:
    """The hospital folder as configured and resolved, and the home folder."""
    paths = [str(Path.home())]
    folder = context.node_config.get("hospital-dir")
    if folder:
        paths += [str(folder), str(Path(str(folder)).expanduser().resolve())]
    return tuple(paths)


def refusing(handler: Callable[..., Message], name_of: Callable[[Message, Context], str],
             action: str) -> Callable[[Message, Context], Message]:
    """Turn every failure into a reply the coordinator may read: what went wrong in
    words it may see; the details only in this hospital's log. ``name_of``: the
    hospital's name for the reply (never from the message); ``action``: for the log."""

    def wrapped(msg: Message, context: Context, *more) -> Message:
        attach_to_flower()
        try:
            return handler(msg, context, *more)
        except Refused as exc:
            state, reason = exc.state, exc.reason
        except PolicyRefusal as exc:
            state, reason = ReplyState.REFUSED_POLICY, str(exc)
        except (LedgerError, FolderError, ConfigError) as exc:
            state, reason = ReplyState.REFUSED, str(exc)
        except DataError as exc:  # names a file and a line: local only (file names can be stay ids)
            log.error("%s", exc)
            state, reason = ReplyState.REFUSED, "the hospital's data could not be read; the hospital's log says where"
        except AfterReading:
            log.exception("%s failed after reading patient data", action)
            state, reason = ReplyState.REFUSED, "the hospital's app failed; its log says why"
        except Exception as exc:  # noqa: BLE001 - never let an exception's text travel to the server
            log.exception("%s failed", action)
            state, reason = ReplyState.REFUSED, f"the hospital's app failed ({exc.__class__.__name__}); its log says why"
        try:
            name = name_of(msg, context)
        except Exception:  # noqa: BLE001 - an unreadable node: the reply still goes out
            name = "hospital"
        log.error("%s refuses to %s: %s", name, action, reason)
        sent = without_paths(reason, _local_paths(context))
        return Message(RecordDict({M.STATUS: status(name, state, **{M.REASON: sent})}), reply_to=msg)

    wrapped.__name__ = wrapped.__qualname__ = action
    return wrapped


def pack(content: RecordDict) -> bytes:
    """A reply's records as bytes (kept to resend the same reply, never re-made)."""
    buffer = io.BytesIO()
    torch.save(
        {
            "arrays": {name: {k: torch.as_tensor(v.numpy()) for k, v in rec.items()} for name, rec in content.array_records.items()},
            "metrics": {name: dict(rec) for name, rec in content.metric_records.items()},
            "configs": {name: dict(rec) for name, rec in content.config_records.items()},
        },
        buffer,
    )
    return buffer.getvalue()


def unpack(blob: bytes) -> RecordDict:
    data = torch.load(io.BytesIO(blob), weights_only=True)
    records: dict = {name: ArrayRecord({k: Array(v.numpy()) for k, v in rec.items()}) for name, rec in data["arrays"].items()}
    records.update({name: MetricRecord(rec) for name, rec in data["metrics"].items()})
    records.update({name: ConfigRecord(rec) for name, rec in data["configs"].items()})
    return RecordDict(records)
