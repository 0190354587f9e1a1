"""What a hospital allows: its own privacy policy, enforced on every message.

A real hospital's policy lives in its own folder (``client.folder``), written by its
staff with ``fedgru hospital init``; the coordinator never sets it. The experiment config
that arrives with a message may tighten it (a smaller budget, fewer bins), never loosen
it: a message asking for anything outside the policy is refused with a reply state of
``refused-policy`` and a reason that names the setting, before the hospital reads any
patient file. What depends on the number of training stays (the calibrated noise
multiplier, the epsilon of one round) uses the count the hospital declares
(``client.folder.DeclaredCounts``), never a count of its data, so a refusal's numbers
are the same whether or not any one patient is there.

A simulated hospital holds the policy the simulation's config describes (DP may be off
there, for comparison runs); a hospital in a deployment always trains and evaluates
with DP.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from common.config import ExperimentConfig
from common.messages import HOSPITAL_NAME_RULE, Item, Mechanism, Split, evaluation_mechanism, is_hospital_name
from common.signatures import public_key_of

# A policy written before these limits existed gets them (client.folder writes them out).
DEFAULT_MAX_MODEL_PARAMETERS = 1_000_000  # the default model has a few hundred weights; a stacked GRU 128/64 ~90,000
DEFAULT_MAX_MESSAGE_BYTES = 64 * 2**20
# Per-example gradients are held for at most this many examples at once: with the model
# limit, a bound on training memory (512 x 1M weights x 4 bytes = 2 GB) that no data changes.
DEFAULT_MAX_MICRO_BATCH = 512
# Secure aggregation: by default a hospital counts on its own noise and one other
# hospital's, and its own noise alone keeps every training patient within epsilon 4 (at its
# delta) if the coordinator and every other hospital collude (issue 23's example).
DEFAULT_MIN_HONEST = 2
DEFAULT_MAX_EPSILON_ALONE = 4.0
ONSET_NOISES = ("laplace", "gaussian")  # evaluation.onset_noise's settings


class PolicyRefusal(Exception):
    """A message asked for something the hospital's policy does not allow."""

    def __init__(self, setting: str, why: str):
        super().__init__(f"'{setting}' {why}")
        self.setting = setting


@dataclass
class SplitFractions:
    """Shares of the hospital's stays for training, validation and test. A stay's split
    is fixed by a keyed hash of its id, so it never moves between groups of patients,
    whatever export or run reads it."""

    train: float
    val: float
    test: float


@dataclass
class Policy:
    max_epsilon: float  # training patients: epsilon of everything ever released about them, at delta
    delta: float  # the delta of every epsilon in the hospital's ledger
    eval_max_epsilon: float  # validation patients, and test patients: each group's own budget
    min_noise_multiplier: float  # DP-SGD: a floor on the noise multiplier
    max_epsilon_per_round: float  # DP-SGD: a ceiling on what one round may cost
    clipping_norm: list[float]  # DP-SGD: [smallest, largest] per-example clipping norm allowed
    evaluation_splits: list[Split]  # which patients may be evaluated (never the training split)
    max_evaluations_per_run: dict[str, int]  # split -> score histograms one run may ask for
    max_histogram_bins: int  # bins per class of a released score histogram
    split: SplitFractions  # this hospital's own train/validation/test shares
    max_model_parameters: int = DEFAULT_MAX_MODEL_PARAMETERS  # the largest model a message may ask it to train or score
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES  # the most bytes of weights one message may carry
    max_micro_batch: int = DEFAULT_MAX_MICRO_BATCH  # examples whose per-example gradients are held at once
    # Secure aggregation (client.secure): the fewest hospitals whose noise this hospital
    # counts on, itself included (a sum of fewer is refused; its epsilon counts this many
    # hospitals' noise), and the epsilon its own noise alone must still give if every other
    # hospital colluded with the coordinator.
    min_honest: int = DEFAULT_MIN_HONEST
    max_epsilon_alone: float = DEFAULT_MAX_EPSILON_ALONE
    # Secure aggregation: the most other hospitals this one allows to be in league with a
    # coordinator that breaks the protocol. Such a coordinator, telling hospitals different
    # survivor sets, can collect both secrets of one hospital (and read its vector with its
    # own noise only) when 2 t <= n + max_colluding; this hospital refuses those thresholds.
    # 0: a coordinator acting alone is held off (2 t > n, with shares from every hospital
    # that got the keys: client.secagg.Participant.receive).
    max_colluding: int = 0
    # Secure aggregation: the hospitals this one accepts in a sum, name -> the line of its
    # <name>.pub, exchanged between hospitals, never through the coordinator
    # (client.peer_keys). Every other participant's round keys must then be signed by one of
    # them; {}: the coordinator is trusted to pass the round keys on unchanged.
    peer_keys: dict[str, str] = field(default_factory=dict)
    # The noise this hospital accepts on the monitor's onset histogram (common.laplace): the
    # discrete Laplace spends less of one run's validation budget, the Gaussian composes
    # better over many runs; a hospital that plans many runs may keep only "gaussian".
    onset_noise: list[str] = field(default_factory=lambda: list(ONSET_NOISES))
    allow_without_dp: bool = field(default=False)  # simulations only: a deployment never sets it

    def validate(self, where: str) -> None:
        low, high = (self.clipping_norm + [0.0, 0.0])[:2]
        problems = [
            (self.max_epsilon > 0 and math.isfinite(self.max_epsilon), "max_epsilon", "must be a positive number"),
            (0 < self.delta < 1, "delta", "must be in (0, 1)"),
            (self.eval_max_epsilon > 0, "eval_max_epsilon", "must be positive"),
            (self.min_noise_multiplier >= 0, "min_noise_multiplier", "must not be negative"),
            (self.max_epsilon_per_round > 0, "max_epsilon_per_round", "must be positive"),
            (len(self.clipping_norm) == 2 and 0 < low <= high, "clipping_norm", "must be [smallest, largest], both positive"),
            (Split.TRAIN not in self.evaluation_splits, "evaluation_splits", "must not include the training split"),
            (self.max_histogram_bins >= 2, "max_histogram_bins", "must be at least 2"),
            (self.max_model_parameters >= 1, "max_model_parameters", "must be positive"),
            (self.max_message_bytes >= 1, "max_message_bytes", "must be positive"),
            (self.max_micro_batch >= 1, "max_micro_batch", "must be positive"),
            (isinstance(self.min_honest, int) and self.min_honest >= 1, "min_honest", "must be a whole number >= 1"),
            (self.max_epsilon_alone > 0 and math.isfinite(self.max_epsilon_alone), "max_epsilon_alone",
             "must be a positive number"),
            (isinstance(self.max_colluding, int) and self.max_colluding >= 0, "max_colluding",
             "must be a whole number >= 0"),
            (bool(self.onset_noise) and set(self.onset_noise) <= set(ONSET_NOISES), "onset_noise",
             f"must list one or both of: {', '.join(ONSET_NOISES)}"),
            (abs(self.split.train + self.split.val + self.split.test - 1) < 1e-6 and min(
                self.split.train, self.split.val, self.split.test) >= 0, "split", "fractions must add up to 1"),
        ]
        for ok, key, why in problems:
            if not ok:
                raise ValueError(f"{where}: 'policy.{key}' {why}")
        for name, line in self.peer_keys.items():
            if not is_hospital_name(str(name)):
                raise ValueError(f"{where}: 'policy.peer_keys' names a hospital {name!r}: {HOSPITAL_NAME_RULE}")
            try:
                public_key_of(str(line))
            except ValueError as exc:
                raise ValueError(f"{where}: 'policy.peer_keys.{name}' {exc}") from None
        lines = [" ".join(str(line).split()[:2]) for line in self.peer_keys.values()]
        if len(set(lines)) != len(lines):  # one hospital under two names could count twice towards min_honest
            raise ValueError(f"{where}: 'policy.peer_keys' lists one key under two names")

    # -- what a message may ask for ---------------------------------------------------
    def check_training(self, cfg: ExperimentConfig) -> None:
        """Everything a training request names, before any data is read."""
        pr = self.require_dp(cfg)
        if pr is None:
            return
        self.check_clipping(pr.max_grad_norm)
        if pr.noise_multiplier > 0:
            self.check_noise(pr.noise_multiplier)

    def check_clipping(self, max_grad_norm: float) -> None:
        low, high = self.clipping_norm
        if not low <= max_grad_norm <= high:
            raise PolicyRefusal("privacy.max_grad_norm",
                                f"is {max_grad_norm:g}; this hospital allows clipping norms in [{low:g}, {high:g}]")

    def require_dp(self, cfg: ExperimentConfig):
        if cfg.privacy.enabled:
            return cfg.privacy
        if self.allow_without_dp:
            return None
        raise PolicyRefusal("privacy.enabled", "is false; this hospital trains only with differential privacy")

    def check_noise(self, noise_multiplier: float) -> None:
        if noise_multiplier < self.min_noise_multiplier:
            raise PolicyRefusal(
                "privacy.noise_multiplier",
                f"would be {noise_multiplier:.3g}; this hospital's floor is {self.min_noise_multiplier:g}",
            )

    def check_round_cost(self, epsilon_of_round: float) -> None:
        if epsilon_of_round > self.max_epsilon_per_round:
            raise PolicyRefusal(
                "privacy",
                f"settings would spend epsilon {epsilon_of_round:.3g} in one round; this hospital allows "
                f"{self.max_epsilon_per_round:g} per round",
            )

    def check_evaluation(self, cfg: ExperimentConfig, split: Split, planned: int) -> None:
        """An evaluation request: allowed split, resolution (the score bins, and the groups
        of every per-group release, which are bins of a descriptor), DP, and how many of
        this split's releases the run's own settings plan."""
        if split not in self.evaluation_splits:
            allowed = ", ".join(s.value for s in self.evaluation_splits) or "none"
            raise PolicyRefusal("evaluate", f"asks for the {split.value} split; this hospital evaluates only: {allowed}")
        if cfg.evaluation.score_bins > self.max_histogram_bins:
            raise PolicyRefusal(
                "evaluation.score_bins", f"is {cfg.evaluation.score_bins}; this hospital releases at most "
                f"{self.max_histogram_bins} bins per class: use at most {self.max_histogram_bins}",
            )
        if split == Split.VAL and len(cfg.checkpoint_hours) > self.max_histogram_bins:
            raise PolicyRefusal("evaluation.hourly_checkpoints", f"names {len(cfg.checkpoint_hours)} hours; "
                                f"this hospital releases at most {self.max_histogram_bins}: use fewer")
        if split == Split.TEST:
            from common.subgroups import groupings

            for i, grouping in enumerate(groupings(cfg)):
                if len(grouping.groups) > self.max_histogram_bins:
                    raise PolicyRefusal(
                        f"evaluation.subgroups[{i}]", f"makes {len(grouping.groups)} groups; this hospital releases at "
                        f"most {self.max_histogram_bins} bins (groups) per grouping: use fewer bands",
                    )
        if split == Split.VAL and cfg.monitors_onset and cfg.evaluation.dp:
            self.check_onset_noise(cfg)
        if not cfg.evaluation.dp and not self.allow_without_dp:
            raise PolicyRefusal("evaluation.dp", "is false; this hospital releases score histograms only with DP noise: "
                                                 "set it true")
        allowed = self.max_evaluations_per_run.get(split.value, 0)
        if planned > allowed and split == Split.VAL:
            every = next((e for e in range(1, cfg.run.rounds + 1)
                          if len([r for r in range(2, cfg.run.rounds + 1) if (r - 1) % e == 0]) + 1 <= allowed), 0)
            fix = f"use evaluation.validate_every >= {every}" if every else "use evaluation.validate_every=0"
            raise PolicyRefusal("evaluation.validate_every", f"plans {planned} validation releases in this run; this "
                                                             f"hospital allows {allowed} per run: {fix}")
        self.check_evaluation_count(split, planned, 0)

    def check_onset_noise(self, cfg: ExperimentConfig) -> None:
        """The mechanism of the monitor's onset histogram (a release about the validation
        patients) is one the policy lists (secure aggregation's Skellam shares are its own)."""
        if cfg.privacy.aggregation == "secure":
            return  # a sum of Skellam shares, whatever evaluation.onset_noise says
        mechanism = evaluation_mechanism(cfg, Item.ONSET_HISTOGRAM)
        if mechanism in (Mechanism.LAPLACE, Mechanism.GAUSSIAN) and mechanism.value not in self.onset_noise:
            allowed = " or ".join(self.onset_noise)
            raise PolicyRefusal("evaluation.onset_noise", f"is {mechanism.value}; this hospital releases the monitor's "
                                f"onset histogram only with {allowed} noise: use evaluation.onset_noise={self.onset_noise[0]}")

    def check_evaluation_count(self, split: Split, planned: int, released_this_run: int) -> None:
        """The run's plan, and the releases of ``split`` this run has already had (counted in
        the ledger while it is locked), against the policy's per-run count."""
        allowed = self.max_evaluations_per_run.get(split.value, 0)
        if planned > allowed or released_this_run >= allowed:
            raise PolicyRefusal(
                "evaluation", f"this run asks for {max(planned, released_this_run + 1)} {split.value} releases; "
                f"this hospital allows {allowed} per run",
            )

    def check_model(self, parameters: int, message_bytes: int) -> None:
        """The size of the model a message asks it to build, and of the weights it carries."""
        if parameters > self.max_model_parameters:
            raise PolicyRefusal("model", f"has {parameters:,} weights; this hospital builds models of at most "
                                         f"{self.max_model_parameters:,}")
        if message_bytes > self.max_message_bytes:
            raise PolicyRefusal("arrays", f"carry {message_bytes:,} bytes; this hospital takes at most "
                                          f"{self.max_message_bytes:,} per message")

    def training_budget(self, cfg: ExperimentConfig, hospital: str) -> float:
        """The stricter of the hospital's budget and the experiment's."""
        return min(self.max_epsilon, cfg.privacy.budget_for(hospital))

    @classmethod
    def for_simulation(cls, cfg: ExperimentConfig, hospital: str, train_examples: int) -> Policy:
        """A simulated hospital's policy: what ``fedgru hospital init`` writes (the noise
        floor, the per-round ceiling, the clipping range, the per-run counts, the bin and
        size limits), with the simulation's own budgets, delta and split shares, so that a
        config that runs simulated runs deployed. Its training budget is
        ``privacy.max_epsilon`` (or its ``hospital_max_epsilon``); its validation and test
        patients' budget is the largest of that and the run's ``val_epsilon`` and
        ``test_epsilon``. Only a simulation may compare without DP."""
        budget = cfg.privacy.budget_for(hospital)
        ev = cfg.evaluation
        policy = default_policy(budget, cfg.privacy.delta_for(train_examples), max(budget, ev.val_epsilon, ev.test_epsilon))
        return dataclasses.replace(policy, split=SplitFractions(cfg.split.train, cfg.split.val, cfg.split.test),
                                   allow_without_dp=True, min_honest=cfg.privacy.min_honest,
                                   max_epsilon_alone=cfg.privacy.max_epsilon_alone,
                                   max_colluding=cfg.privacy.max_colluding)


def default_policy(max_epsilon: float, delta: float, eval_epsilon: float) -> Policy:
    """What ``fedgru hospital init`` writes unless told otherwise (each line commented there)."""
    return Policy(
        max_epsilon=max_epsilon,
        delta=delta,
        eval_max_epsilon=eval_epsilon,
        min_noise_multiplier=0.5,
        max_epsilon_per_round=max_epsilon / 2,
        clipping_norm=[0.01, 10.0],
        evaluation_splits=[Split.VAL, Split.TEST],
        max_evaluations_per_run={Split.VAL.value: 10, Split.TEST.value: 1},
        max_histogram_bins=20,
        split=SplitFractions(0.7, 0.1, 0.2),
        max_model_parameters=DEFAULT_MAX_MODEL_PARAMETERS,
        max_message_bytes=DEFAULT_MAX_MESSAGE_BYTES,
        max_micro_batch=DEFAULT_MAX_MICRO_BATCH,
        min_honest=DEFAULT_MIN_HONEST,
        max_epsilon_alone=DEFAULT_MAX_EPSILON_ALONE,
    )
