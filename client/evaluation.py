"""A hospital's evaluation releases: noisy score histograms (the Gaussian mechanism; the
monitor's onset histogram the Laplace one by default), budgeted per group of patients.

:func:`plan_evaluations` decides, with the ledger locked and before any patient data is
read, which requested releases fit their group's budget and the run's per-run count, and
makes their ledger entries (recorded once the releases are made); :func:`score` then
makes them. Every number in a decision comes from the message, the policy, the ledger
and the counts the hospital declares: the evaluated split's size in a release (``n``)
and in its ledger entry is the declared one.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from common import laplace
from common import messages as M
from common.config import ExperimentConfig
from common.explain import contribution_sizes
from common.gaussian_noise import gaussian_release
from common.ledger import Ledger, LedgerEntry
from common.messages import Item, Mechanism, Split, evaluation_mechanism
from common.metrics import ScoreGrid, ScoreSummary
from common.model import GRUClassifier, model_spec
from common.onset import onset_scores
from common.secure_evaluation import IMPORTANCE_CLIP, message_releases
from common.subgroups import SubgroupSummary
from common.training import hourly_logits_at, predict_proba

from .hospital import HospitalData
from .noise import evaluation_noise
from .policy import PolicyRefusal

if TYPE_CHECKING:
    from .request import Request

SCORING_BATCH = 256  # patients scored at once, padded: memory never depends on how many there are


@dataclass(frozen=True)
class PlannedRelease:
    split: Split
    item: Item
    noise_multiplier: float  # 0: exact (a comparison simulation)
    entry: LedgerEntry  # recorded once the release is made


def plan_evaluations(req: Request, ledger: Ledger) -> tuple[list[PlannedRelease], list[str]]:
    """The requested evaluations that fit their group's budget, with their noise and the
    ledger entries to record once made; and why any others were declined. The per-run
    count is read from ``ledger``, locked by the caller, so two messages at once cannot
    both take the run's last release."""
    cfg, policy = req.cfg, req.policy
    ev = cfg.evaluation
    noise = evaluation_noise(cfg.to_json(), policy.delta)
    planned_counts = cfg.planned_evaluations()
    releases = message_releases(cfg, req.splits, req.final)
    planned, declined = [], []
    wanted: dict[Split, list[Item]] = {}  # by group of patients: each group's budget is checked on all it gives
    for split in req.splits:
        items = [item for s_, item in releases if s_ == split and item != Item.ONSET_HISTOGRAM]
        if not items or any((split, req.final, item) not in noise for item in items):
            raise PolicyRefusal("evaluate", f"asks for the {split.value} split during training; test is scored once, at the end")
        if ev.dp and not all(math.isfinite(noise[(split, req.final, item)]) for item in items):
            # the run's own settings planned no such release (validate_every 0, one round):
            # its noise is calibrated for none, so none is made
            raise PolicyRefusal("evaluate", f"asks for a {split.value} release during training that this run's "
                                            "settings (evaluation.validate_every, run.rounds) do not plan")
        released, plan = ledger.releases_in_run(req.run_id, split), planned_counts.get(split.value, 0)
        if ev.dp and split == Split.VAL and released >= plan:
            # each release's noise is calibrated for the number the run plans (at most the policy's count: a
            # larger plan was refused above): one more would take the run past the epsilon its preflight
            # agreed. A resumed coordinator replaying a validated round with another model asks for one: declined,
            # the round's training goes on (a second test release comes alone, and is refused below)
            declined.append(f"{split.value}: this run has had the {plan} {split.value} releases its settings plan "
                            "(evaluation.validate_every, run.rounds); their noise is calibrated for that many")
            continue
        policy.check_evaluation_count(split, plan, released)
        wanted[split] = items
    if any(item == Item.ONSET_HISTOGRAM for _, item in releases):  # the test message's, of the validation patients
        why = onset_declined(req, ledger)
        if why:
            declined.append(why)
        else:
            wanted.setdefault(Split.VAL, []).append(Item.ONSET_HISTOGRAM)
    for split, items in wanted.items():
        found = _planned(req, ledger, noise, split, items)
        planned += found[0]
        declined += found[1]
    return planned, declined


def onset_declined(req: Request, ledger: Ledger) -> str | None:
    """Why the monitor's onset histogram (``common.onset``), which a test message asks of
    the validation patients, is not made, or None: it needs the hour thresholds, and the
    hospital's policy must evaluate its validation patients (the test message names only
    the test split, so the request's own checks do not cover them). A second one in a run
    is refused. From the message, the policy and the ledger only, before any data is read."""
    if req.hour_thresholds is None:
        return "val (onset histogram): the test message brought no hour thresholds to measure it against"
    if ledger.items_in_run(req.run_id, Split.VAL, Item.ONSET_HISTOGRAM):
        raise PolicyRefusal("evaluate", "asks for a second onset histogram in one run; a run makes one")
    planned = req.cfg.planned_evaluations().get(Split.VAL.value, 0)
    try:
        req.policy.check_evaluation(req.cfg, Split.VAL, planned)
        req.policy.check_evaluation_count(Split.VAL, planned, 0)
    except PolicyRefusal as refusal:
        return f"val (onset histogram): {refusal}"
    return None


def _planned(req: Request, ledger: Ledger, noise: dict, split: Split, items: list[Item]
             ) -> tuple[list[PlannedRelease], list[str]]:
    """The releases ``items`` of ``split`` with their ledger entries, or why they are declined
    (no stays declared; the group's budget, checked on all of them together)."""
    ev, policy = req.cfg.evaluation, req.policy
    n = req.declared.of(split)
    if n == 0:
        return [], [f"{split.value}: this hospital declares no {split.value} stays"]
    entries = []
    for item in items:
        sigma = noise[(split, req.final, item)] if ev.dp else 0.0  # the onset histogram's message is final: a test
        mechanism = evaluation_mechanism(req.cfg, item) if ev.dp else Mechanism.NONE
        entries.append(LedgerEntry(
            req.run_id, req.server_round, mechanism,
            f"{item.value.replace('-', ' ')} of the {split.value} split" + (f" ({mechanism.value.capitalize()} noise)"
                                                                            if ev.dp else " (exact)"),
            split=split, item=item, noise_multiplier=sigma, sample_rate=1.0 if ev.dp else 0.0,
            steps=1 if ev.dp else 0, max_grad_norm=1.0 if ev.dp else 0.0, examples=n,
        ))
        entries[-1].check(f"{req.node.name}'s planned ledger entry")  # refused now, not after reading
    if ev.dp:
        spent = ledger.epsilon_with(entries)
        if spent > policy.eval_max_epsilon:
            return [], [f"{split.value}: the budget of its patients would be passed "
                        f"(epsilon {spent:.3f} of {policy.eval_max_epsilon:g})"]
    return [PlannedRelease(split, entry.item, entry.noise_multiplier, entry) for entry in entries], []


def global_model(req: Request, device: torch.device) -> GRUClassifier:
    """The model the message carries, built from weights ``check_weights`` read."""
    cfg = req.cfg
    model = GRUClassifier(model_spec(cfg), gru_impl=cfg.model.gru_impl if cfg.privacy.enabled else "torch")
    model.load_state_dict({k: torch.as_tensor(v) for k, v in req.weights.items()}, strict=True)
    return model.to(device)


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def score(req: Request, data: HospitalData, model: GRUClassifier, planned: list[PlannedRelease]) -> dict:
    """Make the planned releases: the model's score histograms of the requested splits
    (and, with the test split, the per-group histograms and the importance), with their
    noise, drawn from the operating system's entropy. Each carries the declared size of
    its split, never a count of the data."""
    ev, cfg = req.cfg.evaluation, req.cfg
    grid, coarse = ScoreGrid(*ev.logit_range, ev.score_bins), ScoreGrid(*ev.logit_range, ev.subgroup_bins)
    if req.threshold > 0:  # the run's threshold is an edge of every bin grid: decisions at it are exact
        grid, coarse = grid.anchored(req.threshold), coarse.anchored(req.threshold)
    rng = np.random.default_rng(secrets.randbits(128))  # seeded from the OS: the server must not know it
    records, probs = {}, {}
    for release in planned:
        idx = data.split(release.split)
        # each split's risks once, for the releases that read them (not the hourly ones)
        if release.item in (Item.HISTOGRAM, Item.SUBGROUP_HISTOGRAMS) and release.split not in probs:
            probs[release.split] = predict_proba(model, data.dataset.X[idx], data.dataset.S[idx], batch=SCORING_BATCH,
                                                 pad=True)
        p, y, sigma = probs.get(release.split), data.dataset.y[idx], release.noise_multiplier
        if release.item == Item.HISTOGRAM:
            # the declared size of the split, not a count of the data
            summary = replace(ScoreSummary.from_predictions(y, _as_probabilities(p, cfg), grid), n=release.entry.examples)
            records[M.evaluation_key(release.split)] = _record((summary.noised(sigma, rng) if sigma else summary).to_arrays())
        elif release.item == Item.HOURLY_HISTOGRAMS:
            hours = cfg.checkpoint_hours
            logits = hourly_logits_at(model, data.dataset.X[idx], data.dataset.S[idx], hours, batch=SCORING_BATCH)
            # one row per hour, every patient whatever the outcome (a threshold reads the whole distribution)
            hist = np.stack([np.bincount(grid.index(logits[:, k]), minlength=grid.bins) for k in range(len(hours))],
                            axis=0).astype(np.float64) if len(logits) else np.zeros((len(hours), grid.bins))
            if sigma:  # one patient moves one count per hour: L2 sensitivity sqrt(hours)
                hist = gaussian_release(hist, sigma * math.sqrt(len(hours)), rng)
            records[M.HOURLY] = _record({"hourly-histograms": hist, "hours": np.asarray(hours, dtype=np.int64)})
        elif release.item == Item.ONSET_HISTOGRAM:
            logits = hourly_logits_at(model, data.dataset.X[idx], data.dataset.S[idx], list(range(1, len(req.hour_thresholds) + 1)),
                                      batch=SCORING_BATCH)
            # every validation stay's highest excess over the hour thresholds, whatever its outcome
            # on the plain grid (an excess, not a risk: no threshold's edge to anchor)
            plain = ScoreGrid(*ev.logit_range, ev.score_bins)
            hist = np.bincount(plain.index(onset_scores(logits, req.hour_thresholds)), minlength=plain.bins
                               ).astype(np.float64) if len(logits) else np.zeros(plain.bins)
            if sigma:  # one stay moves one count: L1 and L2 sensitivity 1
                hist = (hist + laplace.release_noise(sigma, hist.shape) if release.entry.mechanism == Mechanism.LAPLACE
                        else gaussian_release(hist, sigma, rng))
            records[M.ONSET] = _record({"onset-histogram": hist})
        elif release.item == Item.SUBGROUP_HISTOGRAMS:
            raw = {k: v[idx] for k, v in data.dataset.groups.items()}
            groups = SubgroupSummary.from_predictions(cfg, y, _as_probabilities(p, cfg), raw, coarse)
            records[M.SUBGROUPS] = _record({"subgroup-histograms": (groups.noised(sigma, rng) if sigma else groups).histogram})
        else:
            sizes = contribution_sizes(model, data.dataset.X[idx], data.dataset.S[idx], cfg.features, IMPORTANCE_CLIP,
                                       batch=SCORING_BATCH)
            total = sizes.sum(axis=0)
            if sigma:
                total = gaussian_release(total, sigma * IMPORTANCE_CLIP, rng)
            records[M.IMPORTANCE] = _record({"importance": total, "clip": np.array([IMPORTANCE_CLIP])})
    return records


def _as_probabilities(p: np.ndarray, cfg: ExperimentConfig) -> np.ndarray:
    """predict_proba's answer for an empty split has no rows; its columns still follow the task."""
    return p if len(p) else np.zeros((0, max(2, cfg.num_classes)))
