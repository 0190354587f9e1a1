"""The contract between the coordinator and the hospitals: every record key, config
key, reply field and reply state that crosses the wire, and what each released field
reveals.

Nothing that travels in a Flower message is spelled anywhere else: both sides import
these names. Every value a hospital sends is declared in :data:`RELEASES` with its
privacy status; the server checks replies against these declarations and the privacy
report lists them, so nothing can leave a hospital without being either covered by DP
or named as a non-DP release.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from common.config import ExperimentConfig

# A hospital's name travels in messages (its reply state, its signed round keys) and names
# files in its folder: letters, digits, '-' and '_', the same rule wherever one is given.
HOSPITAL_NAME_RULE = "use letters, digits, '-' and '_' only"


def is_hospital_name(name: str) -> bool:
    return bool(name) and all(c.isalnum() or c in "-_" for c in name)

# RecordDict keys
ARRAYS = "arrays"  # ArrayRecord: model weights (server -> hospital, hospital -> server)
CONFIG = "config"  # ConfigRecord: round instructions (server -> hospital)
METRICS = "metrics"  # MetricRecord: numeric reply fields (hospital -> server)
STATUS = "status"  # ConfigRecord: hospital identity, state and ledger (hospital -> server)
EVALUATION_PREFIX = "evaluation-"  # ArrayRecord "evaluation-<split>": a score summary (hospital -> server)

# ConfigRecord fields, server -> hospital
EXPERIMENT_JSON = "fedgru-config"  # the ExperimentConfig as JSON
RUN_ID = "run-id"
SERVER_ROUND = "server-round"
EVALUATE = "evaluate"  # space-separated Split values: score the received model on these splits
THRESHOLD = "threshold"  # the run's decision threshold (a risk), sent with the test evaluation: bins have an edge there
HOUR_THRESHOLDS = "hour-thresholds"  # each hour's threshold (risks, hour 1 to the window's end), sent with the test evaluation
PROXIMAL_MU = "proximal-mu"  # FedProx's mu; Flower's FedProx strategy writes this key
PREFLIGHT = "preflight"  # a query that carries the run's whole plan (common.preflight): accept or refuse it
NOISE = "noise-multiplier"  # the DP-SGD noise multiplier this hospital accepted at the preflight

# Reply fields, hospital -> server (MetricRecord and status ConfigRecord)
NUM_EXAMPLES = "num-examples"  # Flower's weighting key: the training split's size
UNIT_WEIGHT = "unit-weight"  # constant 1: equal weights when hospital-level DP needs them
EPSILON = "epsilon"  # the training patients' epsilon, over everything in the hospital's ledger
DELTA = "delta"
BUDGET = "budget"  # the hospital's max epsilon for its training patients, at that delta
STEPS = "steps"
REASON = "reason"  # why a hospital refused: names a setting or a file kind, never a patient value
HOSPITAL = "hospital"
STATE = "state"  # a ReplyState value
MODE = "mode"  # a NodeMode value
LEDGER = "ledger-json"
DEFINITION = "data-definition"  # query: the task and features the hospital reads (common.definition), as JSON
PLAN = "plan"  # preflight: the hospital's answer to the run's plan (common.preflight.PreflightAnswer), as JSON
NOT_EVALUATED = "not-evaluated"  # "split: reason" lines for requested evaluations the hospital declined

TRAIN_METRIC_KEYS = (NUM_EXAMPLES, UNIT_WEIGHT, EPSILON, DELTA, BUDGET, STEPS)  # exactly these, nothing else


SUBGROUPS = "subgroups-test"  # ArrayRecord: the test patients' score histograms per group (hospital -> server)
IMPORTANCE = "importance-test"  # ArrayRecord: a noisy sum of each variable's contribution size (hospital -> server)
HOURLY = "hourly-val"  # ArrayRecord: the validation patients' score histograms after each checkpoint hour (hospital -> server)
ONSET = "onset-val"  # ArrayRecord: the validation patients' highest excess over the hour thresholds, a histogram (hospital -> server)


def evaluation_key(split: Split) -> str:
    return f"{EVALUATION_PREFIX}{split.value}"


class Item(str, Enum):
    """What a ledger entry released (ledgers travel in replies; the server matches each
    array record of a reply to the entry that released it)."""

    WEIGHTS = "weights"  # the model after DP-SGD (training patients)
    SPLIT_SIZE = "split-size"  # a count
    HISTOGRAM = "histogram"  # a score histogram of one split
    SUBGROUP_HISTOGRAMS = "subgroup-histograms"  # the test patients' histograms per group
    IMPORTANCE = "importance"  # the test patients' summed contribution sizes, per variable
    HOURLY_HISTOGRAMS = "hourly-histograms"  # the validation patients' histograms after each checkpoint hour
    ONSET_HISTOGRAM = "onset-histogram"  # the validation patients' highest excess over the hour thresholds (with the test)


class ReplyState(str, Enum):
    """What a hospital says it did with a message."""

    READY = "ready"  # query: a hospital, ready to take part
    ACCEPTED = "accepted"  # preflight: the hospital accepts the run's whole plan
    UNASSIGNED = "unassigned"  # query: a spare simulation node with no hospital
    TRAINED = "trained"
    EVALUATED = "evaluated"
    BUDGET_EXHAUSTED = "budget-exhausted"  # the round would pass the hospital's privacy budget
    REFUSED_POLICY = "refused-policy"  # the message asked for something outside the hospital's policy
    REFUSED = "refused"  # the hospital cannot take part (no sound ledger, unreadable data, ...)


class NodeMode(str, Enum):
    SIMULATION = "simulation"  # the node holds a share of a simulated data set
    DEPLOYMENT = "deployment"  # a real hospital with its own folder, policy and ledger


class Split(str, Enum):
    """A hospital's patients, split once: trained on, validated on, tested on."""

    TRAIN = "train"
    VAL = "val"
    TEST = "test"


class Mechanism(str, Enum):
    """How a ledger entry's release was made (ledgers travel in replies)."""

    DP_SGD = "dp-sgd"  # model weights after DP-SGD: composes into the training patients' epsilon
    GAUSSIAN = "gaussian"  # a noisy score histogram: composes into its split's epsilon
    LAPLACE = "laplace"  # a noisy histogram with Laplace noise (a stay in one cell): composes in RDP (common.laplace)
    SKELLAM = "skellam"  # secure aggregation: a share of distributed Skellam noise on one full step (common.skellam)
    NONE = "none"  # a release outside the DP guarantee, recorded so nothing leaves unrecorded


def evaluation_mechanism(cfg: ExperimentConfig, item: Item) -> Mechanism:
    """The mechanism of a hospital's own DP evaluation release of ``item`` (each hospital
    noising its own; under secure aggregation the sessions' Skellam shares): Gaussian, but
    the monitor's onset histogram follows ``evaluation.onset_noise``. Both sides read it:
    the hospital noises and records the release by it, the coordinator checks the ledger
    entry against it and reads the noise's tails by it."""
    if (item == Item.ONSET_HISTOGRAM and cfg.evaluation.onset_noise == "laplace"
            and cfg.privacy.aggregation == "per_hospital"):
        return Mechanism.LAPLACE
    return Mechanism.GAUSSIAN


SUMMARY_FIELDS = {"histogram", "n", "grid"}  # an evaluation record's arrays (multi-class tasks add "confusion")


@dataclass(frozen=True)
class Release:
    field: str
    when: str
    dp: bool
    reveals: str


RELEASES: tuple[Release, ...] = (
    Release(
        "model weights", "every training round", True,
        "covered by example-level DP-SGD (per-example clipping, Gaussian noise, Poisson sampling) "
        "for the patients of the hospital's training split",
    ),
    Release(
        "score histograms", "validation every few rounds and of the final model; test once, at the end", True,
        "per true class, a noisy count of patients in each bin of predicted risk: the Gaussian mechanism, "
        "covered by DP for the patients of the evaluated split (validation or test)",
    ),
    Release(
        "subgroup histograms and variable importance", "once, with the final test histogram", True,
        "the test patients' noisy score histograms per group (sex, age band, ICU type, ...) and a noisy sum of "
        "each variable's contribution size (each patient's clipped): the Gaussian mechanism, covered by DP for "
        "the test patients",
    ),
    Release(
        "hourly histograms", "once, with the final validation histogram", True,
        "the validation patients' noisy score histograms of their risk after each checkpoint hour "
        "(evaluation.hourly_checkpoints), from which each hour's decision threshold is read: the Gaussian "
        "mechanism, covered by DP for the validation patients",
    ),
    Release(
        "onset histogram", "once, with the test release", True,
        "the validation patients' noisy histogram of their highest excess, over the window, of the risk over each "
        "hour's threshold (the thresholds the coordinator sends with the test release; evaluation.monitor_rate), "
        "from which the monitor's margin is read: the discrete Laplace mechanism (evaluation.onset_noise; a share of "
        "Skellam noise under secure aggregation), covered by DP for the validation patients",
    ),
    Release(NUM_EXAMPLES, "every training round", False,
            "a count the hospital declares for its training split: fixed when its staff register an export "
            "(`fedgru hospital data --recount` declares a new one), not recounted per message, so it does not "
            "change when one patient is added or removed"),
    Release("evaluated split size (n)", "with every score histogram", False,
            "the count the hospital declares for the evaluated split (fixed, as for num-examples)"),
    Release(UNIT_WEIGHT, "every training round", False, "the constant 1; reveals nothing"),
    LEDGER_RELEASE := Release(
        "privacy ledger and accounting (epsilon, delta, budget, steps, sample rate, noise multiplier, score grid)",
        "every reply (secure aggregation: with its release and with a stop at the budget, not with its key and "
        "unmask stages)", False,
        "settings and the list of releases, each computed from the message, the hospital's policy and its declared "
        "counts (the sample rate is batch size / declared training stays, so it reveals the same count as "
        "num-examples); the copy sent leaves out which export each release read and when it was recorded "
        "(the hospital's own ledger keeps both)",
    ),
    STATE_RELEASE := Release(
        "reply state and reason", "every reply", False,
        "settings: whether the hospital trained, stopped at its budget or refused, and which setting of its "
        "policy or its data definition a refused message broke, with numbers computed only from the message, "
        "the policy, the declared counts and the ledger (file paths of the hospital's machine removed; its own "
        "log keeps them); a failure after patient data were read says only that it failed",
    ),
    Release(HOSPITAL, "every reply", False, "a name: the hospital's, as its own folder sets it"),
    PLAN_RELEASE := Release(
        "preflight answer", "once, before a run starts", False,
        "whether the hospital accepts the run's plan, the policy line a refused plan breaks and the change that "
        "would fit, the noise multiplier it will train with, and each group's budget and its epsilon before and "
        "after the planned releases (and after a second such run): computed from the plan, the hospital's policy, its declared counts and its ledger; "
        "under secure aggregation also its declared training count and its policy's min_honest and "
        "max_colluding (the least reconstruction threshold it accepts)",
    ),
    Release(
        "masked gradient sum", "every round of secure aggregation (privacy.aggregation: secure)", True,
        "the sum of the training patients' clipped, scaled and randomly rounded gradients plus this hospital's "
        "share of Skellam noise, masked so that only the sum over hospitals can be read: covered by DP for the "
        "training patients with the noise of the min_honest hospitals the hospital's policy counts on, and, with "
        "its own noise alone, within its max_epsilon_alone (both epsilons in its ledger)",
    ),
    Release(
        "masked evaluation sum", "every evaluation under secure aggregation", True,
        "the exact score histograms of the evaluated split (and of the test split: per-group histograms and the "
        "scaled, randomly rounded variable importance) plus this hospital's share of Skellam noise, masked so that "
        "only the sum over hospitals can be read: covered by DP for the validation or test patients with the "
        "noise of the min_honest hospitals its policy counts on, and with its own noise alone within its "
        "max_epsilon_alone (both in its ledger); a split it declines carries only noise",
    ),
    SECAGG_RELEASE := Release(
        "secure aggregation keys and shares", "every round of secure aggregation", False,
        "fresh public keys (a deployed hospital's signed with its own key, with its name: the signature depends "
        "on the keys, the run, the round and the node only), encrypted Shamir shares of fresh random secrets "
        "(each led by a digest of the round's settings), and the shares the protocol lets "
        "the coordinator rebuild (a mask seed of each hospital in the sum, a mask key of each absent one, never "
        "both): random numbers drawn for the round, independent of every patient; and the noise variance the "
        "hospital requires, computed from the run's settings, its policy, its declared counts and its ledger, and "
        "the round an early setup is for (a setting echoed)",
    ),
    DEFINITION_RELEASE := Release(
        "data definition", "when the coordinator asks which hospital a node is", False,
        "settings: the task (outcome column, classes, unknown-outcome codes) and features (variables, their "
        "reference values and plausibility ranges, window, descriptors) the hospital reads its data by, as its "
        "staff fixed them; nothing about a patient",
    ),
)

# What every field a hospital can send is, as a release (each names a Release.field
# above): the privacy report's list and a test of whole runs both read this.
_LEDGER_RELEASE = LEDGER_RELEASE.field
_STATE_RELEASE = STATE_RELEASE.field
FIELD_RELEASES: dict[str, str] = {
    ARRAYS: "model weights",
    "histogram": "score histograms",  # inside an evaluation-<split> record
    "confusion": "score histograms",  # multi-class tasks: the noisy confusion matrix, same mechanism
    "n": "evaluated split size (n)",
    "grid": _LEDGER_RELEASE,  # the score grid: the config's setting echoed
    "subgroup-histograms": "subgroup histograms and variable importance",  # inside the subgroups-test record
    "importance": "subgroup histograms and variable importance",  # inside the importance-test record
    "clip": _LEDGER_RELEASE,  # the importance's clipping norm: a setting
    "hourly-histograms": "hourly histograms",  # inside the hourly-val record
    "hours": _LEDGER_RELEASE,  # the checkpoint hours: the config's setting echoed
    "onset-histogram": "onset histogram",  # inside the onset-val record
    NUM_EXAMPLES: NUM_EXAMPLES,
    UNIT_WEIGHT: UNIT_WEIGHT,
    EPSILON: _LEDGER_RELEASE,
    DELTA: _LEDGER_RELEASE,
    BUDGET: _LEDGER_RELEASE,
    STEPS: _LEDGER_RELEASE,
    LEDGER: _LEDGER_RELEASE,
    STATE: _STATE_RELEASE,
    REASON: _STATE_RELEASE,
    NOT_EVALUATED: _STATE_RELEASE,
    MODE: _STATE_RELEASE,
    HOSPITAL: HOSPITAL,
    DEFINITION: DEFINITION_RELEASE.field,
    PLAN: PLAN_RELEASE.field,
    "secagg-masked": "masked gradient sum",
    "secagg-my-keys": SECAGG_RELEASE.field,
    "secagg-shares": SECAGG_RELEASE.field,
    "secagg-revealed": SECAGG_RELEASE.field,
    "secagg-required-variance": SECAGG_RELEASE.field,
    "secagg-next-round": SECAGG_RELEASE.field,
    "secagg-masked-evaluation": "masked evaluation sum",
    "secagg-noise-variances": SECAGG_RELEASE.field,  # an evaluation's required variance, per part
    "secagg-included": _STATE_RELEASE,  # which parts carry data: decided from the policy, ledger and declared counts
    "secagg-declared": "evaluated split size (n)",
}
