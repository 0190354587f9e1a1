"""The contract between the coordinator and the hospitals: record keys, reply fields,
and what each released field reveals.

Every value a hospital sends is declared in :data:`RELEASES` with its privacy status.
The server validates replies against these declarations and the privacy report lists
them, so nothing can leave a hospital without being either covered by DP-SGD or named
as a non-DP release.
"""

from __future__ import annotations

from dataclasses import dataclass

# RecordDict keys
ARRAYS = "arrays"  # ArrayRecord: model weights (server -> hospital, hospital -> server)
CONFIG = "config"  # ConfigRecord: round instructions (server -> hospital)
METRICS = "metrics"  # MetricRecord: numeric reply fields (hospital -> server)
STATUS = "status"  # ConfigRecord: hospital identity, status and ledger (hospital -> server)
EVALUATION = "evaluation"  # ArrayRecord: score summary (hospital -> server)

# ConfigRecord fields, server -> hospital
EXPERIMENT_JSON = "fedgru-config"  # the ExperimentConfig as JSON
RUN_ID = "run-id"
SERVER_ROUND = "server-round"
SPLIT = "split"  # which split to evaluate: "val" or "test"
THRESHOLD = "threshold"  # binary decision threshold for the confusion matrix (default 0.5)

# Reply fields, hospital -> server
NUM_EXAMPLES = "num-examples"  # Flower's weighting key
UNIT_WEIGHT = "unit-weight"  # constant 1: equal weights when hospital-level DP needs them
TRAIN_LOSS = "train-loss"
EPSILON = "epsilon"  # cumulative, over everything in the hospital's ledger
DELTA = "delta"
BUDGET = "budget"  # the hospital's max epsilon at that delta
STEPS = "steps"
REASON = "reason"  # why a hospital refused (no patient data)
HOSPITAL = "hospital"
STATE = "state"  # ready, unassigned, trained, evaluated, budget-exhausted, refused
MODE = "mode"  # "simulation" (node holds a share of a simulated data set) or "deployment"
LEDGER = "ledger-json"

TRAIN_METRIC_KEYS = (NUM_EXAMPLES, UNIT_WEIGHT, TRAIN_LOSS, EPSILON, DELTA, BUDGET, STEPS)


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
