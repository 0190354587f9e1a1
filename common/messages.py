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

# RecordDict keys
ARRAYS = "arrays"  # ArrayRecord: model weights (server -> hospital, hospital -> server)
CONFIG = "config"  # ConfigRecord: round instructions (server -> hospital)
METRICS = "metrics"  # MetricRecord: numeric reply fields (hospital -> server)
STATUS = "status"  # ConfigRecord: hospital identity, state and ledger (hospital -> server)
EVALUATION = "evaluation"  # ArrayRecord: score summary (hospital -> server)

# ConfigRecord fields, server -> hospital
EXPERIMENT_JSON = "fedgru-config"  # the ExperimentConfig as JSON
RUN_ID = "run-id"
SERVER_ROUND = "server-round"
SPLIT = "split"  # which split to evaluate (a Split value); replies echo it
THRESHOLD = "threshold"  # binary decision threshold for the confusion matrix (default 0.5)
PROXIMAL_MU = "proximal-mu"  # FedProx's mu; Flower's FedProx strategy writes this key

# Reply fields, hospital -> server (MetricRecord and status ConfigRecord)
NUM_EXAMPLES = "num-examples"  # Flower's weighting key
UNIT_WEIGHT = "unit-weight"  # constant 1: equal weights when hospital-level DP needs them
TRAIN_LOSS = "train-loss"
EPSILON = "epsilon"  # cumulative, over everything in the hospital's ledger
DELTA = "delta"
BUDGET = "budget"  # the hospital's max epsilon at that delta
STEPS = "steps"
REASON = "reason"  # why a hospital refused (no patient data)
HOSPITAL = "hospital"
STATE = "state"  # a ReplyState value
MODE = "mode"  # a NodeMode value
LEDGER = "ledger-json"

TRAIN_METRIC_KEYS = (NUM_EXAMPLES, UNIT_WEIGHT, TRAIN_LOSS, EPSILON, DELTA, BUDGET, STEPS)


class ReplyState(str, Enum):
    """What a hospital says it did with a message."""

    READY = "ready"  # query: a hospital, ready to take part
    UNASSIGNED = "unassigned"  # query: a spare simulation node with no hospital
    TRAINED = "trained"
    EVALUATED = "evaluated"
    BUDGET_EXHAUSTED = "budget-exhausted"  # the round would pass the hospital's privacy budget
    REFUSED = "refused"  # the hospital cannot or will not take part (reason in REASON)


class NodeMode(str, Enum):
    SIMULATION = "simulation"  # the node holds a share of a simulated data set
    DEPLOYMENT = "deployment"  # a real hospital with its own data and ledger


class Split(str, Enum):
    """A hospital's patients, split once: trained on, validated on, tested on."""

    TRAIN = "train"
    VAL = "val"
    TEST = "test"


class Mechanism(str, Enum):
    """How a ledger entry's release was made (ledgers travel in replies)."""

    DP_SGD = "dp-sgd"  # model weights after DP-SGD: composes into the hospital's epsilon
    NONE = "none"  # a release outside the DP guarantee, recorded so nothing leaves unrecorded


SUMMARY_FIELDS = ("histogram", "confusion", "brier_sum", "n")  # the evaluation ArrayRecord's arrays


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
        NUM_EXAMPLES, "every training round", False,
        "the number of stays in the hospital's training split (used to weight the average)",
    ),
    Release(
        TRAIN_LOSS, "every training round", False,
        "the mean training loss over the round's Poisson batches of training patients",
    ),
    Release(
        "privacy ledger and accounting (epsilon, delta, budget, steps, sample rate, noise multiplier)",
        "every training round", False,
        "the DP-SGD settings and the list of releases; the sample rate is batch size / training stays, "
        "so it reveals the same count as num-examples",
    ),
    Release(UNIT_WEIGHT, "every training round", False, "the constant 1; reveals nothing"),
    Release(
        "evaluation score summary", "every round (validation split) and at the end (test split)", False,
        "for the patients of the evaluated split: how many of each outcome class fall in each bin of "
        "predicted risk, the confusion matrix at the decision threshold, the summed Brier score and "
        "the split size",
    ),
    Release(
        HOSPITAL, "when the run starts", False,
        "the hospital's name as configured on its node (no patient data)",
    ),
)
