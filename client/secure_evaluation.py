"""A hospital's evaluation releases under secure aggregation (``privacy.aggregation:
secure``): the exact score histograms of ``client.evaluation`` (and, for the test split,
the per-group histograms and the importance), summed over hospitals through the four
stages of ``common.secagg``, each hospital adding its share of Skellam noise.

How much noise: the run's evaluation budget is calibrated as without secure aggregation
(``common.evaluation_noise.calibrated_evaluation_noise``: a Gaussian multiplier per kind of
release); here each kind's release becomes a Skellam one whose variance, counted over
``min_honest`` hospitals, keeps each group's epsilon (validation, test) within
``evaluation.val_epsilon`` / ``test_epsilon``, and whose share from one hospital alone
keeps it within ``max_epsilon_alone`` (:func:`secure_evaluation_variances`). So the
coordinator's pooled histogram carries K / min_honest of one release's noise where it
carried K (K hospitals in the sum).

A part a hospital declines (its group's budget, no declared patients) still carries its
share of noise, with zeros for data: the sum's noise is what everyone counts on, and a
noise share about no patient costs nothing. What it included and each split's declared
size go with the masked vector, outside DP, like every declared count.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import secrets
from dataclasses import replace
from functools import lru_cache

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message

from common import messages as M
from common import secagg as S
from common.config import ExperimentConfig
from common.ledger import Ledger, LedgerEntry
from common.messages import Item, Mechanism, ReplyState, Split
from common.privacy import InfeasibleTarget, epsilon_of_rdp
from common.secure_evaluation import (
    DECLARED,
    INCLUDED,
    MASKED,
    VARIANCES,
    EvaluationPart,
    evaluation_parts,
    part_of,
    vector_size,
)
from common.skellam import randomized_round, rdp_vector, skellam_noise
from common.training import resolve_device

from .evaluation import PlannedRelease, global_model, onset_declined, score
from .noise import calibrated_evaluation_noise
from .policy import PolicyRefusal
from .replies import AfterReading, answer
from .request import Request
from .secagg import Participant, SecAggRefusal
from .secure import (
    ints_of,
    keep_plain_for_tests,
    lines_of,
    load_state,
    public_keys_of,
    save_state,
    stage_request,
    start_round,
)

log = logging.getLogger("fedgru.client")

STATE_KEY = "fedgru-secagg-evaluation"  # apart from training's: a validation runs between two training rounds


@lru_cache(maxsize=64)
def secure_evaluation_variances(cfg_json: str, delta: float, min_honest: int, max_epsilon_alone: float
                                ) -> dict[tuple[Split, bool, Item], float]:
    """The Skellam variance per coordinate each hospital adds to each kind of evaluation
    release (keyed as ``calibrated_evaluation_noise``): the Gaussian calibration's
    variance times one factor per group, the least that keeps the group's planned
    releases within its epsilon counted over ``min_honest`` hospitals, and within
    ``max_epsilon_alone`` with this hospital's noise alone (a Skellam release costs a
    little more than a Gaussian of its variance: Agarwal et al. 2021, Cor. 3.6)."""
    cfg = ExperimentConfig.from_json(cfg_json)
    ev = cfg.evaluation
    try:
        gaussian = calibrated_evaluation_noise(cfg_json, delta)
    except InfeasibleTarget as exc:
        raise PolicyRefusal("evaluation", f"epsilon {exc.target:g} cannot be reached: {exc}") from None
    out = {}
    for split, target in ((Split.VAL, ev.val_epsilon), (Split.TEST, ev.test_epsilon)):
        kinds = []  # (key, Gaussian variance in integer units, sensitivity, releases planned)
        for (s, final, item), sigma in gaussian.items():
            if s != split or not math.isfinite(sigma):
                continue
            part = part_of(cfg, s, final, item)
            releases = len(cfg.validation_rounds()) if (split, final) == (Split.VAL, False) else 1
            kinds.append(((s, final, item), (sigma * part.l2) ** 2, part, releases))
        if not kinds:
            continue

        def epsilon_at(factor: float, hospitals: int) -> float:
            rdp = sum(rdp_vector(1.0, factor * variance / min_honest * hospitals, part.sensitivity(), releases)
                      for _, variance, part, releases in kinds)
            return epsilon_of_rdp(rdp, delta)

        def fits(factor: float) -> bool:
            return epsilon_at(factor, min_honest) <= target * (1 + 1e-9) and epsilon_at(factor, 1) <= max_epsilon_alone

        low, high = 0.0, math.log(1e4)
        if not fits(math.exp(high)):
            raise PolicyRefusal("evaluation", f"the {split.value} releases cannot keep epsilon {target:g} with this "
                                f"hospital's min_honest {min_honest} and max_epsilon_alone {max_epsilon_alone:g}")
        if not fits(1.0):
            while high - low > 1e-4:
                mid = (low + high) / 2
                low, high = (low, mid) if fits(math.exp(mid)) else (mid, high)
        factor = 1.0 if fits(1.0) else math.exp(high)
        for key, variance, _, _ in kinds:
            out[key] = factor * variance / min_honest
    return out


def required_variances(req: Request, parts: list[EvaluationPart]) -> list[float]:
    table = secure_evaluation_variances(req.cfg.to_json(), req.policy.delta, req.policy.min_honest,
                                        req.policy.max_epsilon_alone)
    final = req.final
    try:
        return [table[(p.split, final or p.split == Split.TEST, p.item)] for p in parts]
    except KeyError:
        raise PolicyRefusal("evaluate", "asks for a release this run's settings (evaluation.validate_every, "
                                        "run.rounds) do not plan") from None


def release_entry(req: Request, part: EvaluationPart, variance: float, examples: int) -> LedgerEntry:
    """The ledger entry of one part's release at ``variance`` per hospital."""
    m = req.policy.min_honest
    return LedgerEntry(req.run_id, req.server_round, Mechanism.SKELLAM,
                       f"{part.item.value.replace('-', ' ')} of the {part.split.value} split in a masked sum with a "
                       f"share of Skellam noise (secure aggregation; counted with {m} hospitals' noise)",
                       split=part.split, item=part.item, noise_multiplier=math.sqrt(m * variance) / part.l2,
                       alone_noise_multiplier=math.sqrt(variance) / part.l2, sample_rate=1.0, steps=1,
                       max_grad_norm=part.l2, l1_sensitivity=part.l1, examples=examples)


def plan(req: Request, ledger: Ledger, parts: list[EvaluationPart], variances: list[float]
         ) -> tuple[list[int], list[LedgerEntry], list[str]]:
    """Which parts this hospital puts its data in (indices), their ledger entries, and why
    any split is left out: decided from the message, the policy, the ledger (locked by
    the caller) and the declared counts, before any patient data is read."""
    planned_counts = req.cfg.planned_evaluations()
    included, entries, declined = [], [], []
    groups: dict[Split, list[int]] = {}  # by group of patients: each group's budget is checked on all it gives
    for split in req.splits:
        req.policy.check_evaluation_count(split, planned_counts.get(split.value, 0), ledger.releases_in_run(req.run_id, split))
        groups[split] = [i for i, p in enumerate(parts) if p.split == split and p.item != Item.ONSET_HISTOGRAM]
    onset = [i for i, p in enumerate(parts) if p.item == Item.ONSET_HISTOGRAM]  # the test session's, of validation stays
    if onset:
        why = onset_declined(req, ledger)
        if why:
            declined.append(why)
        else:
            groups.setdefault(Split.VAL, []).extend(onset)
    for split, mine in groups.items():
        n = req.declared.of(split)
        if n == 0:
            declined.append(f"{split.value}: this hospital declares no {split.value} stays")
            continue
        made = [release_entry(req, parts[i], variances[i], n) for i in mine]
        for e in made:
            e.check(f"{req.node.name}'s planned ledger entry")
        if ledger.epsilon_with(made) > req.policy.eval_max_epsilon:
            declined.append(f"{split.value}: the budget of its patients would be passed")
            continue
        if ledger.epsilon_with(made, alone=True) > req.policy.max_epsilon_alone:
            declined.append(f"{split.value}: its own noise alone would pass max_epsilon_alone")
            continue
        included += mine
        entries += made
    return included, entries, declined


def exact_vector(req: Request, data, parts: list[EvaluationPart], included: list[int], entries: list[LedgerEntry],
                 rng: np.random.Generator) -> np.ndarray:
    """The parts' exact releases as integers in the vector's order (zeros for a part left
    out): counts as they are, the importance scaled and rounded at random."""
    model = global_model(req, resolve_device(req.node.device))
    planned = [PlannedRelease(parts[i].split, parts[i].item, 0.0, e) for i, e in zip(included, entries)]
    records = score(req, data, model, planned) if planned else {}
    pieces = []
    for i, part in enumerate(parts):
        if i not in included:
            pieces.append(np.zeros(part.size, dtype=np.int64))
            continue
        if part.item == Item.HISTOGRAM:
            arrays = {k: v.numpy() for k, v in records[M.evaluation_key(part.split)].items()}
            values = np.concatenate([arrays["histogram"].ravel()] + ([arrays["confusion"].ravel()]
                                                                     if "confusion" in arrays else []))
        elif part.item == Item.HOURLY_HISTOGRAMS:
            values = records[M.HOURLY]["hourly-histograms"].numpy().ravel()
        elif part.item == Item.ONSET_HISTOGRAM:
            values = records[M.ONSET]["onset-histogram"].numpy().ravel()
        elif part.item == Item.SUBGROUP_HISTOGRAMS:
            values = records[M.SUBGROUPS]["subgroup-histograms"].numpy().ravel()
        else:
            values = randomized_round(records[M.IMPORTANCE]["importance"].numpy().ravel() * part.scale, rng)
        pieces.append(np.rint(values).astype(np.int64))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)


# -- the stages ------------------------------------------------------------------------
def _what(req: Request) -> str:
    """What a session evaluates, under which settings; its stages must all ask the same
    (the noise agreed at share-keys was checked against these settings)."""
    settings = hashlib.sha256(req.cfg.to_json().encode()).hexdigest()
    hours = None if req.hour_thresholds is None else req.hour_thresholds.tolist()
    return json.dumps([[s.value for s in req.splits], req.final, req.threshold, hours, settings])


def _parts(req: Request) -> list[EvaluationPart]:
    if not req.splits:
        raise PolicyRefusal("evaluate", "names no split to evaluate")
    return evaluation_parts(req.cfg, req.splits, req.final)


def _reply(req: Request, state: ReplyState, ledger: Ledger | None, content: dict | None = None, **extra) -> Message:
    return answer(req.msg, req.node.name, state, ledger, content, **extra)


def answer_secure_evaluation(msg: Message, context: Context, simulation=None) -> Message:
    """One stage of a secure evaluation (``common.secure_evaluation``)."""
    stage, req, config = stage_request(msg, context, simulation)
    parts = _parts(req)
    required = required_variances(req, parts)
    try:
        if stage == S.Stage.SETUP:
            me = start_round(req, context, config, req.server_round, req.policy.min_honest,
                             S.evaluation_session([s.value for s in req.splits], req.final))
            save_state(context, req, me, STATE_KEY, what=_what(req))
            return _reply(req, ReplyState.READY, None, **{S.MY_KEYS: me.my_keys(), VARIANCES: required})
        me, record = load_state(context, req, STATE_KEY)
        if str(record["what"]) != _what(req):
            raise SecAggRefusal("this stage asks for other releases than the session's setup did")
        if stage == S.Stage.SHARE_KEYS:
            try:
                variances = [float(v) for v in config[VARIANCES]]
            except (KeyError, TypeError, ValueError):
                raise SecAggRefusal(f"'{VARIANCES}' must be a list of numbers") from None
            if len(variances) != len(parts) or not all(
                    math.isfinite(v) and v >= r * (1 - 1e-9) for v, r in zip(variances, required)):
                raise SecAggRefusal("the noise variances are fewer, or less, than this hospital requires")
            shares = me.share_keys(public_keys_of(config), S.agreed_settings(config))
            save_state(context, req, me, STATE_KEY, what=_what(req), variances=variances)
            return _reply(req, ReplyState.READY, None,
                          **{S.SHARES_OUT: "\n".join(f"{dst}:{text}" for dst, text in sorted(shares.items()))})
        variances = [float(v) for v in record["variances"]] if "variances" in record else []
        if stage == S.Stage.COLLECT:
            return _collect(req, context, config, me, parts, variances)
        revealed = me.unmask(ints_of(config, S.SURVIVORS))
        save_state(context, req, me, STATE_KEY, what=_what(req), variances=variances)
        return _reply(req, ReplyState.READY, None,
                      **{S.REVEALED: "\n".join(f"{kind}:{owner}:{share}" for kind, owner, share in revealed)})
    except SecAggRefusal as exc:
        raise PolicyRefusal(f"secure aggregation ({stage.value})", str(exc)) from None


def _collect(req: Request, context: Context, config: ConfigRecord, me: Participant, parts: list[EvaluationPart],
             variances: list[float]) -> Message:
    if len(variances) != len(parts):
        raise SecAggRefusal("'collect' came before the noise was agreed ('share-keys')")
    me.receive({int(src): text for src, text in lines_of(config, S.CIPHERTEXTS, 2)})
    with req.store.transaction() as ledger:
        included, entries, declined = plan(req, ledger, parts, variances)  # before any patient data is read
        rng = np.random.default_rng(secrets.randbits(128))  # noise and rounding: the OS's entropy
        data = req.node.data() if included else None
        try:
            vector = exact_vector(req, data, parts, included, entries, rng) if included else \
                np.zeros(vector_size(parts), dtype=np.int64)
            noise = np.concatenate([skellam_noise(v, p.size, rng) for p, v in zip(parts, variances)])
            keep_plain_for_tests(req, "evaluate-" + "-".join(s.value for s in req.splits), vector + noise)
            masked = me.masked(vector + noise)
        except Exception as exc:  # noqa: BLE001 - nothing is recorded, nothing leaves
            if included:
                raise AfterReading() from exc
            raise
        for e in entries:
            ledger.record(replace(e, data=data.export))
    save_state(context, req, me, STATE_KEY, what=_what(req), variances=variances)
    log.info("%s: secure evaluation share sent (%s)", req.node.name, ", ".join(s.value for s in req.splits))
    declared = [req.declared.of(parts[i].split) for i in included]
    extra = {INCLUDED: ",".join(map(str, included)), DECLARED: ",".join(map(str, declared))}
    if declined:
        extra[M.NOT_EVALUATED] = "\n".join(declined)
    content = {MASKED: ArrayRecord({"vector": Array(masked.astype(np.int64))})}
    return _reply(req, ReplyState.EVALUATED, ledger, content, **extra)
