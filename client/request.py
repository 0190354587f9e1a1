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
from dataclasses import dataclass, replace

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MessageType

from common import messages as M
from common.config import ConfigError, ExperimentConfig
from common.data.preprocess import num_steps
from common.messages import NodeMode, ReplyState, Split
from common.model import GRUClassifier, model_spec
from common.secagg import STAGE as SECAGG_STAGE
from common.secure_evaluation import PROGRESS as SECURE_PROGRESS

from .hospital import UNASSIGNED, Node
from .noise import fit_noise
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
    expected_batch: int  # sample rate x declared training count: what the noisy sum is divided by
    micro_batch: int  # rows per piece of a step's sample (memory: never a function of the data)


class Request:
    """One message at one hospital: the experiment, the round, the node, its policy, and
    every check that needs no patient data and no ledger."""

    def __init__(self, msg: Message, context: Context, simulation: ExperimentConfig | None = None,
                 needs_model: bool = True):
        self.msg, self.context = msg, context
        self.cfg = experiment_of(msg)
        config = msg.content[M.CONFIG]
        self.run_id = str(config[M.RUN_ID])
        self.server_round = int(config[M.SERVER_ROUND])
        self.node = Node(context, simulation)
        if self.node.name == UNASSIGNED:
            raise Refused(ReplyState.REFUSED, "this simulation node has no hospital")
        # an evaluation message scores the final model, except a secure validation during
        # training (its progress share of the validation budget; common.secure_evaluation)
        progress = config.get(SECAGG_STAGE) is not None and config.get(SECURE_PROGRESS) is True
        self.final = msg.metadata.message_type == MessageType.EVALUATE and not progress
        first = 0 if self.final else 1
        if not first <= self.server_round <= self.cfg.run.rounds:
            raise PolicyRefusal("server-round", f"must be a round of this run ({first} to run.rounds)")
        self.proximal_mu = float(config.get(M.PROXIMAL_MU, 0.0))
        if not (math.isfinite(self.proximal_mu) and 0 <= self.proximal_mu <= 1e6):
            raise PolicyRefusal("proximal-mu", "must be a finite number >= 0")
        self.splits = requested_splits(msg)
        self.threshold = float(config.get(M.THRESHOLD, 0.0))  # a risk; 0: none given
        if not 0 <= self.threshold < 1:
            raise PolicyRefusal("threshold", "must be a risk between 0 and 1")
        self.hour_thresholds = hour_thresholds_of(self.cfg, config, self.splits)
        self.node.check_reads_as_defined(self.cfg)
        self.policy: Policy = self.node.policy
        self.declared = self.node.declared
        # Secure aggregation's rounds come as its four stages (client.secure), each checked
        # there; a plain training message under it would be trained without its noise
        self.secure = self.cfg.privacy.aggregation == "secure" and self.cfg.privacy.enabled
        stage = config.get(SECAGG_STAGE)
        if self.secure != (stage is not None):
            raise PolicyRefusal("privacy.aggregation", "is 'secure': training rounds and evaluations come as the stages "
                                "of secure aggregation" if self.secure else "is not 'secure': the message names a "
                                "stage of secure aggregation")
        self.weights = check_weights(self.cfg, msg, self.policy) if needs_model else {}
        agreed = config.get(M.NOISE)
        self.training = None if self.final or self.secure else plan_training(
            self.cfg, self.policy, self.declared.train, self.node.accountant, None if agreed is None else float(agreed))
        planned = self.cfg.planned_evaluations()
        for split in self.splits:
            self.policy.check_evaluation(self.cfg, split, planned.get(split.value, 0))
        self.store = self.node.store(self.policy)

    @property
    def deployed(self) -> bool:
        return self.node.mode == NodeMode.DEPLOYMENT


def hour_thresholds_of(cfg: ExperimentConfig, config, splits: list[Split]) -> np.ndarray | None:
    """The hour thresholds a test message brings for the onset histogram (one risk per hour
    of the window), or None where the run asks for none or none came. Any list of risks is harmless to
    the patients (the histogram is a DP release whatever thresholds it is measured
    against); one of another length, or not a risk, is refused before anything is read."""
    if not (cfg.monitors_onset and Split.TEST in splits):
        if config.get(M.HOUR_THRESHOLDS) is not None:
            raise PolicyRefusal("hour-thresholds", "come only with the test release of a run with evaluation.monitor_rate")
        return None
    raw = config.get(M.HOUR_THRESHOLDS)
    if raw is None:
        return None  # the onset histogram is then declined (client.evaluation)
    steps = num_steps(cfg.features)
    try:
        values = np.array([float(v) for v in raw], dtype=np.float64)
    except (TypeError, ValueError):
        raise PolicyRefusal("hour-thresholds", f"must be a list of {steps} risks (one per hour of the window), "
                                               "sent with the test release of a run with evaluation.monitor_rate") from None
    if values.shape != (steps,) or not np.all((values > 0) & (values < 1)):
        raise PolicyRefusal("hour-thresholds", f"must be {steps} risks strictly between 0 and 1, one per hour")
    return values


def plan_training(cfg: ExperimentConfig, policy: Policy, declared_train: int, accountant: str,
                  agreed: float | None = None) -> TrainingPlan | None:
    """DP-SGD settings of one round, within the policy, or None where the policy allows
    training without DP (a comparison simulation). The noise is the one this hospital
    accepted at the run's preflight (``agreed``, checked again like any setting), or
    fitted from the config as at the preflight, without the ledger (client.preflight),
    from the declared training count: the same for two hospitals whose data differ by
    one patient."""
    if not cfg.privacy.enabled:
        if policy.allow_without_dp:
            return None
        raise PolicyRefusal("privacy.enabled", "is false; this hospital trains only with differential privacy")
    pr = cfg.privacy
    policy.check_clipping(pr.max_grad_norm)
    if agreed is not None:
        if not (math.isfinite(agreed) and agreed > 0):
            raise PolicyRefusal("noise-multiplier", "must be a positive number (the noise accepted at the preflight)")
        cfg = replace(cfg, privacy=replace(pr, noise_multiplier=agreed, target_epsilon=0.0))
    fit = fit_noise(cfg, policy, declared_train, accountant)
    expected = max(1, round(fit.sample_rate * declared_train))
    # a piece holds the expected batch with room for Poisson's spread, in whole 64s, within the policy
    micro = min(policy.max_micro_batch, 64 * math.ceil(1.25 * expected / 64))
    return TrainingPlan(fit.noise_multiplier, fit.sample_rate, fit.steps, pr.max_grad_norm, pr.clipping == "per_layer",
                        expected, micro)


def check_model_size(cfg: ExperimentConfig, policy: Policy, message_bytes: int = 0) -> dict[str, tuple[int, ...]]:
    """The model the config describes fits the policy's size limit (and ``message_bytes``
    its byte limit); returns its weights' shapes. Built on the meta device: nothing is
    allocated, whatever size is asked for."""
    try:
        with torch.device("meta"):
            model = GRUClassifier(model_spec(cfg), gru_impl="torch")
    except (ValueError, RuntimeError) as exc:
        raise PolicyRefusal("model", f"cannot be built from the run's settings ({exc.__class__.__name__})") from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    policy.check_model(sum(math.prod(shape) for shape in expected.values()), message_bytes)
    return expected


def check_weights(cfg: ExperimentConfig, msg: Message, policy: Policy) -> dict[str, np.ndarray]:
    """The model the config describes fits the policy's size limit, and the weights the
    message carries are exactly its weights: the same keys and shapes, a floating type,
    within the byte limit, finite in float32. Sizes are read from the arrays' headers and
    lengths first, so an oversized array is refused before any copy of it is made.
    Returns the weights, checked."""
    if M.ARRAYS not in msg.content.array_records:
        raise PolicyRefusal("arrays", "are missing: the message carries no model")
    arrays: ArrayRecord = msg.content[M.ARRAYS]
    claimed = sum(max(math.prod(a.shape) * (np.dtype(a.dtype).itemsize if _known_dtype(a.dtype) else 1), len(a.data))
                  for a in arrays.values())
    expected = check_model_size(cfg, policy, claimed)
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
