"""Typed, validated experiment configuration.

A run is described by one YAML file (``configs/default.yaml`` by default). The file
may ``extends:`` another one (paths relative to itself) and is then deep-merged over
it, so a new task is a few lines of YAML, not code. Dotted overrides
(``training.lr=0.5``) are applied last. The result is checked against the
dataclasses below: unknown keys, wrong types and impossible values are reported with
the file they came from and the dotted key, before anything runs.

The same :class:`ExperimentConfig` travels from the server to every hospital inside
Flower messages (as JSON), so both sides always agree on features, model and privacy
settings. Hospital-specific settings (data path, device, budget) come from the
hospital's own node config instead.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message says where and why."""


# ----------------------------------------------------------------------------------
# Feature specifications
# ----------------------------------------------------------------------------------


@dataclass
class VariableSpec:
    """One time-varying variable.

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


@dataclass
class StaticSpec:
    """One per-stay descriptor (age, sex, ICU type, ...)."""

    name: str
    kind: Literal["continuous", "categorical"] = "continuous"
    categories: list[float] = field(default_factory=list)  # categorical: one-hot
    low: float | None = None  # continuous: plausibility range
    high: float | None = None
    center: float = 0.0
    scale: float = 1.0
    log: bool = False
    missing: list[float] = field(default_factory=lambda: [-1.0])  # codes meaning "unknown"


# ----------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------


@dataclass
class RunSection:
    name: str = "fedgru"  # label for the run folder and reports
    seed: int = 42  # seeds splits, partitions, model init and DP noise
    rounds: int = 20  # federated rounds
    out_dir: str = "runs"  # run folders are created inside: <out_dir>/<timestamp>/


@dataclass
class DataSection:
    format: Literal["physionet2012", "long_csv"] = "physionet2012"
    # physionet2012: a folder of <RecordID>.txt files or PhysioNet's set-*.tar.gz.
    # long_csv: a CSV with columns stay_id,time_hours,variable,value.
    path: str = "../shared/data/physionet2012/set-a.tar.gz"
    # physionet2012: Outcomes-*.txt. long_csv: a CSV with columns stay_id,label.
    outcomes: str = "../shared/data/physionet2012/Outcomes-a.txt"
    id_column: str = "RecordID"  # stay id column of the outcomes file
    max_stays: int = 0  # > 0: use only the first N stays (by id), for quick runs
    cache: bool = True  # cache preprocessed tensors (in $FEDGRU_CACHE or ~/.cache/fedgru)


@dataclass
class TaskSection:
    label_column: str = "In-hospital_death"  # column of the outcomes file
    # Class names, in index order. Two classes -> sigmoid head, more -> softmax.
    classes: list[str] = field(default_factory=lambda: ["survived", "died"])
    # Without bins the label value must be the class index (0, 1, ...).
    # With bins, class k holds values in (bins[k-1], bins[k]]; len(bins) = classes - 1.
    bins: list[float] = field(default_factory=list)
    missing_label: list[float] = field(default_factory=lambda: [-1.0])  # stays dropped


@dataclass
class FeatureSection:
    window_hours: float = 48.0  # observation window from admission
    bin_hours: float = 1.0  # width of one time step
    observed_mask: bool = True  # add observed-in-this-bin channels
    time_since_last: bool = True  # add hours-since-last-observation channels
    delta_scale_hours: float = 48.0  # those hours are divided by this
    variables: list[VariableSpec] = field(default_factory=list)
    static: list[StaticSpec] = field(default_factory=list)


@dataclass
class SplitSection:
    train: float = 0.7  # fractions inside each hospital, stratified by label
    val: float = 0.1
    test: float = 0.2
    seed: int = 0  # mixed with run.seed


@dataclass
class PartitionSection:
    # icu_type: one hospital per ICU type (a `column` partition on ICUType).
    # column: one hospital per value of a categorical static variable.
    # iid: stratified random split into num_hospitals.
    # dirichlet: label skew, class shares per hospital ~ Dirichlet(alpha).
    scheme: Literal["icu_type", "column", "iid", "dirichlet"] = "icu_type"
    column: str = "ICUType"  # for `column`
    names: dict[str, str] = field(default_factory=dict)  # column value -> hospital name
    num_hospitals: int = 4  # for iid / dirichlet
    alpha: float = 0.5  # for dirichlet: smaller = more skew


@dataclass
class ModelSection:
    # stacked: GRUs over all channels of a time step together.
    # per_variable: one small GRU, shared by every variable, reads each variable's own
    #   channels (value, mask, hours since) separately; the head sees every variable's
    #   final state. Far fewer weights, so far less DP noise in the model.
    architecture: Literal["stacked", "per_variable"] = "stacked"
    gru_hidden: list[int] = field(default_factory=lambda: [128, 64])  # GRU layer sizes
    dropout: float = 0.2  # between GRU layers and before the head
    head_hidden: int = 32  # dense layer before the output (0: none)
    pool: Literal["last", "mean", "last_mean"] = "last"  # how GRU outputs over time feed the head
    zero_init_head: bool = False  # start the output layer at zero: every patient starts at p = 0.5
    input_skip: bool = False  # also feed the last time step's input channels to the head
    gru_impl: Literal["fast", "opacus", "torch"] = "fast"  # torch: non-private only


@dataclass
class TrainingSection:
    local_epochs: float = 1.0  # passes over the hospital's training split per round
    batch_size: int = 64  # expected (Poisson) batch size
    # > 0: every hospital samples this fraction of its training split per step instead
    # (expected batch = sample_rate x its size), so all hospitals share one sample rate.
    sample_rate: float = 0.0
    optimizer: Literal["sgd", "adam"] = "adam"
    lr: float = 1e-3
    lr_schedule: Literal["constant", "cosine"] = "constant"  # over the planned rounds
    momentum: float = 0.0  # sgd only
    weight_decay: float = 0.0
    keep_optimizer_state: bool = True  # carry local optimizer state across rounds
    positive_weight: float = 1.0  # binary: loss weight of the positive class
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = 0  # torch threads per hospital (0: leave torch's default)


@dataclass
class PrivacySection:
    enabled: bool = True
    # Exactly one of these: a fixed noise multiplier, or a target epsilon for the
    # whole planned run (sigma calibrated once, before round 1).
    noise_multiplier: float = 0.0
    target_epsilon: float = 1.0
    # "auto": min(1e-5, 1 / (10 n)) for each hospital's n, i.e. always below 1/n.
    delta: Literal["auto"] | float = "auto"
    max_grad_norm: float = 1.0  # per-example clipping norm
    # flat: clip each example's whole gradient to max_grad_norm. per_layer: clip each
    # parameter tensor to max_grad_norm / sqrt(tensors), so a large head gradient cannot
    # crowd out the GRU's share (same sensitivity, same noise).
    clipping: Literal["flat", "per_layer"] = "flat"
    accountant: Literal["rdp", "prv"] = "rdp"  # drives calibration and budget decisions
    # Each hospital's budget at its delta, over every round and every run on its data.
    # A hospital stops before a round that would take it past this.
    max_epsilon: float = 1.0
    hospital_max_epsilon: dict[str, float] = field(default_factory=dict)  # per-hospital overrides

    def budget_for(self, hospital: str) -> float:
        return self.hospital_max_epsilon.get(hospital, self.max_epsilon)

    def delta_for(self, num_training_examples: int) -> float:
        if self.delta == "auto":
            return min(1e-5, 1.0 / (10 * max(num_training_examples, 1)))
        return float(self.delta)


@dataclass
class HospitalDPSection:
    """Optional hospital-level (client-level) DP on top of DP-SGD: each hospital's
    update is clipped and the aggregate is noised by the server (Flower's
    DifferentialPrivacyServerSideFixedClipping, McMahan et al. arXiv:1710.06963),
    accounted by Flower's RDP accountant. A second, separate guarantee: it protects
    whether a hospital took part, against anyone who sees the global models (not
    against the coordinator, which sees the updates)."""

    enabled: bool = False
    noise_multiplier: float = 1.0  # noise std = noise_multiplier x clipping_norm / hospitals
    clipping_norm: float = 1.0  # L2 bound on each hospital's update (its weights - global)
    delta: float = 1e-3  # hospital-level delta (few hospitals: keep it well below 1/count)
    max_epsilon: float = 0.0  # > 0: end the run before a release that would pass it


@dataclass
class StrategySection:
    name: Literal["fedavg", "fedprox", "fedadam"] = "fedavg"
    proximal_mu: float = 0.0  # fedprox
    server_lr: float = 1.0  # fedadam: eta
    beta_1: float = 0.9  # fedadam
    beta_2: float = 0.99  # fedadam
    tau: float = 1e-3  # fedadam
    min_hospitals: int = 2  # fewer usable replies -> the round is skipped
    round_timeout_s: float = 3600.0  # bound on the wait for replies
    discovery_timeout_s: float = 300.0  # bound on the wait for min_hospitals to say who they are
    max_examples: int = 1_000_000  # replies claiming more examples are rejected


@dataclass
class EvaluationSection:
    score_bins: int = 400  # resolution of the score histograms hospitals report
    every_round: bool = True  # evaluate on validation splits each round
    # Binary tasks: the risk at or above which a patient is flagged (accuracy,
    # sensitivity, specificity, F1, event-1). "auto": after the last round, the one with
    # the best event-1 score min(Se, +P) on the pooled validation histograms (already
    # released, so choosing it releases nothing new); the test split and the bundle use it.
    threshold: Literal["auto"] | float = "auto"
    # Binary tasks: after the last round, refit the risk scale (Platt scaling) on the same
    # pooled validation histograms and fold it into the output layer. Ranking (AUROC)
    # unchanged; risks become meaningful. Post-processing of released data: no new release.
    calibrate: bool = True


@dataclass
class ExperimentConfig:
    run: RunSection = field(default_factory=RunSection)
    data: DataSection = field(default_factory=DataSection)
    task: TaskSection = field(default_factory=TaskSection)
    features: FeatureSection = field(default_factory=FeatureSection)
    split: SplitSection = field(default_factory=SplitSection)
    partition: PartitionSection = field(default_factory=PartitionSection)
    model: ModelSection = field(default_factory=ModelSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    privacy: PrivacySection = field(default_factory=PrivacySection)
    hospital_dp: HospitalDPSection = field(default_factory=HospitalDPSection)
    strategy: StrategySection = field(default_factory=StrategySection)
    evaluation: EvaluationSection = field(default_factory=EvaluationSection)
    source: str = ""  # file the config was loaded from (informational)

    # -- derived ---------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.task.classes)

    @property
    def is_binary(self) -> bool:
        return self.num_classes == 2

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any], origin: str = "<dict>") -> ExperimentConfig:
        cfg = _build(cls, data, origin, "")
        validate(cfg, origin)
        return cfg

    @classmethod
    def from_json(cls, text: str) -> ExperimentConfig:
        return cls.from_dict(json.loads(text), origin="<message>")


# ----------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------


def load_config(
    path: str | Path, overrides: list[str] | tuple[str, ...] = ()
) -> ExperimentConfig:
    """Load a YAML config (following ``extends``), apply ``key=value`` overrides."""
    path = Path(path)
    raw = _load_yaml_tree(path, seen=())
    for item in overrides:
        apply_override(raw, item)
    cfg = _build(ExperimentConfig, raw, str(path), "")
    cfg.source = str(path)
    validate(cfg, str(path))
    return cfg


def _load_yaml_tree(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    resolved = path.resolve()
    if resolved in seen:
        raise ConfigError(f"{path}: 'extends' loops back to itself")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} is not valid YAML ({exc.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    base_name = data.pop("extends", None)
    if base_name is None:
        return data
    base = _load_yaml_tree(path.parent / str(base_name), seen + (resolved,))
    return deep_merge(base, data)


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Mappings merge key by key; anything else (lists included) is replaced."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one ``dotted.key=value`` override; the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like dotted.key=value")
    key, _, text = item.partition("=")
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part!r} is not a section")
    node[parts[-1]] = value


def parse_override_string(text: str) -> list[str]:
    """Split the run-config ``set`` string ("a.b=1 c.d=x") into overrides."""
    return [tok for tok in text.split() if tok]


# ----------------------------------------------------------------------------------
# Dataclass construction with type checks
# ----------------------------------------------------------------------------------


def _build(cls: type, data: Any, origin: str, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: '{prefix or 'top level'}' must be a mapping")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in known:
            close = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(f"{origin}: unknown key '{dotted}'{hint}")
        kwargs[key] = _coerce(hints[key], value, origin, dotted)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, origin: str, dotted: str) -> Any:
    origin_tp = typing.get_origin(tp)
    args = typing.get_args(tp)
    where = f"{origin}: '{dotted}'"
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, origin, dotted + ".")
    if origin_tp in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, origin, dotted)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where} must not be empty")
    if origin_tp is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{where} is {value!r}; choose one of {choices}")
        return value
    if origin_tp is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list")
        return [_coerce(args[0], v, origin, f"{dotted}[{i}]") for i, v in enumerate(value)]
    if origin_tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping")
        return {
            _coerce(args[0], str(k), origin, dotted): _coerce(args[1], v, origin, f"{dotted}.{k}")
            for k, v in value.items()
        }
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, not {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where} must be a whole number, not {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str):
                try:
                    return float(value)  # YAML reads "1e-5" as a string
                except ValueError:
                    pass
            raise ConfigError(f"{where} must be a number, not {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where} must be text, not {value!r}")
        return str(value)
    raise ConfigError(f"{where}: unsupported type {tp}")  # pragma: no cover


# ----------------------------------------------------------------------------------
# Semantic validation
# ----------------------------------------------------------------------------------


def validate(cfg: ExperimentConfig, origin: str) -> None:
    """Cross-field checks that types alone cannot express."""

    def fail(key: str, why: str) -> None:
        raise ConfigError(f"{origin}: '{key}' {why}")

    if cfg.run.rounds < 1:
        fail("run.rounds", "must be at least 1")
    if len(cfg.task.classes) < 2:
        fail("task.classes", "needs at least two classes")
    if cfg.task.bins and len(cfg.task.bins) != len(cfg.task.classes) - 1:
        fail("task.bins", f"needs {len(cfg.task.classes) - 1} edges for {len(cfg.task.classes)} classes")
    if cfg.task.bins and sorted(cfg.task.bins) != cfg.task.bins:
        fail("task.bins", "must be increasing")
    f = cfg.features
    if f.window_hours <= 0 or f.bin_hours <= 0:
        fail("features.window_hours", "and features.bin_hours must be positive")
    steps = f.window_hours / f.bin_hours
    if abs(steps - round(steps)) > 1e-9:
        fail("features.bin_hours", "must divide features.window_hours")
    if not f.variables:
        fail("features.variables", "must list at least one variable")
    names = [v.name for v in f.variables]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        fail("features.variables", f"lists {', '.join(dupes)} more than once")
    for i, v in enumerate(f.variables):
        if v.scale <= 0:
            fail(f"features.variables[{i}].scale", "must be positive")
        if v.low is not None and v.high is not None and v.low > v.high:
            fail(f"features.variables[{i}]", "has low > high")
    for i, s in enumerate(f.static):
        if s.kind == "categorical" and not s.categories:
            fail(f"features.static[{i}].categories", "must list the categories")
        if s.scale <= 0:
            fail(f"features.static[{i}].scale", "must be positive")
    sp = cfg.split
    if min(sp.train, sp.val, sp.test) < 0 or abs(sp.train + sp.val + sp.test - 1) > 1e-6:
        fail("split", "fractions must be non-negative and add up to 1")
    if sp.train <= 0:
        fail("split.train", "must be positive")
    p = cfg.partition
    if p.scheme in ("iid", "dirichlet") and p.num_hospitals < 1:
        fail("partition.num_hospitals", "must be at least 1")
    if p.scheme == "dirichlet" and p.alpha <= 0:
        fail("partition.alpha", "must be positive")
    m = cfg.model
    if not m.gru_hidden or min(m.gru_hidden) < 1:
        fail("model.gru_hidden", "must list positive layer sizes")
    if m.architecture == "per_variable" and m.gru_impl == "opacus":
        fail("model.gru_impl", "'opacus' (DPGRU) cannot share one GRU across variables; use 'fast'")
    if not 0 <= m.dropout < 1:
        fail("model.dropout", "must be in [0, 1)")
    t = cfg.training
    if t.batch_size < 1:
        fail("training.batch_size", "must be at least 1")
    if not 0 <= t.sample_rate <= 1:
        fail("training.sample_rate", "must be in [0, 1] (0: use training.batch_size)")
    if t.local_epochs <= 0:
        fail("training.local_epochs", "must be positive")
    if t.lr <= 0:
        fail("training.lr", "must be positive")
    pr = cfg.privacy
    if pr.enabled:
        if m.gru_impl == "torch":
            fail("model.gru_impl", "'torch' (nn.GRU) has no per-example gradients; use 'fast' or 'opacus' with DP")
        if (pr.noise_multiplier > 0) == (pr.target_epsilon > 0):
            fail(
                "privacy",
                "needs exactly one of noise_multiplier > 0 or target_epsilon > 0 "
                "(set the other to 0)",
            )
        if pr.delta != "auto" and not 0 < pr.delta < 1:
            fail("privacy.delta", "must be 'auto' or a number in (0, 1)")
        if pr.max_epsilon <= 0 or any(v <= 0 for v in pr.hospital_max_epsilon.values()):
            fail("privacy.max_epsilon", "budgets must be positive")
        if pr.max_grad_norm <= 0:
            fail("privacy.max_grad_norm", "must be positive")
    hd = cfg.hospital_dp
    if hd.enabled:
        if cfg.strategy.name == "fedadam":
            fail("hospital_dp", "needs plain weighted averaging (fedavg or fedprox), not fedadam")
        if hd.noise_multiplier <= 0 or hd.clipping_norm <= 0 or not 0 < hd.delta < 1:
            fail("hospital_dp", "needs noise_multiplier > 0, clipping_norm > 0 and delta in (0, 1)")
    s = cfg.strategy
    if s.min_hospitals < 1:
        fail("strategy.min_hospitals", "must be at least 1")
    if s.round_timeout_s <= 0:
        fail("strategy.round_timeout_s", "must be positive")
    if s.discovery_timeout_s <= 0:
        fail("strategy.discovery_timeout_s", "must be positive")
    if cfg.evaluation.score_bins < 10:
        fail("evaluation.score_bins", "must be at least 10")
    if cfg.evaluation.threshold != "auto" and not 0 < cfg.evaluation.threshold < 1:
        fail("evaluation.threshold", "must be 'auto' or a risk strictly between 0 and 1")
