"""fedgru's loggers write through Flower's handlers.

Flower streams what its own logger handles (``flwr run --stream``, simulation output),
so fedgru's loggers reuse those handlers instead of printing: progress lines reach the
user however the app was started. Nothing logged anywhere may contain a patient value:
log counts, metrics and names only.
"""

from __future__ import annotations

import logging

from flwr.common.logger import FLOWER_LOGGER

ROOT = logging.getLogger("fedgru")


def attach_to_flower(level: int = logging.INFO) -> None:
    """Route the ``fedgru`` loggers to Flower's current handlers (idempotent)."""
    ROOT.setLevel(level)
    ROOT.propagate = False
    for handler in FLOWER_LOGGER.handlers:
        if handler not in ROOT.handlers:
            ROOT.addHandler(handler)
