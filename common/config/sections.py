"""The sections of an experiment config: each key's type and meaning, and each
section's own checks.

Values live in ``configs/default.yaml``, the one source of defaults: these dataclasses
carry none of their own (except a feature's optional attributes, which default as
written here), so a key missing from ``default.yaml`` is an error rather than a second,
silently different default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message says where and why."""


class Check:
    """``check(ok, key, why)`` raises a ConfigError naming the file and the dotted key."""

    def __init__(self, origin: str, section: str):
        self.origin, self.section = origin, section

    def __call__(self, ok: bool, key: str, why: str) -> None:
        if not ok:
            dotted = f"{self.section}.{key}" if key else self.section
            raise ConfigError(f"{self.origin}: '{dotted}' {why}")


def auto_delta(num_examples: int) -> float:
    """``delta: auto``: min(1e-5, 1 / (10 n)), rounded down to a power of ten: always below
    1/n for the n patients protected, and, since every ledger states it, telling no more
    than n's order of magnitude."""
    exact = min(1e-5, 1.0 / (10 * max(num_examples, 1)))
    return 10.0 ** math.floor(math.log10(exact) + 1e-12)


# ----------------------------------------------------------------------------------
# Feature specifications (one entry of features.variables / features.static)
# ----------------------------------------------------------------------------------


@dataclass
class VariableSpec:
    """One time-varying variable. Optional attributes default as written here.

    ``center``/``scale`` are fixed constants written in the config (clinical reference
    values), never statistics of any hospital's data: normalisation releases nothing.
    """

    name: str  # parameter name as it appears in the data files
    low: float | None = None  # plausibility range: values outside become missing
    high: float | None = None
    center: float = 0.0  # value -> (value - center) / scale (after log1p if log)
    scale: float = 1.0
    log: bool = False  # apply log1p first (skewed laboratory values)
    binary: bool = False  # 0/1 indicator: used as is, no normalisation
    unit: str = ""  # clinical unit, as explanations print values
    # The textbook normal value of the patient explanations are measured against, where
    # ``center`` (a normalisation constant) is not it (GCS 15 against a center of 11);
    # None: ``center`` (0 for a binary variable). It changes no input the model reads.
    normal: float | None = None
    # The normal patient has no charted value of it at all: a variable charted only when
    # abnormal (PhysioNet charts MechVent only as 1, FiO2 only under oxygen). Explanations
    # then measure a charted value against not being charted; changes no model input.
    normal_uncharted: bool = False


@dataclass
class StaticSpec:
    """One per-stay descriptor (age, sex, ICU type, ...). Optional attributes default as written here."""

    name: str
    kind: Literal["continuous", "categorical"] = "continuous"
    categories: list[float] = field(default_factory=list)  # categorical: one-hot
    low: float | None = None  # continuous: plausibility range
    high: float | None = None
    center: float = 0.0
    scale: float = 1.0
    log: bool = False
    missing: list[float] = field(default_factory=lambda: [-1.0])  # codes meaning "unknown"
    unit: str = ""  # continuous: clinical unit, as explanations print values
    labels: dict[str, str] = field(default_factory=dict)  # categorical: category -> name in reports
    normal: float | None = None  # continuous: explanations' reference value (None: ``center``), as for variables


# ----------------------------------------------------------------------------------
# Sections: types and meaning here, values in configs/default.yaml
# ----------------------------------------------------------------------------------


@dataclass
class RunSection:
    name: str  # label for the run folder and reports
    seed: int  # seeds partitions, splits and the initial model (DP noise never: hospitals seed it from the OS)
    rounds: int  # federated rounds
    out_dir: str  # run folders are created inside: <out_dir>/<timestamp>/

    def validate(self, check: Check) -> None:
        check(self.rounds >= 1, "rounds", "must be at least 1")


@dataclass
class DataSection:
    format: Literal["physionet2012", "long_csv"]
    # physionet2012: a folder of <RecordID>.txt files or PhysioNet's set-*.tar.gz.
    # long_csv: a CSV with columns stay_id,time_hours,variable,value.
    path: str
    # physionet2012: Outcomes-*.txt. long_csv: a CSV with columns stay_id,label.
    outcomes: str
    id_column: str  # stay id column of the outcomes file
    max_stays: int  # > 0: use only the first N stays (by id), for quick runs
    cache: bool  # cache preprocessed tensors (in $FEDGRU_CACHE or ~/.cache/fedgru)

    def validate(self, check: Check) -> None:
        check(self.max_stays >= 0, "max_stays", "must be 0 (all) or a positive count")


@dataclass
class TaskSection:
    label_column: str  # column of the outcomes file
    classes: list[str]  # class names in index order; two -> sigmoid head, more -> softmax
    # Without bins the label value must be the class index (0, 1, ...).
    # With bins, class k holds values in (bins[k-1], bins[k]]; len(bins) = classes - 1.
    bins: list[float]
    missing_label: list[float]  # outcome values meaning "unknown": the stay is left out

    def validate(self, check: Check) -> None:
        check(len(self.classes) >= 2, "classes", "needs at least two classes")
        check(
            not self.bins or len(self.bins) == len(self.classes) - 1,
            "bins", f"needs {len(self.classes) - 1} edges for {len(self.classes)} classes",
        )
        check(sorted(self.bins) == self.bins, "bins", "must be increasing")


@dataclass
class FeatureSection:
    window_hours: float  # observation window from admission
    bin_hours: float  # width of one time step
    observed_mask: bool  # add observed-in-this-bin channels
    time_since_last: bool  # add hours-since-last-observation channels
    delta_scale_hours: float  # those hours are divided by this
    variables: list[VariableSpec]
    # Names of `variables` the model reads; []: all of them. Applied when the config loads
    # (`select_variables`), so everything downstream sees only the chosen variables.
    select: list[str]
    static: list[StaticSpec]

    def validate(self, check: Check) -> None:
        check(self.window_hours > 0 and self.bin_hours > 0, "window_hours", "and features.bin_hours must be positive")
        steps = self.window_hours / self.bin_hours
        check(abs(steps - round(steps)) <= 1e-9, "bin_hours", "must divide features.window_hours")
        check(bool(self.variables), "variables", "must list at least one variable")
        names = [v.name for v in self.variables]
        dupes = sorted({n for n in names if names.count(n) > 1})
        check(not dupes, "variables", f"lists {', '.join(dupes)} more than once")
        for i, v in enumerate(self.variables):
            check(v.scale > 0, f"variables[{i}].scale", "must be positive")
            check(v.low is None or v.high is None or v.low <= v.high, f"variables[{i}]", "has low > high")
            check(_plausible(v.normal, v.low, v.high) and (not v.binary or v.normal in (None, 0, 1)),
                  f"variables[{i}].normal", "must lie within its low and high (0 or 1 for a binary variable)")
            check(v.normal is None or not v.normal_uncharted, f"variables[{i}].normal_uncharted",
                  "and normal exclude each other: the normal patient has a value of it or none")
        for i, s in enumerate(self.static):
            check(s.kind != "categorical" or bool(s.categories), f"static[{i}].categories", "must list the categories")
            check(s.scale > 0, f"static[{i}].scale", "must be positive")
            check(_plausible(s.normal, s.low, s.high) and (s.kind == "continuous" or s.normal is None),
                  f"static[{i}].normal", "must lie within its low and high (continuous descriptors only)")


def _plausible(value: float | None, low: float | None, high: float | None) -> bool:
    return value is None or ((low is None or value >= low) and (high is None or value <= high))


@dataclass
class SplitSection:
    train: float  # fractions inside each simulated hospital, stratified by label
    val: float
    test: float
    seed: int  # mixed with run.seed
    # > 0: the test split is fold `fold` of `folds` stratified folds of each hospital's
    # stays (so `folds` runs test every stay once); validation is `val` of the rest.
    folds: int
    fold: int
    # < 1: each hospital trains on this stratified share of its training split (nested:
    # a smaller share is a subset of a larger one); validation and test stay whole.
    train_fraction: float = 1.0

    def validate(self, check: Check) -> None:
        fractions = (self.train, self.val, self.test)
        check(min(fractions) >= 0 and abs(sum(fractions) - 1) <= 1e-6, "", "fractions must be non-negative and add up to 1")
        check(self.train > 0, "train", "must be positive")
        check(self.folds == 0 or (self.folds >= 2 and 0 <= self.fold < self.folds), "fold", "must be in [0, folds)")
        check(0 < self.train_fraction <= 1, "train_fraction", "must be in (0, 1]")


@dataclass
class PartitionSection:
    # icu_type: one hospital per ICU type (a `column` partition on ICUType).
    # column: one hospital per value of a categorical static variable.
    # iid: stratified random split into num_hospitals.
    # dirichlet: label skew, class shares per hospital ~ Dirichlet(alpha).
    scheme: Literal["icu_type", "column", "iid", "dirichlet"]
    column: str  # for `column`
    names: dict[str, str]  # column value -> hospital name
    num_hospitals: int  # for iid / dirichlet
    alpha: float  # for dirichlet: smaller = more skew

    def validate(self, check: Check) -> None:
        if self.scheme in ("iid", "dirichlet"):
            check(self.num_hospitals >= 1, "num_hospitals", "must be at least 1")
        if self.scheme == "dirichlet":
            check(self.alpha > 0, "alpha", "must be positive")


# What a unit of a carry-forward GRU can read (model.carry_units; common.model.carry_forward_init).
CARRY_UNITS = ("value", "high", "low", "seen", "worst_high", "worst_low")


@dataclass
class ModelSection:
    # stacked: GRUs over all channels of a time step together.
    # per_variable: one small GRU, shared by every variable, reads each variable's own
    #   channels (value, mask, hours since) separately; the head sees every variable's
    #   final state. Far fewer weights, so far less DP noise in the model.
    architecture: Literal["stacked", "per_variable"]
    gru_hidden: list[int]  # GRU layer sizes
    dropout: float  # between GRU layers and before the head
    head_hidden: int  # dense layer before the output (0: none)
    pool: Literal["last", "mean", "last_mean"]  # how GRU outputs over time feed the head
    zero_init_head: bool  # start the output layer at zero: every patient starts at p = 0.5
    input_skip: bool  # also feed the last time step's input channels to the head
    gru_impl: Literal["fast", "opacus", "torch"]  # torch: non-private only
    # random: PyTorch's default initialisation. carry_forward (per_variable, one layer of
    # >= 2 units, observed_mask on): each unit starts as a reader of its variable's last
    # observation (common.model.carry_forward_init), data-independent.
    init: Literal["random", "carry_forward"]
    train_gru: bool  # false: the GRU keeps its initial weights (no noise on them); only the head learns
    # A model bundle (model.pt) whose weights start the run instead of `init`'s: a model
    # trained on public data, or an earlier run's (server.start_model); "": none.
    init_from: str
    # carry_forward only: what each GRU unit reads (CARRY_UNITS: value, high, low, seen,
    # worst_high, worst_low; common.model.carry_forward_init), as many as gru_hidden[0]. []: value, high, low, seen, ...
    carry_units: list[str]

    def validate(self, check: Check) -> None:
        check(bool(self.gru_hidden) and min(self.gru_hidden) >= 1, "gru_hidden", "must list positive layer sizes")
        if self.init == "carry_forward":
            check(self.architecture == "per_variable" and len(self.gru_hidden) == 1
                  and self.gru_hidden[0] >= (1 if self.carry_units else 2),
                  "init", "carry_forward needs architecture per_variable and one GRU layer of at least 2 units "
                  "(for other shapes set model.init=random and model.train_gru=true)")
        if self.carry_units:
            check(self.init == "carry_forward", "carry_units",
                  "only applies to model.init=carry_forward (set it, or carry_units=[])")
            unknown = [u for u in self.carry_units if u not in CARRY_UNITS]
            check(not unknown, "carry_units", f"has unknown unit(s) {unknown}; choose from {', '.join(CARRY_UNITS)}")
            check(len(set(self.carry_units)) == len(self.carry_units), "carry_units", "names a unit twice")
            check(len(self.carry_units) == self.gru_hidden[0], "carry_units",
                  f"names {len(self.carry_units)} units but model.gru_hidden is {self.gru_hidden}: "
                  f"set model.gru_hidden=[{len(self.carry_units)}]")
        check(
            not (self.architecture == "per_variable" and self.gru_impl == "opacus"),
            "gru_impl", "'opacus' (DPGRU) cannot share one GRU across variables; use 'fast'",
        )
        check(0 <= self.dropout < 1, "dropout", "must be in [0, 1)")
        check(self.head_hidden >= 0, "head_hidden", "must be 0 (a linear head) or a layer size")


@dataclass
class TrainingSection:
    local_epochs: float  # passes over the hospital's training split per round
    batch_size: int  # expected (Poisson) batch size
    # > 0: every hospital samples this fraction of its training split per step instead
    # (expected batch = sample_rate x its size), so all hospitals share one sample rate.
    sample_rate: float
    optimizer: Literal["sgd", "adam"]
    lr: float
    lr_schedule: Literal["constant", "cosine"]  # over the planned rounds
    momentum: float  # sgd only
    weight_decay: float
    keep_optimizer_state: bool  # carry local optimizer state across rounds
    positive_weight: float  # binary: loss weight of the positive class
    hourly_loss: bool  # binary: the loss of the risk after every hour, not only at the end (early warning)
    device: Literal["auto", "cpu", "cuda"]
    threads: int  # torch threads per hospital (0: leave torch's default)

    def validate(self, check: Check) -> None:
        check(self.batch_size >= 1, "batch_size", "must be at least 1")
        check(0 <= self.sample_rate <= 1, "sample_rate", "must be in [0, 1] (0: use training.batch_size)")
        check(self.local_epochs > 0, "local_epochs", "must be positive")
        check(self.lr > 0, "lr", "must be positive")
        # momentum 1 never forgets a gradient: every round's would carry on, undamped
        check(0 <= self.momentum < 1, "momentum", "must be in [0, 1)")
        check(self.weight_decay >= 0, "weight_decay", "must not be negative")
        check(self.positive_weight > 0, "positive_weight", "must be positive")


@dataclass
class PrivacySection:
    enabled: bool
    # Exactly one of these: a fixed noise multiplier, or a target epsilon for the whole
    # planned run (sigma calibrated once, before round 1).
    noise_multiplier: float
    target_epsilon: float
    delta: Literal["auto"] | float  # "auto": auto_delta(n) for each hospital's n, i.e. always below 1/n
    max_grad_norm: float  # per-example clipping norm
    # flat: clip each example's whole gradient to max_grad_norm. per_layer: clip each
    # parameter tensor to max_grad_norm / sqrt(tensors), so a large head gradient cannot
    # crowd out the GRU's share (same sensitivity, same noise).
    clipping: Literal["flat", "per_layer"]
    accountant: Literal["rdp", "prv"]  # drives calibration and budget decisions
    # Each hospital's budget at its delta, over every round and every run on its data.
    # A hospital stops before a round that would take it past this.
    max_epsilon: float
    hospital_max_epsilon: dict[str, float]  # per-hospital overrides
    # per_hospital: each hospital adds the whole DP-SGD noise to its own update (the
    # coordinator sees every update). secure: secure aggregation with distributed Skellam
    # noise (common.secagg, common.skellam): one full-batch step per round, each hospital
    # adds a share of the noise, the coordinator sees only the sum.
    aggregation: Literal["per_hospital", "secure"]
    # simulated hospitals' secure aggregation policy (a real hospital's own policy.yaml sets its own)
    min_honest: int
    max_epsilon_alone: float
    secure_threshold: int  # secure: shares that rebuild a secret (0: a majority of the round's hospitals)
    # simulated hospitals' policy: the most other hospitals each allows to side with the
    # coordinator (it refuses thresholds with 2t <= n + max_colluding); a default, so that
    # run folders written before it still load
    max_colluding: int = 0
    # secure: the dropouts every round must survive, however strict a hospital's policy: a
    # hospital whose policy's least threshold leaves fewer is left out of the sessions
    # (server.secure_round.SecureRounds.session_nodes); 0 follows every policy a round can satisfy
    secure_min_dropouts: int = 0

    def budget_for(self, hospital: str) -> float:
        return self.hospital_max_epsilon.get(hospital, self.max_epsilon)

    def delta_for(self, num_examples: int) -> float:
        return auto_delta(num_examples) if self.delta == "auto" else float(self.delta)

    def validate(self, check: Check) -> None:
        if not self.enabled:
            return
        check(
            (self.noise_multiplier > 0) != (self.target_epsilon > 0),
            "", "needs exactly one of noise_multiplier > 0 or target_epsilon > 0 (set the other to 0)",
        )
        check(self.delta == "auto" or 0 < self.delta < 1, "delta", "must be 'auto' or a number in (0, 1)")
        budgets = [self.max_epsilon, *self.hospital_max_epsilon.values()]
        check(min(budgets) > 0, "max_epsilon", "budgets must be positive")
        check(self.max_grad_norm > 0, "max_grad_norm", "must be positive")
        check(self.min_honest >= 1 and self.max_epsilon_alone > 0, "min_honest",
              "must be at least 1, and max_epsilon_alone positive")
        check(self.secure_threshold >= 0, "secure_threshold", "must be 0 (a majority) or a number of hospitals")
        check(self.secure_min_dropouts >= 0, "secure_min_dropouts", "must be 0 or more")
        check(self.max_colluding >= 0, "max_colluding", "must be 0 or the number of other hospitals allowed to side "
              "with the coordinator")


@dataclass
class HospitalDPSection:
    """Optional hospital-level (client-level) DP on top of DP-SGD: each hospital's
    update is clipped and the aggregate is noised by the server (Flower's
    DifferentialPrivacyServerSideFixedClipping, McMahan et al. arXiv:1710.06963),
    accounted by Flower's RDP accountant. A second, separate guarantee: it protects
    whether a hospital took part, against anyone who sees the global models (not
    against the coordinator, which sees the updates)."""

    enabled: bool
    noise_multiplier: float  # noise std = noise_multiplier x clipping_norm / hospitals
    clipping_norm: float  # L2 bound on each hospital's update (its weights - global)
    delta: float  # hospital-level delta (few hospitals: keep it well below 1/count)
    max_epsilon: float  # > 0: end the run before a release that would pass it

    def validate(self, check: Check) -> None:
        if self.enabled:
            check(
                self.noise_multiplier > 0 and self.clipping_norm > 0 and 0 < self.delta < 1,
                "", "needs noise_multiplier > 0, clipping_norm > 0 and delta in (0, 1)",
            )


@dataclass
class StrategySection:
    name: Literal["fedavg", "fedprox", "fedavgm", "fedadam"]
    proximal_mu: float  # fedprox
    server_lr: float  # fedadam: eta; fedavgm: the server's learning rate
    server_momentum: float  # fedavgm: momentum on the averaged update (0: none)
    beta_1: float  # fedadam
    beta_2: float  # fedadam
    tau: float  # fedadam
    min_hospitals: int  # fewer usable replies -> the round is skipped
    round_timeout_s: float  # bound on the wait for replies
    discovery_timeout_s: float  # bound on the wait for min_hospitals to say who they are
    max_examples: int  # replies claiming more examples are rejected
    max_update_norm: float  # a reply whose update (its weights - the global model) is longer, in L2, is rejected
    average_decay: float  # the final model: an exponential average of the rounds' global models (0: the last one)

    def validate(self, check: Check) -> None:
        check(self.min_hospitals >= 1, "min_hospitals", "must be at least 1")
        check(self.max_update_norm > 0, "max_update_norm", "must be positive")
        check(self.round_timeout_s > 0, "round_timeout_s", "must be positive")
        check(self.discovery_timeout_s > 0, "discovery_timeout_s", "must be positive")
        check(0 <= self.average_decay < 1, "average_decay", "must be at least 0 and below 1 (0: the last round's model)")


@dataclass
class SubgroupSpec:
    """Test patients grouped by one descriptor, for metrics per group in the report (from
    a DP release). Categorical descriptors group by category; continuous ones by bands."""

    name: str  # as the report shows it
    column: str  # a descriptor in features.static
    bands: list[float] = field(default_factory=list)  # continuous: cut points; group k holds [bands[k-1], bands[k])


@dataclass
class EvaluationSection:
    """How the global model is scored: every hospital releases, per true class, a count of
    its validation or test patients in each bin of predicted risk, with Gaussian noise
    (a DP release about those patients, in the hospital's ledger)."""

    score_bins: int  # bins per class of a released score histogram (a hospital's policy caps it)
    logit_range: list[float]  # [low, high] of the bins, in log-odds of the predicted risk
    validate_every: int  # a validation histogram of the global model every N rounds (0: the final model's only)
    dp: bool  # noisy (DP) histograms; false only in simulations, to compare with exact ones
    # How the server reads metrics from DP histograms (post-processing, no privacy cost):
    # "skewnormal" fits a skew-normal distribution of logits to each class's noisy
    # histogram and reads its expected counts (common.estimates); "binormal" a normal, which
    # reads the decisions of real models' skewed scores high (specificity by about 0.04);
    # "binned" reads the counts clipped at zero, which pulls the AUROC towards 0.5. Exact
    # (dp: false) histograms are read binned.
    estimator: Literal["skewnormal", "binormal", "binned"]
    val_epsilon: float  # the validation patients' epsilon for all of one run's validation releases
    test_epsilon: float  # the test patients' epsilon for the run's one test release
    final_share: float  # the final model's share of val_epsilon (in rho; the progress releases split the rest)
    # Binary tasks: the risk at or above which a patient is flagged (accuracy,
    # sensitivity, specificity, F1, event-1); the test metrics and the bundle use it. A
    # risk: a clinical level for this task, read from nothing (the default's, for
    # in-hospital death). "auto": after the last round, the risk that flags flag_rate of
    # the patients on the pooled validation releases; "event1": the bin edge with the best
    # event-1 score min(Se, +P) there (both read released data: nothing new is released).
    threshold: Literal["auto", "event1"] | float
    # "auto": flag this share of patients, the highest risks (read from the pooled validation
    # releases' fitted distribution: a rule that reads little from the noise). Clinicians
    # choose it: how many alarms the ward can act on.
    flag_rate: float
    # Binary tasks: after the last round, refit the risk scale (Platt scaling) on the same
    # pooled validation histograms and fold it into the output layer. Ranking (AUROC)
    # unchanged; risks become meaningful. Post-processing of released data: no new release.
    calibrate: bool
    # Binary tasks, released with the final test histogram under the same test_epsilon:
    # score histograms per group of test patients (metrics per group, calibration by group),
    # and the mean size of each variable's contribution to the risk (what the model leans on).
    subgroups: list[SubgroupSpec]
    subgroup_bins: int  # bins per class of each group's histogram (coarse: a group is small against the noise)
    importance: bool
    # Shares (in rho) of test_epsilon for the per-group histograms and the importance; the
    # pooled test histogram, which the headline metrics read, gets the rest. Less for it
    # means more noise there, and noisy histograms pull the AUROC estimate towards 0.5.
    subgroup_share: float
    importance_share: float
    # Binary tasks, released with the final validation histogram under the same val_epsilon:
    # each validation patient's risk after these hours, one noisy histogram per hour, from
    # which the decision threshold of each hour is read (the same flag rate at every hour,
    # so an hourly risk means the same at hour 6 as at hour 48); [] for one threshold.
    hourly_checkpoints: list[int]
    hourly_share: float  # of the final validation release's budget (in rho) for those histograms
    # Binary tasks: the share of stays the hourly monitor flags at some hour of the window.
    # A flag stays on once raised: the monitor flags a stay from the first hour its risk
    # passes that hour's threshold by a margin, read (with the test release) from a noisy
    # histogram of each validation stay's highest excess over the hour thresholds. 0: each
    # hour flags by its own threshold alone, on and off (about 0.6 of stays at some hour).
    monitor_rate: float
    onset_share: float  # of the final validation release's budget (in rho) for that histogram
    # "laplace": each hospital's onset histogram gets discrete Laplace noise, which in the
    # same room carries less noise than the Gaussian (common.laplace); "gaussian". Under
    # secure aggregation it is a sum of Skellam shares like every release, whatever this says.
    onset_noise: Literal["laplace", "gaussian"]

    @property
    def level(self) -> float | None:
        """The configured clinical level (a risk), or None under a rule that reads one."""
        t = self.threshold
        return float(t) if isinstance(t, (int, float)) and not isinstance(t, bool) else None

    def validate(self, check: Check) -> None:
        check(self.score_bins >= 2, "score_bins", "must be at least 2")
        check(
            len(self.logit_range) == 2 and self.logit_range[0] < self.logit_range[1],
            "logit_range", "must be [low, high] with low < high",
        )
        check(self.validate_every >= 0, "validate_every", "must be 0 (final model only) or a number of rounds")
        check(self.val_epsilon > 0 and self.test_epsilon > 0, "val_epsilon", "and evaluation.test_epsilon must be positive")
        check(0 < self.final_share <= 1, "final_share", "must be in (0, 1]")
        check(2 <= self.subgroup_bins <= self.score_bins, "subgroup_bins", "must be between 2 and evaluation.score_bins")
        check(self.subgroup_share >= 0 and self.importance_share >= 0
              and self.subgroup_share + self.importance_share < 1, "subgroup_share",
              "and evaluation.importance_share must be >= 0 and leave the test histogram a share (sum below 1)")
        check(all(isinstance(h, int) and h >= 1 for h in self.hourly_checkpoints)
              and sorted(set(self.hourly_checkpoints)) == self.hourly_checkpoints, "hourly_checkpoints",
              "must list increasing hours (1 or more) without repeats")
        check(0 <= self.hourly_share < 1 and (self.hourly_share > 0) == bool(self.hourly_checkpoints), "hourly_share",
              "must be in (0, 1) with hourly_checkpoints, 0 without")
        check(self.threshold in ("auto", "event1") or 0 < self.threshold < 1, "threshold",
              "must be 'auto', 'event1' or a risk strictly between 0 and 1")
        if self.level is not None and 0 < self.level < 1 and len(self.logit_range) == 2:
            # a decision at the level reads the histograms' bin edge at it (each grid is shifted by
            # under half a bin to put one there); at the grid's end there is none, and the metrics
            # would silently be read at another risk
            low, high = self.logit_range
            at = math.log(self.level) - math.log1p(-self.level)
            inner = all(1 <= round((at - low) / ((high - low) / bins)) <= bins - 1
                        for bins in (self.score_bins, self.subgroup_bins))
            check(inner, "threshold", f"{self.level:g} (log-odds {at:+.2f}) lies at or beyond the end of "
                  f"evaluation.logit_range [{low:g}, {high:g}], where the histograms have no bin edge to read a "
                  "decision at: widen logit_range or choose a risk inside it")
        check(0 < self.flag_rate < 1, "flag_rate", "must be a share strictly between 0 and 1")
        check(0 <= self.monitor_rate < 1, "monitor_rate", "must be a share in [0, 1) (0: no margin, flags on and off)")
        check(0 <= self.onset_share < 1 and (self.onset_share > 0) == (self.monitor_rate > 0)
              and self.hourly_share + self.onset_share < 1, "onset_share",
              "must be in (0, 1) with monitor_rate, 0 without, and leave the final histogram a share with hourly_share")


