"""One message at one hospital, read and checked before any patient data is.

Every check a message can fail is made here, from the message, the hospital's policy,
its data definition and the counts it declares, and nothing else: the config must parse
and read data as the hospital defines it; the model it names must fit the hospital's
size limit and the weights it carries must be exactly that model's (keys, shapes,
floating types, finite in float32, within the byte limit); the training settings must
be DP within the policy (clipping range, noise floor, the cost of one round, computed
from the declared training count); each requested evaluation must be of an allowed
split, at an allowed resolution, within the run's plan. So every refusal is decided
before a patient file is opened, and it reads the same whether or not any one patient
is in the data. What depends on the ledger (budgets, releases so far this run) is
checked while the ledger is locked, still before any data is read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MessageType

from common import messages as M
from common.config import ConfigError, ExperimentConfig
from common.messages import NodeMode, ReplyState, Split
from common.model import GRUClassifier, model_spec
from common.privacy import calibrate_noise, steps_per_round

from .hospital import UNASSIGNED, Node
from .policy import Policy, PolicyRefusal
from .replies import Refused


def experiment_of(msg: Message) -> ExperimentConfig:
    try:
        return ExperimentConfig.from_json(str(msg.content[M.CONFIG][M.EXPERIMENT_JSON]))
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError("<message>: carries no readable experiment config") from None


def requested_splits(msg: Message) -> list[Split]:
    """The splits a message asks to score, each once (one release each)."""
    names = str(msg.content[M.CONFIG].get(M.EVALUATE, "")).split()
    try:
        splits = [Split(s) for s in names]
    except ValueError:
        raise PolicyRefusal("evaluate", "names a split this hospital does not know (only val and test exist)") from None
    if len(set(splits)) != len(splits):
        raise PolicyRefusal("evaluate", "names a split more than once (each is scored once per message)")
    return splits


@dataclass(frozen=True)
class TrainingPlan:
    """One round of DP-SGD as the policy allows it, from the declared training count."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    per_layer: bool


class Request:
    """One message at one hospital: the experiment, the round, the node, its policy, and
    every check that needs no patient data and no ledger."""

    def __init__(self, msg: Message, context: Context, simulation: ExperimentConfig | None = None):
        self.msg, self.context = msg, context
        self.cfg = experiment_of(msg)
        config = msg.content[M.CONFIG]
        self.run_id = str(config[M.RUN_ID])
        self.server_round = int(config[M.SERVER_ROUND])
        self.node = Node(context, simulation)
        if self.node.name == UNASSIGNED:
            raise Refused(ReplyState.REFUSED, "this simulation node has no hospital")
        self.final = msg.metadata.message_type == MessageType.EVALUATE
        self.splits = requested_splits(msg)
        self.threshold = float(config.get(M.THRESHOLD, 0.0))  # a risk; 0: none given
        if not 0 <= self.threshold < 1:
            raise PolicyRefusal("threshold", "must be a risk between 0 and 1")
        self.node.check_reads_as_defined(self.cfg)
        self.policy: Policy = self.node.policy
        self.declared = self.node.declared
        self.weights = check_weights(self.cfg, msg, self.policy)
        self.training = None if self.final else plan_training(self.cfg, self.policy, self.declared.train)
        planned = self.cfg.planned_evaluations()
        for split in self.splits:
            self.policy.check_evaluation(self.cfg, split, planned.get(split.value, 0))
        self.store = self.node.store(self.policy)

    @property
    def deployed(self) -> bool:
        return self.node.mode == NodeMode.DEPLOYMENT


def plan_training(cfg: ExperimentConfig, policy: Policy, declared_train: int) -> TrainingPlan | None:
    """DP-SGD settings of one round, within the policy, or None where the policy allows
    training without DP (a comparison simulation). Sigma is calibrated for the whole
    planned run from the declared training count (a fixed number: the same for two
    hospitals whose data differ by one patient)."""
    if not cfg.privacy.enabled:
        if policy.allow_without_dp:
            return None
        raise PolicyRefusal("privacy.enabled", "is false; this hospital trains only with differential privacy")
    pr, tr = cfg.privacy, cfg.training
    low, high = policy.clipping_norm
    if not low <= pr.max_grad_norm <= high:
        raise PolicyRefusal("privacy.max_grad_norm",
                            f"is {pr.max_grad_norm:g}; this hospital allows clipping norms in [{low:g}, {high:g}]")
    q, steps = steps_per_round(declared_train, tr.batch_size, tr.local_epochs, tr.sample_rate)
    if pr.noise_multiplier > 0:
        sigma = pr.noise_multiplier
    else:
        try:
            sigma = calibrate_noise(pr.target_epsilon, policy.delta, q, steps * cfg.run.rounds, pr.accountant)
        except Exception:  # noqa: BLE001 - Opacus gives up on a target no noise can reach
            raise PolicyRefusal("privacy.target_epsilon", "cannot be reached with these settings at any noise level "
                                                          "(fewer rounds or steps, or a larger target)") from None
    if not sigma >= policy.min_noise_multiplier:
        raise PolicyRefusal("privacy.noise_multiplier",
                            f"would be {sigma:.3g}; this hospital's floor is {policy.min_noise_multiplier:g}")
    return TrainingPlan(float(sigma), q, steps, pr.max_grad_norm, pr.clipping == "per_layer")


def check_weights(cfg: ExperimentConfig, msg: Message, policy: Policy) -> dict[str, np.ndarray]:
    """The model the config describes fits the policy's size limit, and the weights the
    message carries are exactly its weights: the same keys and shapes, a floating type,
    within the byte limit, finite in float32. Sizes are read from the arrays' headers and
    lengths first, so an oversized array is refused before any copy of it is made.
    Returns the weights, checked."""
    try:
        with torch.device("meta"):  # shapes only: nothing is allocated, whatever size is asked for
            model = GRUClassifier(model_spec(cfg), gru_impl="torch")
    except (ValueError, RuntimeError) as exc:
        raise PolicyRefusal("model", f"cannot be built from the run's settings ({exc.__class__.__name__})") from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    parameters = sum(math.prod(shape) for shape in expected.values())
    if M.ARRAYS not in msg.content.array_records:
        raise PolicyRefusal("arrays", "are missing: the message carries no model")
    arrays: ArrayRecord = msg.content[M.ARRAYS]
    claimed = sum(max(math.prod(a.shape) * (np.dtype(a.dtype).itemsize if _known_dtype(a.dtype) else 1), len(a.data))
                  for a in arrays.values())
    policy.check_model(parameters, claimed)
    if set(arrays.keys()) != set(expected):
        raise PolicyRefusal("arrays", "do not hold exactly the weights of the model the run's settings describe")
    weights = {}
    for key, shape in expected.items():
        try:
            array = arrays[key].numpy()  # numpy's own reader, never pickle
        except (TypeError, ValueError, OSError):
            array = None
        if array is None or array.shape != shape or not np.issubdtype(array.dtype, np.floating):
            raise PolicyRefusal("arrays", f"weight '{key}' is not of the shape and floating type the model needs")
        with np.errstate(over="ignore", invalid="ignore"):
            if not np.isfinite(array.astype(np.float32)).all():
                # such a model only serves to make the scores or gradients of some patients NaN
                raise PolicyRefusal("arrays", "hold NaN, infinite or (in float32) overflowing weights")
        weights[key] = array
    return weights


def _known_dtype(name: str) -> bool:
    try:
        np.dtype(name)
    except TypeError:
        return False
    return True
