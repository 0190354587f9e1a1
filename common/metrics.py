"""Classification metrics, exact and from the score histograms hospitals release.

Exact metrics (``exact_metrics``) are for data at hand: a hospital scoring its own
patients, ``fedgru evaluate``. Federated evaluation instead has each hospital release a
:class:`ScoreSummary`: per true class, how many patients fall in each bin of each
class's predicted probability, plus the confusion matrix and the Brier sum. Summaries
add up across hospitals, so pooled metrics over all hospitals come out without any
patient-level prediction leaving a hospital. Bins are uniform in logit space, so the
AUROC from a summary differs from the exact one only by pairs that share a bin.

Metrics (binary; multi-class: one-vs-rest per class, macro-averaged):
AUROC, AUPRC (average precision), accuracy, sensitivity, specificity, F1, Brier score,
and the PhysioNet/CinC 2012 event-1 score min(Se, +P).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np

LOGIT_RANGE = 8.0  # histogram covers logits in [-8, 8] (p in [3e-4, 0.9997]); beyond: the end bins


@dataclass
class Metrics:
    """The metrics fedgru reports for one set of patients (NaN where undefined, e.g. AUROC
    without a death). Decisions (accuracy ... event-1) are at the run's threshold."""

    auroc: float
    auprc: float
    accuracy: float
    sensitivity: float
    specificity: float
    f1: float
    brier: float
    event1_score: float  # PhysioNet/CinC 2012: min(sensitivity, positive predictive value)
    n: int

    @classmethod
    def from_parts(cls, ranking: dict, decisions: dict) -> Metrics:
        return cls(**{f.name: {**ranking, **decisions}[f.name] for f in fields(cls)})


def _auroc_from_counts(pos: np.ndarray, neg: np.ndarray) -> float:
    """AUROC from per-bin counts (bins in increasing score); ties count one half."""
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    neg_below = np.cumsum(neg) - neg
    return float((pos * (neg_below + 0.5 * neg)).sum() / (n_pos * n_neg))


def _ap_from_counts(pos: np.ndarray, neg: np.ndarray) -> float:
    """Average precision with a threshold at every bin (highest scores first)."""
    n_pos = pos.sum()
    if n_pos == 0:
        return float("nan")
    tp = np.cumsum(pos[::-1])
    fp = np.cumsum(neg[::-1])
    keep = (pos[::-1] + neg[::-1]) > 0
    tp, fp = tp[keep], fp[keep]
    precision = tp / np.maximum(tp + fp, 1)
    recall = tp / n_pos
    prev = np.concatenate([[0.0], recall[:-1]])
    return float(((recall - prev) * precision).sum())


def _threshold_metrics(confusion: np.ndarray) -> dict:
    """From a confusion matrix (rows: true class, columns: predicted class)."""
    total = confusion.sum()
    k = confusion.shape[0]
    classes = [1] if k == 2 else list(range(k))  # binary: positive class only
    se, sp, ppv, f1 = [], [], [], []
    for c in classes:
        tp = confusion[c, c]
        fn = confusion[c].sum() - tp
        fp = confusion[:, c].sum() - tp
        tn = total - tp - fn - fp
        se.append(tp / (tp + fn) if tp + fn else float("nan"))
        sp.append(tn / (tn + fp) if tn + fp else float("nan"))
        ppv.append(tp / (tp + fp) if tp + fp else 0.0)
        f1.append(2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else 0.0)
    sens, spec, prec = _nanmean(se), _nanmean(sp), _nanmean(ppv)
    return {
        "accuracy": float(np.trace(confusion) / total) if total else float("nan"),
        "sensitivity": float(sens),
        "specificity": float(spec),
        "f1": float(_nanmean(f1)),
        "event1_score": float(min(sens, prec)) if not math.isnan(sens) else float("nan"),
        "precision": float(prec),
    }


def _nanmean(values: list[float]) -> float:
    arr = np.asarray(values, dtype=np.float64)
    return float(np.nanmean(arr)) if np.isfinite(arr).any() else float("nan")


def predicted_class(probs: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Binary: positive when p1 >= threshold; multi-class: the most likely class."""
    if probs.shape[1] == 2:
        return (probs[:, 1] >= threshold).astype(np.int64)
    return probs.argmax(axis=1)


def exact_metrics(y: np.ndarray, probs: np.ndarray, threshold: float = 0.5) -> Metrics:
    """Exact metrics of class probabilities ``probs`` (N, K) against labels ``y``;
    binary decisions (accuracy ... event-1) at ``threshold`` on the risk."""
    y = np.asarray(y, dtype=np.int64)
    k = probs.shape[1]
    onehot = np.eye(k)[y]
    brier = float(((probs - onehot) ** 2).sum(axis=1).mean()) if k > 2 else float(((probs[:, 1] - y) ** 2).mean())
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (y, predicted_class(probs, threshold)), 1)
    classes = [1] if k == 2 else list(range(k))
    aurocs, aps = [], []
    for c in classes:
        score, is_pos = probs[:, c], y == c
        order = np.argsort(score, kind="mergesort")
        s_sorted = score[order]
        _, inverse, counts = np.unique(s_sorted, return_inverse=True, return_counts=True)
        pos = np.bincount(inverse, weights=is_pos[order], minlength=len(counts))
        neg = counts - pos
        aurocs.append(_auroc_from_counts(pos, neg))
        aps.append(_ap_from_counts(pos, neg))
    ranking = {"auroc": _nanmean(aurocs), "auprc": _nanmean(aps), "brier": brier, "n": int(len(y))}
    return Metrics.from_parts(ranking, _threshold_metrics(confusion))


@dataclass
class ScoreSummary:
    """What a hospital releases about its predictions on an evaluation split."""

    histogram: np.ndarray  # (K_true, K_score, bins) counts; binary: K_score = 1 (p1)
    confusion: np.ndarray  # (K, K) counts
    brier_sum: float
    n: int

    @classmethod
    def from_predictions(cls, y: np.ndarray, probs: np.ndarray, bins: int, threshold: float = 0.5) -> ScoreSummary:
        y = np.asarray(y, dtype=np.int64)
        k = probs.shape[1]
        score_cols = [1] if k == 2 else list(range(k))
        p = np.clip(probs[:, score_cols], 1e-12, 1 - 1e-12)
        logits = np.log(p) - np.log1p(-p)
        idx = np.clip(((logits + LOGIT_RANGE) / (2 * LOGIT_RANGE) * bins).astype(np.int64), 0, bins - 1)
        hist = np.zeros((k, len(score_cols), bins), dtype=np.int64)
        for j in range(len(score_cols)):
            np.add.at(hist[:, j, :], (y, idx[:, j]), 1)
        confusion = np.zeros((k, k), dtype=np.int64)
        np.add.at(confusion, (y, predicted_class(probs, threshold)), 1)
        onehot = np.eye(k)[y]
        brier = ((probs - onehot) ** 2).sum(axis=1).sum() if k > 2 else ((probs[:, 1] - y) ** 2).sum()
        return cls(histogram=hist, confusion=confusion, brier_sum=float(brier), n=int(len(y)))

    def __add__(self, other: ScoreSummary) -> ScoreSummary:
        return ScoreSummary(
            histogram=self.histogram + other.histogram,
            confusion=self.confusion + other.confusion,
            brier_sum=self.brier_sum + other.brier_sum,
            n=self.n + other.n,
        )

    def metrics(self) -> Metrics:
        k = self.confusion.shape[0]
        classes = [1] if k == 2 else list(range(k))
        aurocs, aps = [], []
        for j, c in enumerate(classes):
            pos = self.histogram[c, j].astype(np.float64)
            neg = self.histogram[:, j].sum(axis=0).astype(np.float64) - pos
            aurocs.append(_auroc_from_counts(pos, neg))
            aps.append(_ap_from_counts(pos, neg))
        ranking = {
            "auroc": _nanmean(aurocs),
            "auprc": _nanmean(aps),
            "brier": self.brier_sum / self.n if self.n else float("nan"),
            "n": int(self.n),
        }
        return Metrics.from_parts(ranking, _threshold_metrics(self.confusion))

    def binary_counts(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Per score bin, how many deaths and how many survivors: (positives, negatives).
        None for a multi-class summary or one without both outcomes."""
        if self.confusion.shape[0] != 2:
            return None
        pos = self.histogram[1, 0].astype(np.float64)
        neg = self.histogram[0, 0].astype(np.float64)
        if pos.sum() == 0 or neg.sum() == 0:
            return None
        return pos, neg

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The arrays of the evaluation record (their names are messages.SUMMARY_FIELDS)."""
        return {
            "histogram": self.histogram.astype(np.int64),
            "confusion": self.confusion.astype(np.int64),
            "brier_sum": np.array([self.brier_sum], dtype=np.float64),
            "n": np.array([self.n], dtype=np.int64),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> ScoreSummary:
        return cls(
            histogram=np.asarray(arrays["histogram"], dtype=np.int64),
            confusion=np.asarray(arrays["confusion"], dtype=np.int64),
            brier_sum=float(np.asarray(arrays["brier_sum"]).reshape(-1)[0]),
            n=int(np.asarray(arrays["n"]).reshape(-1)[0]),
        )


def bin_edge_probability(j: int, bins: int) -> float:
    """The risk at the lower edge of score bin ``j``: a patient is in bin ``j`` or above
    exactly when their risk is at least this (bins are uniform in logit)."""
    logit = -LOGIT_RANGE + 2 * LOGIT_RANGE * j / bins
    return float(1.0 / (1.0 + math.exp(-logit)))


def choose_threshold(summary: ScoreSummary) -> float | None:
    """The binary decision threshold with the best event-1 score, min(Se, +P), the
    PhysioNet/CinC 2012 Challenge's score, on a (pooled validation) summary.

    Only bin edges are candidates, so the choice reads nothing but the released
    histogram, and the hospitals' confusion matrices at the chosen threshold agree
    exactly with the histogram. Ties go to the lowest threshold (more patients flagged).
    None for multi-class tasks or a summary without both outcomes.
    """
    counts = summary.binary_counts()
    if counts is None:
        return None
    pos, neg = counts
    tp = np.cumsum(pos[::-1])[::-1]  # positives at or above each bin edge
    fp = np.cumsum(neg[::-1])[::-1]
    sensitivity = tp / pos.sum()
    precision = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=(tp + fp) > 0)
    score = np.minimum(sensitivity, precision)
    # Edge 0 would flag everyone (its bin also holds every risk below it): not a choice.
    best = 1 + int(np.argmax(score[1:]))
    return bin_edge_probability(best, len(pos))


def pooled(summaries: list[ScoreSummary]) -> ScoreSummary | None:
    if not summaries:
        return None
    total = summaries[0]
    for s in summaries[1:]:
        total = total + s
    return total


def format_number(value: float | int | None, digits: int = 3) -> str:
    """How fedgru prints a number: fixed digits, tiny values in g-notation, 'n/a' for
    missing, NaN and infinite values."""
    if value is None:
        return "n/a"
    if isinstance(value, bool) or isinstance(value, (int, np.integer)):
        return str(value)
    value = float(value)
    if not math.isfinite(value):
        return "n/a"
    return f"{value:.{digits}g}" if 0 < abs(value) < 1e-3 else f"{value:.{digits}f}"


def format_metrics(m: Metrics) -> str:
    f = format_number
    return (
        f"AUROC {f(m.auroc)}  AUPRC {f(m.auprc)}  accuracy {f(m.accuracy)}  "
        f"sensitivity {f(m.sensitivity)}  specificity {f(m.specificity)}  F1 {f(m.f1)}  "
        f"Brier {f(m.brier)}  event-1 {f(m.event1_score)}  (n={m.n})"
    )
