"""A privacy audit's hook inside one simulated hospital (``simulations.audit``): which
canaries it holds and where the audit's coordinates go. A real hospital never has one.
Its own module so that the training paths (``client.app``, ``client.secure``) share it
without importing each other."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass
class CanaryAudit:
    """A privacy audit of one simulated hospital (``simulations.audit`` sets it; a real
    hospital never has one): its canaries train beside the model, and the audit
    coordinates each round releases are written to ``out_dir`` for the auditor."""

    hospital: str
    included: np.ndarray  # (m,) bool: which canaries are in the hospital's data
    out_dir: str
    tamper: Callable | None = None  # tests only: a planted bug in the DP optimizer
