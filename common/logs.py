"""fedgru's loggers write through Flower's handlers, and the console stays quiet.

Flower streams what its own logger handles (``flwr run --stream``, simulation output),
so fedgru's loggers reuse those handlers instead of printing: progress lines reach the
user however the app was started. Nothing logged anywhere may contain a patient value:
log counts, metrics and names only.

Two things made every run noisy, and :func:`quiet_console` undoes them: Opacus calls
``logging.basicConfig`` when it is imported, so every Flower line was printed a second
time by the root logger, with a timestamp (and Flower's DEBUG lines with it); and
Flower's strategy and runtime log their own bookkeeping each round. ``--verbose`` keeps
all of it but the duplicate.
"""

from __future__ import annotations

import logging
import warnings

from flwr.common.logger import FLOWER_LOGGER

ROOT = logging.getLogger("fedgru")

# Flower's own per-round bookkeeping and notices that say nothing to a fedgru user.
FLOWER_CHATTER = (
    "configure_train:",
    "aggregate_train:",
    "configure_evaluate:",
    "aggregate_evaluate:",
    "fraction_evaluate is set to 0.0",
    "fraction_train",
    "DEPRECATED FEATURE",
)
OPACUS_ROOT_FORMAT = "%(asctime)s:%(levelname)s:%(message)s"  # opacus/utils/module_utils.py


def attach_to_flower(level: int = logging.INFO) -> None:
    """Route the ``fedgru`` loggers to Flower's current handlers (idempotent); drop the
    duplicate handler and, unless :func:`quiet_console` was asked to be verbose, Flower's
    per-round bookkeeping (a ServerApp started by ``flwr run`` comes through here too)."""
    ROOT.setLevel(level)
    ROOT.propagate = False
    for handler in FLOWER_LOGGER.handlers:  # colours only where a person reads them, not into a file
        if hasattr(handler, "colored") and isinstance(handler, logging.StreamHandler):
            stream = getattr(handler, "stream", None)
            handler.colored = bool(stream is not None and hasattr(stream, "isatty") and stream.isatty())
    for handler in FLOWER_LOGGER.handlers:
        if handler not in ROOT.handlers:
            ROOT.addHandler(handler)
    drop_duplicate_handler()
    if not _verbose:
        FLOWER_LOGGER.addFilter(_CHATTER)


def drop_duplicate_handler() -> None:
    """Remove the root handler Opacus installs on import (it reprints every Flower line)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        formatter = handler.formatter
        if formatter is not None and getattr(formatter, "_fmt", None) == OPACUS_ROOT_FORMAT:
            root.removeHandler(handler)


class _Chatter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().lstrip().startswith(FLOWER_CHATTER)


_CHATTER = _Chatter()
_verbose = False


def quiet_console(verbose: bool = False) -> None:
    """The console a user wants: fedgru's lines, Flower's warnings and errors; no line
    twice. ``verbose``: everything Flower and Ray say (still once)."""
    import os

    global _verbose
    _verbose = verbose
    attach_to_flower()
    if verbose:
        FLOWER_LOGGER.removeFilter(_CHATTER)
        return
    # Ray: no accelerator-override tip, no usage-stats banner, no deduplication notes.
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"ray\.")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
