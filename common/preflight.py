"""The preflight: a run's whole plan, agreed with every hospital before anything is spent.

Before round 1 the coordinator sends each hospital the run's config (rounds, batch size
or sample rate, noise multiplier or target epsilon, clipping, and every evaluation
release it will ask for: validation every ``validate_every`` rounds, the final
validation, the test release with its per-group histograms and importance). The hospital
checks the whole plan against its policy and its ledger, without reading a patient
value, and answers with a :class:`PreflightAnswer`: it accepts, with the noise
multiplier it will train with (fitted so that one round stays under its per-round
ceiling and the whole run under what is left of its budget), or it refuses with the
policy line the plan breaks and the smallest change that would fit. Every value in the
answer comes from the message, the hospital's policy, its declared counts and its
ledger. A hospital still checks every later message on its own: a coordinator that
lies in the preflight gains nothing.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

from . import messages as M
from .messages import ReplyState

GROUPS = ("train", "val", "test")


MAX_COUNT = 10 ** 9  # a declared count or a policy setting beyond this is not a hospital's


def _count(value) -> int:
    """A whole, bounded count from a hospital's JSON (it may be hostile: 1e400, a 400-digit
    number, 2.5 or "3" are refused as ValueError, never an OverflowError the caller misses)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNT:
        raise ValueError("a preflight answer's counts must be whole numbers from 0 to 10**9")
    return value


@dataclass
class PreflightAnswer:
    """One hospital's answer to a run's plan (no patient data: see the module doc)."""

    hospital: str
    accepted: bool
    reason: str = ""  # refused: the policy line the plan breaks, and the fix
    noise_multiplier: float = 0.0  # the DP-SGD noise it will train with (0: without DP)
    noise_set_by: str = ""  # what fixed it: the run's setting or target, the per-round ceiling, its remaining budget, its floor
    # each group's epsilon once the run has made every planned release (the ledger's, with the plan)
    planned: dict[str, float] = field(default_factory=dict)
    remaining: dict[str, float] = field(default_factory=dict)  # each group's budget minus its epsilon, before the run
    budgets: dict[str, float] = field(default_factory=dict)  # each group's budget (policy settings); {} from older apps
    # validation and test: each group's epsilon if a second run of the same plan followed ({} from older apps)
    again: dict[str, float] = field(default_factory=dict)
    # secure aggregation only: the training count the hospital declares (released with every training
    # reply anyway), so the coordinator can scale the integers of the sum without it wrapping around
    declared_train: int = 0
    # secure aggregation only: the two policy settings that set the least reconstruction threshold the
    # hospital accepts (common.secagg.least_threshold), so the coordinator can start at it (settings, not data)
    min_honest: int = 0
    max_colluding: int = 0
    # the delta its policy states every epsilon at (a setting; under a simulation's delta: auto, below 1/n of its
    # declared training count, so it shows that count's order of magnitude, as every ledger copy does): the
    # coordinator computes each evaluation release's noise at it (common.evaluation_noise) and drops a release
    # whose ledger entry records other noise; 0 in run folders from before it (the ledger's delta is used)
    delta: float = 0.0

    def to_status(self) -> dict:
        state = ReplyState.ACCEPTED if self.accepted else ReplyState.REFUSED_POLICY
        status = {M.HOSPITAL: self.hospital, M.STATE: state.value, M.PLAN: json.dumps(asdict(self), sort_keys=True)}
        if self.reason:
            status[M.REASON] = self.reason
        return status

    @classmethod
    def from_status(cls, status: dict) -> PreflightAnswer:
        """Read and check a hospital's answer (the coordinator trusts no hospital either)."""
        data = json.loads(str(status[M.PLAN]))
        answer = cls(
            hospital=str(data["hospital"]), accepted=bool(data["accepted"]), reason=str(data.get("reason", ""))[:1000],
            noise_multiplier=float(data.get("noise_multiplier", 0.0)), noise_set_by=str(data.get("noise_set_by", ""))[:200],
            planned={str(k): float(v) for k, v in dict(data.get("planned", {})).items() if k in GROUPS},
            remaining={str(k): float(v) for k, v in dict(data.get("remaining", {})).items() if k in GROUPS},
            budgets={str(k): float(v) for k, v in dict(data.get("budgets", {})).items() if k in GROUPS},
            again={str(k): float(v) for k, v in dict(data.get("again", {})).items() if k in GROUPS},
            declared_train=_count(data.get("declared_train", 0)),
            min_honest=_count(data.get("min_honest", 0)), max_colluding=_count(data.get("max_colluding", 0)),
            delta=float(data.get("delta", 0.0)),
        )
        numbers = [answer.noise_multiplier, *answer.planned.values(), *answer.remaining.values(),
                   *answer.budgets.values(), *answer.again.values(), answer.declared_train,
                   answer.min_honest, answer.max_colluding, answer.delta]
        if not all(math.isfinite(v) and v >= -1e-9 for v in numbers):
            raise ValueError("a preflight answer's numbers must be finite and not negative")
        if not answer.delta < 1:
            raise ValueError("a preflight answer's delta must be below 1")
        return answer
