"""What a run produces, as typed records.

The coordinator builds them, ``server.outputs`` writes them to the run folder
(``metrics.json``, ``privacy.json``, ``partition.json``, ``baselines.json``),
``server.checkpoint`` keeps them across a restart, and ``server.report`` reads them back
with :func:`load_record`. No module reads these files through string keys of its own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

from common.data.dataset import DataSummary
from common.data.partition import HospitalRow
from common.files import json_safe
from common.metrics import Metrics
from common.preflight import PreflightAnswer
from common.reliability import CalibrationPoint
from common.subgroups import GroupResult
from common.typed import TypedDataError, build

T = TypeVar("T")


class HospitalState(str, Enum):
    """Where a hospital stands in a run, as the coordinator sees it."""

    ACTIVE = "active"
    BUDGET_EXHAUSTED = "budget-exhausted"  # stopped at its privacy budget: a normal end
    REFUSED = "refused"  # declined to take part (its reason is recorded)

    @property
    def words(self) -> str:
        """The state as the console and the report say it ("active" means nothing to a reader
        once the run is over)."""
        return {HospitalState.ACTIVE: "in the run to its end", HospitalState.BUDGET_EXHAUSTED:
                "stopped at its privacy budget", HospitalState.REFUSED: "refused"}[self]


@dataclass
class Dropped:
    """A reply the coordinator did not use, and why."""

    hospital: str  # the name registered for the node at discovery ("node <id>" if none)
    node_id: int
    reason: str


@dataclass
class Stopped:
    """A hospital that answered with a state instead of an update."""

    hospital: str
    state: HospitalState
    reason: str


@dataclass
class TrainReport:
    """What one hospital's accepted training reply said."""

    num_examples: int
    steps: int
    epsilon: float  # as the hospital reported it (the coordinator recomputes its own from the ledger)
    delta: float
    budget: float


@dataclass
class TrainPhase:
    """One round's training: who trained, who was dropped or stopped, whether the model moved."""

    hospitals: dict[str, TrainReport] = field(default_factory=dict)
    dropped: list[Dropped] = field(default_factory=list)
    stopped: list[Stopped] = field(default_factory=list)
    skipped: bool = False
    validation: dict = field(default_factory=dict)  # hospital -> its validation release (of the model it received)


@dataclass
class Evaluation:
    """Pooled and per-hospital metrics of one evaluation (from the released summaries)."""

    split: str
    pooled: Metrics | None = None
    hospitals: dict[str, Metrics] = field(default_factory=dict)
    dropped: list[Dropped] = field(default_factory=list)
    pooled_interval: list[float] | None = None  # the pooled AUROC's rough interval (common.intervals)
    # why a DP reading has no pooled AUROC interval (and so no number): the noise, or bins that cannot rank
    pooled_note: str = ""


@dataclass
class HospitalRound:
    train: TrainReport | None
    val: Metrics | None
    epsilon: float | None  # over the hospital's whole ledger after this round


@dataclass
class RoundRecord:
    """One round; ``pooled_val`` and each hospital's ``val`` score the global model after
    this round, when it was validated (the next round's messages carry that)."""

    round: int
    seconds: float
    skipped: bool
    pooled_val: Metrics | None
    hospitals: dict[str, HospitalRound]
    dropped: list[Dropped]
    pooled_val_interval: list[float] | None = None  # the pooled validation AUROC's rough interval


@dataclass
class Calibration:
    """Platt scaling folded into the output layer: logit -> scale x logit + shift."""

    scale: float
    shift: float


@dataclass
class TestResult:
    pooled: Metrics | None
    hospitals: dict[str, Metrics]
    dropped: list[Dropped]
    threshold: float  # binary tasks: flagged at risk >= threshold
    calibration: Calibration | None
    # where the threshold came from: "read" (the rule on the validation releases), "level" (the config's),
    # "fallback" (0.5: the releases could not be read); "" in run folders from before it
    threshold_source: str = ""
    # the released model is the average of these rounds' global models, [first, last] (server.averaging);
    # empty: the last round's own model, or a run folder from before the rounds were kept
    averaged_rounds: list[int] = field(default_factory=list)
    calibration_curve: list[CalibrationPoint] = field(default_factory=list)  # pooled, by risk decile
    # pooled observed rate over mean predicted risk: [reading, low, high] (common.estimates.observed_over_predicted)
    calibration_ratio: list[float] | None = None
    subgroups: list[GroupResult] = field(default_factory=list)  # metrics per group of test patients (DP)
    # A group is read only when its pooled noisy deaths and survivors each reach this count ((MIN_SIGNAL +
    # GROUP_READ_MARGIN) sds of the DP noise on a group's count over its bins, at this run's noise and hospitals);
    # None: no per-group release.
    subgroup_least: float | None = None
    # The DP noise's sd on one class's count in a group (over its bins); None in run folders made before it
    # (there subgroup_least was MIN_SIGNAL of these sds)
    subgroup_count_sd: float | None = None
    importance: dict[str, float] = field(default_factory=dict)  # mean clipped |contribution| per input (DP), largest first
    importance_noise: float | None = None  # the standard deviation of the DP noise on each of those means
    # DP releases: rough intervals of each metric for the DP noise and the fit (common.intervals.metric_intervals;
    # nominal INTERVAL_LEVEL, their measured coverage in common.intervals.INTERVAL_COVERAGE): row -> metric ->
    # [low, high]; rows "pooled" and each hospital. A row without intervals could not be estimated.
    intervals: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    auroc_interval: list[float] | None = None  # the pooled AUROC's (run folders from before ``intervals``)
    # A simulation holds every patient: the same metrics computed exactly on its test patients (pooled and per
    # hospital), which a real federation never sees.
    exact: Metrics | None = None
    exact_hospitals: dict[str, Metrics] = field(default_factory=dict)
    # a simulation's exact observed death rate over mean predicted risk, pooled (binary tasks), and by tenths of
    # its test patients by risk (the reliability diagram draws it beside the DP reading)
    exact_calibration_ratio: float | None = None
    exact_calibration_curve: list[CalibrationPoint] = field(default_factory=list)
    # The threshold of each checkpoint hour read from the hourly validation releases, and one for every hour of
    # the window joined in logit (the last hour's is ``threshold``): a monitor flags hour h at hour_thresholds[h-1].
    checkpoint_thresholds: dict[str, float] = field(default_factory=dict)  # hour (as text: a JSON key) -> threshold
    hour_thresholds: list[float] = field(default_factory=list)
    # each checkpoint threshold's rough interval [low, high] (server.threshold_intervals; nominal INTERVAL_LEVEL,
    # measured coverage in THRESHOLD_INTERVAL_COVERAGE): hour (as text) -> interval; an hour without one has none
    checkpoint_intervals: dict[str, list[float]] = field(default_factory=dict)
    # The monitor's margin (common.onset): a stay is flagged from the first hour its risk passes that hour's
    # threshold by this much in log-odds, and stays flagged; read from the validation patients' onset histogram
    # so that evaluation.monitor_rate of them are flagged at some hour. None: each hour flags alone.
    onset_margin: float | None = None
    onset_margin_interval: list[float] | None = None  # its rough interval in log-odds, as the hours' (None: none)
    # the flag levels' (each hour's threshold moved by the margin) rough intervals, as risks, by hour: at the
    # checkpoints and, under a clinical level, the last hour (server.results.flag_level_intervals)
    flag_level_intervals: dict[str, list[float]] = field(default_factory=dict)
    monitor_rate: float | None = None


@dataclass
class StartRecord:
    """Which model bundle the run started from (``model.init_from``), as read at the start."""

    path: str
    sha256: str  # of the file's bytes
    source_run: str  # the run id the bundle records, "" if none


@dataclass
class RunMetrics:
    """``metrics.json``."""

    run_id: str
    rounds: list[RoundRecord] = field(default_factory=list)
    test: TestResult | None = None
    wall_seconds: float | None = None
    # How the metrics were read from the released histograms (evaluation.estimator under
    # DP; "binned" for exact ones); empty in runs from before the choice existed.
    estimator: str = ""
    start: StartRecord | None = None  # the bundle the run started from; None: model.init's own start
    preflight: list[PreflightAnswer] = field(default_factory=list)  # each hospital's answer to the run's plan
    # Why the run made no evaluation release ("" when it made them): it did not start, or no hospital trained.
    not_evaluated: str = ""


@dataclass
class HospitalStatus:
    """The coordinator's record of one hospital (no patient data), kept in checkpoints."""

    name: str
    state: HospitalState
    reason: str
    rounds_trained: int
    budget: float | None  # None: not reported yet
    ledger_json: str  # the ledger the hospital last sent ("" before its first reply)
    noise_multiplier: float | None = None  # the noise it accepted at the preflight (None: none, or a checkpoint from before)


@dataclass
class DPRound:
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float


@dataclass
class GroupPrivacy:
    """What one group of a hospital's patients (training, validation or test) has spent,
    over everything in the hospital's ledger."""

    epsilon: float  # by the accountant that drives decisions
    epsilon_rdp: float
    epsilon_prv: float
    releases: int  # noisy releases about this group, all runs
    this_run: int  # ... of them in this run
    # secure aggregation's releases counted with this hospital's own noise only (every other
    # hospital colluding with the coordinator); None when the group had none
    epsilon_alone: float | None = None


@dataclass
class HospitalPrivacy:
    """One hospital's entry in ``privacy.json``. ``epsilon`` and its siblings are the
    training patients'; ``groups`` has every group's."""

    state: HospitalState
    rounds_trained: int
    budget: float | None  # the training patients' budget as the hospital reported it
    reason: str = ""
    epsilon: float | None = None  # training patients, by the accountant that drives decisions
    epsilon_rdp: float | None = None
    epsilon_prv: float | None = None
    epsilon_alone: float | None = None  # training patients, with its own share of secure aggregation's noise only
    delta: float | None = None
    accountant: str | None = None
    remaining: float | None = None
    noise_multiplier: float | None = None
    max_grad_norm: float | None = None
    groups: dict[str, GroupPrivacy] = field(default_factory=dict)  # Split value -> its spending
    history: list[DPRound] = field(default_factory=list)  # this run's DP-SGD rounds
    earlier_runs: list[str] = field(default_factory=list)
    # Run folders written before hospitals kept export labels to themselves list them here
    # (keyed labels of the exports the releases read); no longer written.
    data_exports: list[str] = field(default_factory=list)
    ledger: dict[str, Any] | None = None


@dataclass
class HospitalLevelPrivacy:
    epsilon: float
    delta: float
    releases: int
    noise_multiplier: float
    clipping_norm: float
    max_epsilon: float | None
    accountant: str
    guarantee: str


@dataclass
class NonDPRelease:
    field: str
    when: str
    reveals: str


@dataclass
class RunPrivacy:
    """``privacy.json``."""

    run_id: str
    dp_enabled: bool
    evaluation_dp: bool  # score histograms carried DP noise (always, outside comparison simulations)
    guarantee: str
    hospitals: dict[str, HospitalPrivacy]
    hospital_level: HospitalLevelPrivacy | None
    non_dp_releases: list[NonDPRelease]


@dataclass
class Partition:
    """``partition.json``: the simulation's own description of its hospitals."""

    scheme: str
    hospitals: list[HospitalRow]
    data_summary: DataSummary | None


@dataclass
class BaselineResult:
    """One baseline in ``baselines.json`` (keyed by kind)."""

    kind: str
    seed: int
    rounds: int
    local_epochs: float
    epsilon: dict[str, float]  # per hospital for `local`, {"all": e} for `central-dp`, {} without DP
    pooled: Metrics
    hospitals: dict[str, Metrics]
    seconds: float
    subgroups: list[GroupResult] = field(default_factory=list)  # exact, on the pooled test patients


def to_plain(record: Any) -> Any:
    """JSON-ready form of a record (NaN becomes null)."""
    return json_safe(record)


def from_plain(cls: type[T], data: Any, origin: str) -> T:
    try:
        return build(cls, data, origin, null_is_nan=True)
    except TypedDataError as exc:
        raise ValueError(f"{exc} (written by another fedgru version?)") from None


def load_record(path: Path, cls: type[T]) -> T | None:
    """A record file of a run folder, or None when the run did not write it."""
    if not path.is_file():
        return None
    return from_plain(cls, json.loads(path.read_text()), str(path))


def load_records(path: Path, cls: type[T]) -> dict[str, T] | None:
    """A file holding a mapping of records (``baselines.json``)."""
    if not path.is_file():
        return None
    return {key: from_plain(cls, value, f"{path}: {key}") for key, value in json.loads(path.read_text()).items()}


@dataclass
class AuditGuess:
    guesses: int
    correct: int
    bound: float


@dataclass
class AuditResult:
    """``audit.json``: a one-run privacy audit of one simulated hospital (simulations.audit)."""

    epsilon_lower_bound: float  # at `confidence`, the best of a few fixed guess counts (Bonferroni)
    epsilon_claimed: float  # the hospital's ledger: its training patients' epsilon after the run (inf: no DP)
    delta: float
    canaries: int
    guesses: int  # of the guess count that gave the bound
    correct: int
    hospital: str
    canary_kind: str = "gradient (Dirac canaries on audit coordinates; white-box audit of the released updates)"
    confidence: float = 0.95
    rounds: int = 0
    tried: list[AuditGuess] = field(default_factory=list)
