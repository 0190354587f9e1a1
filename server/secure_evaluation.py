"""The coordinator's side of evaluation under secure aggregation
(``common.secure_evaluation``): one session of the four stages per evaluation, whose sum
is read as the federation's pooled release.

What the coordinator learns is the sum over the hospitals in the session of their exact
histograms (and, for the test split, per-group histograms and summed importance), plus
the sum of their Skellam noise shares, and which splits each one put data in with their
declared sizes (outside DP, as every declared count). It never sees one hospital's
histogram, so there are no per-hospital rows: the result is one entry,
:data:`SECURE_SUM`, whose noise is stated as the multiplier a single Gaussian release of
the same sensitivity would carry (``server.results`` reads it like any other release).
"""

from __future__ import annotations

import logging
import math

import numpy as np
from flwr.app import Message, MessageType

from common import messages as M
from common import secagg as S
from common.config import ExperimentConfig
from common.ledger import Ledger
from common.messages import Item, Mechanism, Split
from common.metrics import ScoreSummary
from common.secure_evaluation import (
    DECLARED,
    INCLUDED,
    MASKED,
    PROGRESS,
    VARIANCES,
    EvaluationPart,
    evaluation_parts,
    grids,
    histogram_shape,
    split_vector,
    vector_size,
)
from common.subgroups import SubgroupSummary

from .records import TrainPhase
from .validation import Evaluations

log = logging.getLogger("fedgru.server")

SECURE_SUM = "all hospitals (secure sum)"  # the one entry a secure evaluation gives


def secure_evaluate(rounds, server_round: int, splits: list[Split], progress: bool = False,
                    threshold: float | None = None, hour_thresholds: list[float] | None = None) -> dict[str, Evaluations]:
    """One secure evaluation of the global model by the active hospitals (``rounds``: the
    coordinator's ``SecureRounds``). ``progress``: a validation during training (the
    round's drops are recorded in its phase); otherwise the final model's validation or
    test, with ``threshold`` (and the monitor's ``hour_thresholds``) for the test. Returns ``{SECURE_SUM: ...}``, or ``{}`` when
    the session could not complete (logged)."""
    co, cfg = rounds.co, rounds.co.cfg
    if not progress:
        co._phase = TrainPhase()
    nodes = rounds.session_nodes()
    t = rounds.threshold(nodes)
    least = max(t, cfg.strategy.min_hospitals)
    parts = evaluation_parts(cfg, splits, not progress)
    what = ("validation" if progress else "final evaluation") + f" ({', '.join(s.value for s in splits)})"
    base = {M.EVALUATE: " ".join(s.value for s in splits), PROGRESS: bool(progress)}
    if threshold:
        base[M.THRESHOLD] = float(threshold)
    if hour_thresholds is not None:
        base[M.HOUR_THRESHOLDS] = [float(t) for t in hour_thresholds]
    ask = dict(base=base, message_type=MessageType.EVALUATE, what=what)

    def give_up(why: str) -> dict[str, Evaluations]:
        log.warning("round %d: no %s: %s", server_round, what, why)
        co._lines.flush()
        if not progress:
            co.final_dropped += co._phase.dropped
        return {}

    if len(nodes) < least:
        return give_up(f"{len(nodes)} active hospitals; secure aggregation needs {least}")
    setup = rounds._ask(server_round, S.Stage.SETUP, 1.0, {nid: {S.PARTICIPANTS: nodes, S.THRESHOLD: t} for nid in nodes},
                        **ask)
    keys, required = rounds._keys(server_round, setup, VARIANCES, len(parts),
                                  S.evaluation_session([s.value for s in splits], not progress))
    if len(keys) < least:
        return give_up(f"{len(keys)} hospitals sent keys; secure aggregation needs {least}")
    declared: dict[int, int] = {}

    def read(nid: int, reply: Message) -> None:
        included, counts = _included(reply.content[M.STATUS], parts, cfg.strategy.max_examples)
        check_ledger(co._view(nid).ledger, co.run_id, server_round, parts, included, counts)
        for i, n in zip(included, counts):
            declared[i] = declared.get(i, 0) + n

    result = rounds._session(server_round, nodes, least, t, vector_size(parts), 1.0, keys, required, VARIANCES, read,
                             masked_key=MASKED, **ask)
    if isinstance(result, str):
        return give_up(result)
    values = S.decode(result.ring, 1.0)
    if not plausible(parts, values, declared, result.variance, len(result.survivors)):
        return give_up("the unmasked sum holds counts that honest hospitals' patients and noise cannot give")
    found = read_sum(cfg, parts, values, declared, result.variance, len(result.survivors), threshold or 0.0)
    co._lines.flush()
    if not progress:
        co.final_dropped += co._phase.dropped
    return {SECURE_SUM: found} if found.summaries else {}


def _included(status, parts: list[EvaluationPart], max_examples: int) -> tuple[list[int], list[int]]:
    """The parts a hospital put data in and the declared size of each one's split."""
    included = [int(v) for v in str(status[INCLUDED]).split(",") if v]
    counts = [int(v) for v in str(status[DECLARED]).split(",") if v]
    if len(included) != len(counts) or len(set(included)) != len(included) or \
            not all(0 <= i < len(parts) for i in included) or not all(0 < n <= max_examples for n in counts):
        raise ValueError("included parts")
    return included, counts


def check_ledger(ledger: Ledger | None, run_id: str, server_round: int, parts: list[EvaluationPart],
                 included: list[int], counts: list[int]) -> None:
    """Each part a hospital says it put data in is recorded in the ledger copy it sent, as
    a Skellam release of this run and round about its declared patients."""
    for i, n in zip(included, counts):
        part = parts[i]
        if ledger is None or not any(
                e.run_id == run_id and e.round == server_round and e.split == part.split and e.item == part.item
                and e.mechanism == Mechanism.SKELLAM and e.examples == n for e in ledger.entries):
            raise ValueError(f"its ledger does not record the {part.item.value} of the {part.split.value} split")


REACH_SD = 10  # as server.validation.within_reach: an honest cell passes its range by this many sd with probability ~1e-23


def plausible(parts: list[EvaluationPart], values: np.ndarray, declared: dict[int, int], variances: list[float],
              hospitals: int) -> bool:
    """Every coordinate of the sum could have come from honest hospitals: in [0, n] (n:
    the declared patients of the hospitals that put data in; each adds at most 1 to a
    cell, and at most its clipping norm, 1, to an importance coordinate) give or take
    ``REACH_SD`` sd of the summed noise. A hostile hospital cannot be told apart in a
    sum, so a sum outside is not read at all (the coordinator's only check without
    individual releases, as ``server.secure_round.plausible`` for the gradients)."""
    for i, (part, cells) in enumerate(zip(parts, split_vector(parts, values))):
        slack = REACH_SD * math.sqrt(hospitals * variances[i])
        top = declared.get(i, 0) * part.scale
        if not (np.isfinite(cells).all() and cells.min(initial=0.0) >= -slack and cells.max(initial=0.0) <= top + slack):
            return False
    return True


def read_sum(cfg: ExperimentConfig, parts: list[EvaluationPart], values: np.ndarray, declared: dict[int, int],
             variances: list[float], hospitals: int, threshold: float) -> Evaluations:
    """The decoded sum as one pooled release: each part's noise is the survivors' Skellam
    shares together (variance ``hospitals x variance`` per coordinate), stated as a
    Gaussian multiplier of the part's sensitivity. A part no hospital put data in is left out."""
    out = Evaluations()
    grid, coarse = grids(cfg, threshold)
    shape, confusion_shape = histogram_shape(cfg)
    for i, (part, cells) in enumerate(zip(parts, split_vector(parts, values))):
        n = declared.get(i, 0)
        if n == 0:
            continue
        sd = math.sqrt(hospitals * variances[i]) / part.scale  # per coordinate, in the release's units
        multiplier = sd if part.item == Item.IMPORTANCE else sd / part.l2  # importance: per unit of its clip (1)
        cells = np.asarray(cells, dtype=np.float64) / part.scale
        if part.item == Item.HISTOGRAM:
            flat = cells.ravel()
            size = math.prod(shape)
            confusion = flat[size:].reshape(confusion_shape) if confusion_shape else None
            out.summaries[part.split] = ScoreSummary(flat[:size].reshape(shape), confusion, n, grid)
            out.histogram_noise[part.split] = multiplier
            if part.split == Split.TEST:
                out.noise[Item.HISTOGRAM] = multiplier
        elif part.item == Item.HOURLY_HISTOGRAMS:
            out.hourly = cells
            out.noise[Item.HOURLY_HISTOGRAMS] = multiplier
        elif part.item == Item.ONSET_HISTOGRAM:
            out.onset, out.onset_n = cells, n
            out.noise[Item.ONSET_HISTOGRAM] = multiplier
        elif part.item == Item.SUBGROUP_HISTOGRAMS:
            out.subgroups = SubgroupSummary(cells, coarse, len(cfg.evaluation.subgroups))
            out.noise[Item.SUBGROUP_HISTOGRAMS] = multiplier
        else:
            out.importance = cells
            out.noise[Item.IMPORTANCE] = multiplier
    return out
