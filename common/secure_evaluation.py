"""Evaluation releases under secure aggregation: what the coordinator and the hospitals
share (``privacy.aggregation: secure``).

Without secure aggregation each hospital releases its own noisy score histograms
(``client.evaluation``), and the pooled histogram the coordinator reads carries every
hospital's full noise: K hospitals, sqrt(K) times the noise of one release. Under secure
aggregation the same histograms (exact counts) travel as one integer vector through the
four stages of ``common.secagg``; each hospital adds only its share of Skellam noise
(Agarwal, Kairouz & Liu, NeurIPS 2021), and the coordinator learns only the sum.

This module fixes the vector's layout (:func:`evaluation_parts`): which releases a
session carries, in which order and shape, from the run's config alone, so both sides
cut the vector alike; and each part's sensitivity, which the hospital's accounting and
the coordinator's reading share.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from common.config import ExperimentConfig
from common.messages import Item, Split
from common.metrics import ScoreGrid
from common.skellam import SkellamSensitivity
from common.subgroups import groupings

# Each test patient's vector of contribution sizes is clipped to this L2 norm (client.evaluation)
IMPORTANCE_CLIP = 1.0
# Integers per unit of clipped contribution in the importance part: rounding adds about
# sqrt(variables)/2^10 of a patient's contribution, and 2^31 / 2^10 = 2 million patients
# fit before the sum could wrap around.
IMPORTANCE_SCALE = 2.0 ** 10
MASKED = "secagg-masked-evaluation"  # reply: ArrayRecord key of the masked evaluation vector
PROGRESS = "secagg-progress"  # config field: a validation release during training (its share of the budget)
INCLUDED = "secagg-included"  # reply field: indices of the parts whose data this hospital put in the sum
DECLARED = "secagg-declared"  # reply field: the declared size of each part's split, for the parts included
VARIANCES = "secagg-noise-variances"  # config field: each part's Skellam variance per coordinate


def test_items(cfg: ExperimentConfig) -> list[Item]:
    """The test release's parts: the histogram, and for a binary task the per-group
    histograms and the importance where the config asks for them."""
    binary, ev = cfg.is_binary, cfg.evaluation
    return [Item.HISTOGRAM] + ([Item.SUBGROUP_HISTOGRAMS] if binary and ev.subgroups and ev.subgroup_share > 0 else []) + (
        [Item.IMPORTANCE] if binary and ev.importance and ev.importance_share > 0 else [])


def evaluation_items(cfg: ExperimentConfig, split: Split, final: bool) -> list[Item]:
    """The releases one evaluation of ``split`` makes: a validation during training only
    its histogram; the final model's validation its histogram and, for a binary task with
    checkpoint hours, the hourly histograms; the test split :func:`test_items`."""
    if split == Split.TEST:
        return test_items(cfg)
    hourly = final and bool(cfg.checkpoint_hours) and cfg.evaluation.hourly_share > 0
    return [Item.HISTOGRAM] + ([Item.HOURLY_HISTOGRAMS] if hourly else [])


def message_releases(cfg: ExperimentConfig, splits: list[Split], final: bool) -> list[tuple[Split, Item]]:
    """Every release one evaluation message of ``splits`` makes, in order, as (the group of
    patients it is charged to, what it is): each split's :func:`evaluation_items`, and with
    the test split of a run whose monitor reads a margin, the validation patients' onset
    histogram (it needs the hour thresholds the final validation gave)."""
    out = [(split, item) for split in splits for item in evaluation_items(cfg, split, final or split == Split.TEST)]
    if Split.TEST in splits and cfg.monitors_onset:
        out.append((Split.VAL, Item.ONSET_HISTOGRAM))
    return out


@dataclass(frozen=True)
class EvaluationPart:
    """One release inside the secure evaluation vector."""

    split: Split
    item: Item
    shape: tuple[int, ...]  # the release's array (a histogram part: histogram, then the confusion matrix)
    l2: float  # one patient's largest change to it, in integer units (L2)
    l1: float  # and in L1
    scale: float  # integers per unit (counts: 1)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def sensitivity(self) -> SkellamSensitivity:
        return SkellamSensitivity(self.l2, self.l1)


def evaluation_parts(cfg: ExperimentConfig, splits: list[Split], final: bool) -> list[EvaluationPart]:
    """The parts of one secure evaluation of ``splits``, in the vector's order."""
    ev = cfg.evaluation
    k = cfg.num_classes
    k_score = 1 if k == 2 else k
    parts = []
    for split, item in message_releases(cfg, splits, final):
        if item == Item.HISTOGRAM:
            # one patient: one cell per score column, and one confusion cell (multi-class)
            cells = k_score + (1 if k > 2 else 0)
            size = k * k_score * ev.score_bins + (k * k if k > 2 else 0)
            parts.append(EvaluationPart(split, item, (size,), math.sqrt(cells), float(cells), 1.0))
        elif item == Item.HOURLY_HISTOGRAMS:
            hours = len(cfg.checkpoint_hours)  # one count per hour
            parts.append(EvaluationPart(split, item, (hours, ev.score_bins), math.sqrt(hours), float(hours), 1.0))
        elif item == Item.ONSET_HISTOGRAM:  # one count per stay
            parts.append(EvaluationPart(split, item, (ev.score_bins,), 1.0, 1.0, 1.0))
        elif item == Item.SUBGROUP_HISTOGRAMS:
            rows = sum(len(g.groups) for g in groupings(cfg))
            per = max(len(ev.subgroups), 1)  # one count per grouping
            parts.append(EvaluationPart(split, item, (rows, 2, 1, ev.subgroup_bins), math.sqrt(per), float(per), 1.0))
        else:
            width = len(cfg.features.variables) + len(cfg.features.static)
            sens = SkellamSensitivity.of(IMPORTANCE_CLIP, IMPORTANCE_SCALE, width)
            parts.append(EvaluationPart(split, item, (width,), sens.l2, sens.l1, IMPORTANCE_SCALE))
    return parts


def part_of(cfg: ExperimentConfig, split: Split, final: bool, item: Item) -> EvaluationPart:
    """The part that carries a release of ``item`` about ``split``'s patients (the onset
    histogram, of validation patients, travels in the test session)."""
    session = [Split.TEST] if item == Item.ONSET_HISTOGRAM else [split]
    return next(p for p in evaluation_parts(cfg, session, final) if p.item == item and p.split == split)


def histogram_shape(cfg: ExperimentConfig) -> tuple[tuple[int, ...], tuple[int, int] | None]:
    """A score summary's histogram shape and (multi-class) its confusion matrix's."""
    k = cfg.num_classes
    return (k, 1 if k == 2 else k, cfg.evaluation.score_bins), ((k, k) if k > 2 else None)


def vector_size(parts: list[EvaluationPart]) -> int:
    return sum(p.size for p in parts)


def split_vector(parts: list[EvaluationPart], vector: np.ndarray) -> list[np.ndarray]:
    """The vector cut into its parts, each in its shape."""
    out, offset = [], 0
    for part in parts:
        out.append(vector[offset:offset + part.size].reshape(part.shape))
        offset += part.size
    return out


def grids(cfg: ExperimentConfig, threshold: float) -> tuple[ScoreGrid, ScoreGrid]:
    """The score grid and the coarse subgroup grid, anchored at ``threshold`` when one is
    given (the test release), as both sides build them."""
    ev = cfg.evaluation
    grid, coarse = ScoreGrid(*ev.logit_range, ev.score_bins), ScoreGrid(*ev.logit_range, ev.subgroup_bins)
    return (grid.anchored(threshold), coarse.anchored(threshold)) if threshold > 0 else (grid, coarse)
