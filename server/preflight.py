"""The coordinator's side of the preflight (``common.preflight``): the run's plan goes to
every hospital before round 1, and only hospitals that accept it take part.

Each answer is read and checked; a hospital that refuses (or does not answer) is named
with its reason and the change that would fit, marked refused, and asked nothing further
in this run. One that accepts trains with the noise it named, sent back to it with every
round (it checks that noise again, as it checks every message). The run starts only when
at least ``strategy.min_hospitals`` accept. A hospital that first connects during the run
gets the same preflight before its first round.
"""

from __future__ import annotations

import logging
from collections import Counter

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from common import messages as M
from common.config import ExperimentConfig
from common.messages import ReplyState
from common.metrics import format_budget_left
from common.preflight import PreflightAnswer

from .discovery import HospitalView
from .exchange import exchange
from .records import HospitalState

log = logging.getLogger("fedgru.server")


def plan_message(cfg_json: str, run_id: str) -> RecordDict:
    return RecordDict({M.CONFIG: ConfigRecord({M.PREFLIGHT: 1, M.EXPERIMENT_JSON: cfg_json, M.RUN_ID: run_id,
                                               M.SERVER_ROUND: 0})})


def agree_plan(grid: Grid, views: list[HospitalView], cfg: ExperimentConfig, run_id: str, timeout: float,
               keep_ledgers: bool = True) -> list[PreflightAnswer]:
    """Send the run's plan to ``views``' hospitals; mark each accepted (its noise kept) or
    refused (its reason kept); return every answer (a hospital that did not answer gets a
    refused one, written here). ``keep_ledgers``: the hospitals keep their ledgers after
    the run (deployed; simulated ones start afresh), so a budget spent stays spent."""
    cfg_json = cfg.to_json()
    messages = [Message(plan_message(cfg_json, run_id), dst_node_id=v.node_id, message_type=MessageType.QUERY)
                for v in views]
    by_node = {v.node_id: v for v in views}
    answers: dict[str, PreflightAnswer] = {}
    for nid, reply in exchange(grid, messages, timeout):
        view = by_node.get(nid)
        if view is None:
            continue
        answers[view.name] = _read(view, reply, cfg.privacy.enabled)
    for view in views:
        if view.name not in answers:
            answers[view.name] = PreflightAnswer(view.name, False, "did not answer the preflight in time")
    for view in views:
        answer = answers[view.name]
        if answer.accepted:
            view.noise_multiplier = answer.noise_multiplier
        else:
            view.state, view.reason = HospitalState.REFUSED, f"refused the plan: {answer.reason}"
            log.error("%s refuses the plan: %s", view.name, answer.reason)
    accepted = [answers[v.name] for v in views if answers[v.name].accepted]
    if accepted:
        log.info("%s", accepted_line(accepted, len(views), keep_ledgers))
    return [answers[v.name] for v in views]


def accepted_line(accepted: list[PreflightAnswer], asked: int, keep_ledgers: bool = True) -> str:
    """One console line for every accepting hospital (each one's numbers are in the
    report's preflight table): the range of their noise multipliers, what set them, and
    the range of their training epsilons after the run."""
    def span(values: list[float], fmt: str) -> str:
        lo, hi = format(min(values), fmt), format(max(values), fmt)
        return lo if lo == hi else f"{lo} to {hi}"

    reasons = Counter(a.noise_set_by for a in accepted)
    set_by = ", ".join(f"{why} at {count} {'hospital' if count == 1 else 'hospitals'}"
                       for why, count in reasons.most_common())
    return (f"{len(accepted)} of {asked} hospitals accept the plan: noise multiplier "
            f"{span([a.noise_multiplier for a in accepted], '.3f')} (set by {set_by}), training epsilon after the run "
            f"{span([a.planned.get('train', 0.0) for a in accepted], '.3f')} (of "
            f"{span([a.remaining.get('train', 0.0) for a in accepted], '.3f')} budget left before it)"
            + (spent_words(accepted) if keep_ledgers else ""))


def spent_words(accepted: list[PreflightAnswer]) -> str:
    """Where a second run like this one would no longer fit a group of patients that a
    later run scores again (validation, test), said before anything is spent: such a
    hospital refuses it (a new user's try-out of three rounds locked its hospitals out of
    every later run, and nothing said so). Each hospital's answer says, from its policy and
    ledger, what a second run would take the group to (composed, as its own check does)."""
    parts = []
    for group, label in (("val", "validation"), ("test", "test")):
        names = sorted(a.hospital for a in accepted
                       if group in a.budgets and group in a.again and a.again[group] > a.budgets[group] + 1e-9)
        if names:
            parts.append(f"the {label} patients' at " + ("every hospital" if len(names) == len(accepted) else
                                                         ", ".join(names)))
    if not parts:
        return ""
    return ("; after it a second run like it no longer fits the budget of " + " and of ".join(parts)
            + " (each hospital's policy eval_max_epsilon; `hospital init --eval-epsilon`)")


def _read(view: HospitalView, reply: Message, dp: bool) -> PreflightAnswer:
    """One hospital's answer, checked: a malformed one counts as a refusal."""
    if reply.has_error():
        return PreflightAnswer(view.name, False, f"could not answer ({reply.error.reason[:300]})")
    try:
        status = dict(reply.content[M.STATUS])
        state = str(status.get(M.STATE, ""))
        if state == ReplyState.REFUSED and M.PLAN not in status:  # no ledger, an unreadable folder, ...
            return PreflightAnswer(view.name, False, str(status.get(M.REASON, ""))[:500])
        answer = PreflightAnswer.from_status(status)
    except (KeyError, TypeError, ValueError, ArithmeticError) as exc:  # 1e400 or a 400-digit int: OverflowError
        return PreflightAnswer(view.name, False, f"its answer to the plan cannot be read ({exc.__class__.__name__})")
    if answer.hospital != view.name or answer.accepted != (state == ReplyState.ACCEPTED):
        return PreflightAnswer(view.name, False, "its answer to the plan contradicts itself or names another hospital")
    if answer.accepted and dp and not answer.noise_multiplier > 0:
        return PreflightAnswer(view.name, False, "it accepted the plan without naming its noise")
    return answer


def connected_status(grid: Grid, cfg: ExperimentConfig, wait_s: float = 30.0) -> str:
    """``fedgru status``: which hospitals are connected, whether each runs this app
    version (a hospital serves only the versions its staff approved), and each one's
    answer to this config's plan with its remaining budgets. Nothing is trained or
    released: the preflight reads ledgers, not patients."""
    from functools import partial

    from .discovery import Roster, who_are_you

    roster = Roster()
    roster.discover(grid, partial(who_are_you, "status"), wait_s, min_hospitals=0)
    agreed = roster.agreed_config(cfg)
    views = [v for v in roster.hospitals.values() if v.active]
    answers = {a.hospital: a for a in agree_plan(grid, views, agreed, "status", min(120.0, cfg.strategy.round_timeout_s))}
    rows = []
    for view in sorted(roster.hospitals.values(), key=lambda v: v.name):
        answer = answers.get(view.name)
        # a group the answer did not state prints n/a, never "under 0.001" (spent)
        left = " / ".join(format_budget_left(answer.remaining.get(g)) for g in ("train", "val", "test")) \
            if answer and answer.remaining else ""
        if answer is not None and answer.accepted:
            plan = f"accepts (noise {answer.noise_multiplier:.3g}, set by {answer.noise_set_by})"
        else:
            plan = f"refuses: {answer.reason if answer else view.reason}"
        rows.append(f"{view.name:20s} runs this app version; budget left train/val/test {left or '?'}; {plan}")
    for nid, why in sorted(roster.errors.items()):
        if nid not in roster.hospitals:
            rows.append(f"{'node ' + str(nid):20s} does not run this app version, or failed: {why[:300]}")
    head = f"{len(roster.hospitals)} hospital(s) connected, {sum(a.accepted for a in answers.values())} accept this plan"
    return "\n".join([head, *rows])
