"""Checks every reply must pass before it may touch the global model or a metric.

The coordinator trusts no hospital either: a reply that fails a check is dropped with
a reason that names the node (by the id and name it registered, never by the name the
reply claims), and the round goes on with the others. A training reply must carry
exactly the expected weight arrays (keys, shapes, a floating dtype, finite values) and
an update no longer than ``strategy.max_update_norm``; exactly the expected metric keys,
finite; an example count that is a whole number in ``[1, max_examples]`` and equal to
what the hospital's own ledger says it sampled from; and a ledger that parses and
records this round's release with the run's settings. An evaluation record must have
the config's grid and shapes, finite values, and a matching ledger entry.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, Message

from common import laplace
from common import messages as M
from common.config import ExperimentConfig
from common.evaluation_noise import EvaluationNoise
from common.ledger import Ledger, LedgerEntry, LedgerError
from common.messages import Item, Mechanism, Split, evaluation_mechanism
from common.metrics import ScoreGrid, ScoreSummary
from common.privacy import steps_per_round
from common.subgroups import SubgroupSummary, groupings


class ReplyRejected(ValueError):
    pass


Layout = dict[str, tuple[tuple[int, ...], np.dtype]]


def expected_layout(arrays: ArrayRecord) -> Layout:
    return {k: (tuple(a.shape), np.dtype(a.numpy().dtype)) for k, a in arrays.items()}


def claimed_name(msg: Message) -> str:
    if msg.has_content() and M.STATUS in msg.content.config_records:
        return str(msg.content[M.STATUS].get(M.HOSPITAL, ""))
    return ""


def check_identity(msg: Message, registered: str) -> None:
    """A node speaks only for the hospital it registered as."""
    claimed = claimed_name(msg)
    if claimed and claimed != registered:
        raise ReplyRejected(f"the reply claims to come from {claimed!r}; this node registered as {registered!r}")


def read_ledger(msg: Message, hospital: str) -> Ledger:
    """The ledger a reply carries, every field checked (a coordinator cannot check the
    hospital's seal: it does not hold the hospital's secret)."""
    text = msg.content[M.STATUS].get(M.LEDGER) if M.STATUS in msg.content.config_records else None
    if not text:
        raise ReplyRejected("the reply carries no ledger")
    try:
        ledger = Ledger.from_plain(json.loads(str(text)), source="its ledger")
    except (ValueError, LedgerError) as exc:
        raise ReplyRejected(str(exc) if isinstance(exc, LedgerError) else "its ledger is not valid JSON") from None
    if ledger.hospital != hospital:
        raise ReplyRejected(f"its ledger belongs to {ledger.hospital!r}, not {hospital!r}")
    return ledger


def _entries(ledger: Ledger, run_id: str, server_round: int, split: Split) -> list[LedgerEntry]:
    return [e for e in ledger.entries if e.run_id == run_id and e.round == server_round and e.split == split]


def check_train_reply(
    msg: Message,
    layout: Layout,
    current: ArrayRecord,
    cfg: ExperimentConfig,
    ledger: Ledger,
    run_id: str,
    server_round: int,
    reject_empty: bool = False,
) -> int:
    """Raise :class:`ReplyRejected` with the reason when the reply is unusable; return
    the example count it may be weighted by.

    ``reject_empty``: a reply equal to the global model carries no update (Flower's
    hospital-level DP clipping divides by its norm).
    """
    if msg.has_error():
        raise ReplyRejected(f"the hospital reported an error ({msg.error.reason})")
    content = msg.content
    if M.ARRAYS not in content.array_records or any(
        name != M.ARRAYS and not name.startswith(M.EVALUATION_PREFIX) for name in content.array_records
    ):
        raise ReplyRejected("reply must carry one weight record named 'arrays' (and evaluation records only)")
    arrays = content[M.ARRAYS]
    got, want = set(arrays.keys()), set(layout)
    if got != want:
        missing, extra = sorted(want - got), sorted(got - want)
        raise ReplyRejected(f"weight keys differ from the global model (missing {missing}, unexpected {extra})")
    squared = 0.0
    for key, (shape, _dtype) in layout.items():
        try:
            arr = arrays[key].numpy()
        except Exception as exc:  # noqa: BLE001 - numpy's reader raises EOFError, BadZipFile, ... on forged bytes
            raise ReplyRejected(f"weight '{key}' cannot be read as an array ({exc.__class__.__name__})") from None
        if tuple(arr.shape) != shape:
            raise ReplyRejected(f"weight '{key}' has shape {tuple(arr.shape)}, expected {shape}")
        if not np.issubdtype(arr.dtype, np.floating):
            raise ReplyRejected(f"weight '{key}' has dtype {arr.dtype}, expected a float type")
        if not np.isfinite(arr).all():
            raise ReplyRejected(f"weight '{key}' contains NaN or infinite values")
        squared += float(np.sum((arr.astype(np.float64) - current[key].numpy().astype(np.float64)) ** 2))
    norm = math.sqrt(squared)
    if not norm <= cfg.strategy.max_update_norm:
        raise ReplyRejected(f"the update's L2 norm {norm:.3g} is over strategy.max_update_norm ({cfg.strategy.max_update_norm:g})")
    if reject_empty and norm == 0:
        raise ReplyRejected("the update is empty (the weights equal the global model)")
    n = check_metrics(msg, cfg.strategy.max_examples)
    if cfg.privacy.enabled:
        _check_dp_entry(ledger, cfg, run_id, server_round, n)
    return n


def _check_dp_entry(ledger: Ledger, cfg: ExperimentConfig, run_id: str, server_round: int, n: int) -> None:
    """The round's DP-SGD release, as the hospital's ledger records it, must be about the
    training split it claims and use the run's settings."""
    dp = [e for e in _entries(ledger, run_id, server_round, Split.TRAIN) if e.mechanism == Mechanism.DP_SGD]
    if len(dp) != 1:
        raise ReplyRejected(f"its ledger does not record this round's DP-SGD release once ({len(dp)} entries)")
    entry = dp[0]
    if entry.examples != n:
        raise ReplyRejected(f"it claims {n} training examples; its ledger says it sampled from {entry.examples}")
    q, steps = steps_per_round(n, cfg.training.batch_size, cfg.training.local_epochs, cfg.training.sample_rate)
    if not math.isclose(entry.sample_rate, q, rel_tol=1e-9) or entry.steps != steps:
        raise ReplyRejected("its ledger's sample rate or steps do not follow from its example count and the run's settings")
    if not math.isclose(entry.max_grad_norm, cfg.privacy.max_grad_norm, rel_tol=1e-9):
        raise ReplyRejected("its ledger's clipping norm is not the run's")


def check_metrics(msg: Message, max_examples: int) -> int:
    content = msg.content
    if M.METRICS not in content.metric_records or len(content.metric_records) != 1:
        raise ReplyRejected("reply must carry exactly one metric record named 'metrics'")
    metrics = content[M.METRICS]
    keys = set(metrics.keys())
    if keys != set(M.TRAIN_METRIC_KEYS):
        missing, extra = sorted(set(M.TRAIN_METRIC_KEYS) - keys), sorted(keys - set(M.TRAIN_METRIC_KEYS))
        raise ReplyRejected(f"metric keys differ from the contract (missing {missing}, unexpected {extra})")
    for key, value in metrics.items():
        if isinstance(value, list) or not math.isfinite(float(value)):
            raise ReplyRejected(f"metric '{key}' must be one finite number")
    n = metrics[M.NUM_EXAMPLES]
    if float(n) != int(n) or not 1 <= int(n) <= max_examples:
        raise ReplyRejected(f"example count must be a whole number in [1, {max_examples}]")
    return int(n)


@dataclass
class Evaluations:
    """What one reply released about its evaluated patients, each part checked."""

    summaries: dict[Split, ScoreSummary] = field(default_factory=dict)
    subgroups: SubgroupSummary | None = None  # test patients, per group
    importance: np.ndarray | None = None  # test patients: summed clipped contribution sizes
    hourly: np.ndarray | None = None  # validation patients: (checkpoint hours, bins), every outcome together
    onset: np.ndarray | None = None  # validation patients: their highest excess over the hour thresholds (bins)
    onset_n: int = 0  # the validation patients it counts (declared, from the ledger entry)
    onset_mechanism: Mechanism = Mechanism.GAUSSIAN  # its noise's (the ledger entry's): its interval redraws it
    noise: dict[Item, float] = field(default_factory=dict)  # the releases' noise multipliers by item, from the ledger
    histogram_noise: dict[Split, float] = field(default_factory=dict)  # each split's histogram's noise multiplier


def evaluation_grids(cfg: ExperimentConfig, threshold: float | None) -> tuple[ScoreGrid, ScoreGrid]:
    """The score grid of the histograms, and the coarse one of the subgroup histograms;
    anchored at the decision threshold when one was sent with the request."""
    ev = cfg.evaluation
    grid, coarse = ScoreGrid(*ev.logit_range, ev.score_bins), ScoreGrid(*ev.logit_range, ev.subgroup_bins)
    return (grid.anchored(threshold), coarse.anchored(threshold)) if threshold else (grid, coarse)


def read_evaluations(
    msg: Message, cfg: ExperimentConfig, ledger: Ledger, run_id: str, server_round: int, splits: list[Split],
    threshold: float | None = None, expected_noise: EvaluationNoise | None = None, final: bool = True,
) -> Evaluations:
    """The score summaries (and, with the test split, the subgroup histograms and the
    importance) a reply carries, each checked against the config and against the entry
    of the hospital's ledger that released it. ``expected_noise``: the run's calibration
    at the hospital's delta (common.evaluation_noise), for the final model's releases
    (``final``) or a validation during training: an entry that records other noise, or a
    release the calibration does not plan, is forged (more noise would widen the
    release's range check and drown the pooled readings)."""
    out = Evaluations()
    grid, coarse = evaluation_grids(cfg, threshold)
    allowed = {M.evaluation_key(s) for s in splits} | ({M.SUBGROUPS, M.IMPORTANCE} if Split.TEST in splits else set()) | (
        {M.HOURLY} if Split.VAL in splits else set()) | ({M.ONSET} if Split.TEST in splits and cfg.monitors_onset else set())
    for name in msg.content.array_records:
        if name != M.ARRAYS and name not in allowed:
            raise ReplyRejected(f"reply carries a record ({name}) that was not asked for")

    def released(split: Split, item: Item, n: int | None = None) -> LedgerEntry:
        mechanism = evaluation_mechanism(cfg, item)  # the run's, for a DP release
        entries = [e for e in _entries(ledger, run_id, server_round, split) if e.item == item
                   and e.mechanism in (mechanism, Mechanism.NONE) and (n is None or e.examples == n)]
        if not entries:
            raise ReplyRejected(f"its ledger does not record the {item.value} of the {split.value} split it sends")
        if cfg.evaluation.dp and entries[-1].mechanism != mechanism:
            raise ReplyRejected(f"its {item.value} of the {split.value} split is not recorded as a DP "
                                f"({mechanism.value.capitalize()}) release")
        entry = entries[-1]
        if cfg.evaluation.dp and expected_noise is not None:
            calibrated = expected_noise.get((split, final, item), math.inf)
            if not math.isfinite(calibrated):
                raise ReplyRejected(f"it sends a {item.value} of the {split.value} split that the run's settings do "
                                    "not plan")
            # 1e-5: far inside what would widen a range check, and wide enough for another build's bisection
            if not math.isclose(entry.noise_multiplier, calibrated, rel_tol=1e-5):
                raise ReplyRejected(f"its ledger records noise {entry.noise_multiplier:.6g} for its {item.value} of "
                                    f"the {split.value} split; the run's calibration at its delta gives {calibrated:.6g}")
        return entry

    for split in splits:
        key = M.evaluation_key(split)
        if key not in msg.content.array_records:
            continue  # declined (the reply says why), or the hospital stopped
        summary = check_summary(msg.content[key], cfg, grid)
        entry = released(split, Item.HISTOGRAM, summary.n)
        within_reach(summary.histogram, entry.examples, entry.noise_multiplier * summary.sensitivity,
                     f"its {split.value} histogram")
        if summary.confusion is not None:
            within_reach(summary.confusion, entry.examples, entry.noise_multiplier * summary.sensitivity,
                         f"its {split.value} confusion matrix")
        if split == Split.TEST:
            out.noise[Item.HISTOGRAM] = entry.noise_multiplier
        out.histogram_noise[split] = entry.noise_multiplier
        out.summaries[split] = summary
    if M.HOURLY in msg.content.array_records:
        arrays = {k: v.numpy() for k, v in msg.content[M.HOURLY].items()}
        hours = cfg.checkpoint_hours
        histogram = arrays.get("hourly-histograms")
        shape = (len(hours), grid.bins)
        if (set(arrays) != {"hourly-histograms", "hours"} or histogram.shape != shape or not np.isfinite(histogram).all()
                or list(np.asarray(arrays["hours"]).ravel()) != list(hours)):
            raise ReplyRejected(f"hourly histograms must be one finite array of shape {shape} and the run's hours")
        entry = released(Split.VAL, Item.HOURLY_HISTOGRAMS)
        within_reach(histogram, entry.examples, entry.noise_multiplier * math.sqrt(len(hours)), "its hourly histograms")
        out.noise[Item.HOURLY_HISTOGRAMS] = entry.noise_multiplier
        out.hourly = histogram.astype(np.float64)
    if M.ONSET in msg.content.array_records:
        arrays = {k: v.numpy() for k, v in msg.content[M.ONSET].items()}
        histogram = arrays.get("onset-histogram")
        bins = cfg.evaluation.score_bins
        if set(arrays) != {"onset-histogram"} or histogram.shape != (bins,) or not np.isfinite(histogram).all():
            raise ReplyRejected(f"the onset histogram must be one finite array of {bins} counts")
        entry = released(Split.VAL, Item.ONSET_HISTOGRAM)
        within_reach(histogram, entry.examples, entry.noise_multiplier, "its onset histogram", entry.mechanism)
        out.noise[Item.ONSET_HISTOGRAM] = entry.noise_multiplier
        out.onset, out.onset_n = histogram.astype(np.float64), entry.examples
        out.onset_mechanism = entry.mechanism
    if M.SUBGROUPS in msg.content.array_records:
        arrays = {k: v.numpy() for k, v in msg.content[M.SUBGROUPS].items()}
        rows = sum(len(g.groups) for g in groupings(cfg))
        histogram = arrays.get("subgroup-histograms")
        shape = (rows, 2, 1, coarse.bins)
        if set(arrays) != {"subgroup-histograms"} or histogram.shape != shape or not np.isfinite(histogram).all():
            raise ReplyRejected(f"subgroup histograms must be one finite array of shape {shape}")
        entry = released(Split.TEST, Item.SUBGROUP_HISTOGRAMS)
        subgroups = SubgroupSummary(histogram.astype(np.float64), coarse, len(cfg.evaluation.subgroups))
        within_reach(subgroups.histogram, entry.examples, entry.noise_multiplier * subgroups.sensitivity,
                     "its per-group histograms")
        out.noise[Item.SUBGROUP_HISTOGRAMS] = entry.noise_multiplier
        out.subgroups = subgroups
    if M.IMPORTANCE in msg.content.array_records:
        arrays = {k: v.numpy() for k, v in msg.content[M.IMPORTANCE].items()}
        width = len(cfg.features.variables) + len(cfg.features.static)
        importance = arrays.get("importance")
        if set(arrays) != {"importance", "clip"} or importance.shape != (width,) or not np.isfinite(importance).all():
            raise ReplyRejected(f"importance must be one finite vector of {width} values and its clipping norm")
        entry = released(Split.TEST, Item.IMPORTANCE)
        clip = float(np.asarray(arrays["clip"]).ravel()[0]) if np.asarray(arrays["clip"]).size == 1 else math.nan
        if not 0 < clip <= 1e6:
            raise ReplyRejected("importance's clipping norm must be one positive number")
        within_reach(importance / clip, entry.examples, entry.noise_multiplier, "its importance")
        out.noise[Item.IMPORTANCE] = entry.noise_multiplier
        out.importance = importance.astype(np.float64)
    return out


REACH_SD = 10  # an honest cell passes its range by this many noise sd with probability ~1e-23
REACH_CHANCE = math.erfc(REACH_SD / math.sqrt(2))  # that probability, which Laplace tails are read at too


def within_reach(cells: np.ndarray, n: int, noise_sd: float, what: str,
                 mechanism: Mechanism = Mechanism.GAUSSIAN) -> None:
    """Every cell of a release about ``n`` patients (each adding at most 1 to a cell) with
    noise of sd ``noise_sd`` lies in [0, n] give or take what an honest cell passes with
    probability ``REACH_CHANCE`` (``REACH_SD`` sd of Gaussian noise; for discrete Laplace
    noise, whose tails are heavier, about 37 sd: common.laplace.reach), and a discrete
    Laplace release holds whole numbers only (an honest count plus integer noise). A cell
    beyond (1e308 from a hostile hospital, which would make the pooled sum infinite) can
    only be forged: the reply is dropped."""
    values = np.asarray(cells, dtype=np.float64)
    if mechanism == Mechanism.LAPLACE:
        slack = laplace.reach(noise_sd, REACH_CHANCE) if noise_sd > 0 else 0.0
        if not np.array_equal(values, np.round(values)):
            raise ReplyRejected(f"{what} holds a count that is not a whole number, which discrete Laplace noise "
                                "cannot give")
    else:
        slack = REACH_SD * noise_sd + 1e-9
    if not (values.min(initial=0.0) >= -slack and values.max(initial=0.0) <= n + slack):
        raise ReplyRejected(f"{what} holds a count no {n} patients with the noise its ledger records can give")


def check_summary(record: ArrayRecord, cfg: ExperimentConfig, grid: ScoreGrid) -> ScoreSummary:
    arrays = {k: v.numpy() for k, v in record.items()}
    k = cfg.num_classes
    expected = set(M.SUMMARY_FIELDS) | ({"confusion"} if k > 2 else set())
    if set(arrays) != expected:
        raise ReplyRejected("evaluation summary has unexpected fields")
    k_score = 1 if k == 2 else k
    if arrays["histogram"].shape != (k, k_score, grid.bins):
        raise ReplyRejected(f"score histogram has shape {arrays['histogram'].shape}, expected {(k, k_score, grid.bins)}")
    if k > 2 and arrays["confusion"].shape != (k, k):
        raise ReplyRejected("confusion matrix has the wrong shape")
    if any(not np.isfinite(np.asarray(v, dtype=np.float64)).all() for v in arrays.values()):
        raise ReplyRejected("evaluation summary holds NaN or infinite values")
    summary = ScoreSummary.from_arrays(arrays)
    if summary.grid != grid:
        raise ReplyRejected("evaluation summary is on another score grid than the run's")
    if not 0 <= summary.n <= cfg.strategy.max_examples:
        raise ReplyRejected("evaluation count is out of range")
    return summary
