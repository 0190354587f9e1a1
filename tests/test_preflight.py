"""Nothing spent for nothing: the run's whole plan is agreed with each hospital first.

The hospital's side (client.preflight, through its real ClientApp on its own folder):
it answers from its policy, declared counts and ledger without reading a patient or
charging anything; it fits its noise to its per-round ceiling and its remaining budget,
or refuses with the change that would fit, and that change does fit; an accepted plan
then trains every planned round and makes every planned release without a refusal. The
coordinator's side (server.preflight, on a grid without network): only hospitals that
accept take part, and a run in which no hospital trained asks for no release at all.
"""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import yaml
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client import app as client_app
from client.folder import FolderError, HospitalFolder
from client.ledger_store import FileLedgerStore
from common import messages as M
from common.data.preprocess import num_steps
from common.ledger import LedgerEntry
from common.messages import Item, Mechanism, ReplyState, Split
from common.preflight import PreflightAnswer
from tests.conftest import (
    ReplayGrid,
    folder_ledger,
    hospital_cfg,
    hospital_message,
    make_hospital,
    node_context,
    reply_status,
)


@pytest.fixture(autouse=True)
def _identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield


@pytest.fixture
def hospital(hospital_data, tmp_path):
    """A hospital folder as `fedgru hospital init` makes it, with the default policy (budget 1)."""
    return make_hospital(tmp_path, *hospital_data, max_epsilon=1.0)


def _spend(folder, entries: list[LedgerEntry]) -> None:
    f = HospitalFolder(folder)
    with FileLedgerStore(f.ledger_file, f.secret("ledger")).transaction() as ledger:
        for entry in entries:
            ledger.record(entry)


def _plan(folder, cfg, run_id: str = "run-p") -> PreflightAnswer:
    msg = Message(RecordDict({M.CONFIG: ConfigRecord({M.PREFLIGHT: 1, M.EXPERIMENT_JSON: cfg.to_json(), M.RUN_ID: run_id,
                                                      M.SERVER_ROUND: 0})}), dst_node_id=7, message_type=MessageType.QUERY)
    status = reply_status(client_app.query(msg, node_context(folder)))
    answer = PreflightAnswer.from_status(status)
    assert status[M.STATE] == (ReplyState.ACCEPTED if answer.accepted else ReplyState.REFUSED_POLICY)
    return answer


def _fix(answer: PreflightAnswer) -> tuple[str, float]:
    """The setting and value a refusal says would fit."""
    key, value = re.search(r"use ([\w.]+) (?:>=|<=) ([0-9.e-]+)", answer.reason).groups()
    return key, float(value)


def test_the_issues_first_deployment_trains_instead_of_burning_its_evaluation_budget(hospital, monkeypatch):
    """Two hospitals, the default policy, 3 rounds: round 1 was refused (0.551 per round
    against a ceiling of 0.5) and the run then spent both evaluation budgets on the
    untrained model. The hospital now fits its noise to its ceiling at the preflight."""
    from client import export

    reads = []
    monkeypatch.setattr(export, "load", lambda folder: reads.append(1))
    cfg = hospital_cfg("run.rounds=3")
    answer = _plan(hospital, cfg)
    assert answer.accepted and answer.noise_set_by == "its per-round ceiling"
    assert answer.remaining == {"train": 1.0, "val": 1.0, "test": 1.0}
    assert answer.planned["train"] <= 1.0 + 1e-9 and answer.planned["val"] <= 1.0 + 1e-9
    assert not reads and folder_ledger(hospital).entries == []  # the preflight reads no patient and spends nothing


def test_an_accepted_plan_trains_and_evaluates_every_planned_release(hospital):
    cfg = hospital_cfg("run.rounds=3", "evaluation.validate_every=1")
    answer = _plan(hospital, cfg)
    assert answer.accepted
    context = node_context(hospital)
    for r in range(1, 4):
        msg = hospital_message(cfg, "run-p", r, evaluate="val" if r in cfg.validation_rounds() else "",
                               **{M.NOISE: answer.noise_multiplier})
        status = reply_status(client_app.train(msg, context))
        assert status[M.STATE] == ReplyState.TRAINED and M.NOT_EVALUATED not in status, status
    # the test release comes, as from an honest coordinator, with each hour's threshold for the onset histogram
    hours = {M.THRESHOLD: 0.15, M.HOUR_THRESHOLDS: [0.3] * num_steps(cfg.features)}
    for split in ("val", "test"):
        extra = hours if split == "test" else {}
        status = reply_status(client_app.evaluate(hospital_message(cfg, "run-p", 3, MessageType.EVALUATE, split, **extra),
                                                  context))
        assert status[M.STATE] == ReplyState.EVALUATED and M.NOT_EVALUATED not in status, status
    ledger = folder_ledger(hospital)
    for split in Split:
        assert ledger.epsilon(split) == pytest.approx(answer.planned[split.value], rel=1e-9), split
    assert {e.noise_multiplier for e in ledger.noisy(Split.TRAIN)} == {answer.noise_multiplier}


def test_a_fixed_noise_below_the_floor_or_over_the_ceiling_is_refused_with_a_fix_that_fits(hospital):
    low = _plan(hospital, hospital_cfg("run.rounds=3", "privacy.noise_multiplier=0.3", "privacy.target_epsilon=0"))
    assert not low.accepted and low.reason.startswith("'privacy.noise_multiplier' is 0.3") and "use at least 0.5" in low.reason
    costly = _plan(hospital, hospital_cfg("run.rounds=3", "privacy.noise_multiplier=0.6", "privacy.target_epsilon=0"))
    assert not costly.accepted and "allows 0.5 per round" in costly.reason
    key, value = _fix(costly)
    assert key == "privacy.noise_multiplier"
    fitted = _plan(hospital, hospital_cfg("run.rounds=3", f"privacy.noise_multiplier={value}", "privacy.target_epsilon=0"))
    assert fitted.accepted and fitted.noise_multiplier == value and fitted.noise_set_by == "the run's setting"
    assert folder_ledger(hospital).entries == []


def test_a_spent_budget_raises_the_noise_so_the_run_fits_what_is_left(hospital):
    _spend(hospital, [LedgerEntry("earlier", r, Mechanism.DP_SGD, "weights", noise_multiplier=6.0, sample_rate=0.2,
                                  steps=5, max_grad_norm=3.0, examples=100) for r in range(1, 3)])
    spent = folder_ledger(hospital).epsilon()
    assert 0.3 < spent < 1.0
    answer = _plan(hospital, hospital_cfg("run.rounds=20"))
    assert answer.accepted and answer.noise_set_by == "its remaining budget"
    assert answer.remaining["train"] == pytest.approx(1.0 - spent)
    assert spent < answer.planned["train"] <= 1.0


def test_a_budget_left_equal_to_the_target_credits_the_target(hospital):
    """A fresh hospital with budget 1 and a 40-round run at target epsilon 1: both searches find the
    same noise, so the target set it (a rounding tie had named "its remaining budget")."""
    answer = _plan(hospital, hospital_cfg("run.rounds=40", "privacy.target_epsilon=1.0"))
    assert answer.accepted and answer.remaining["train"] == pytest.approx(1.0)
    assert answer.noise_set_by == "the run's target epsilon"
    assert answer.planned["train"] <= 1.0 + 1e-9
    from client.noise import _largest

    assert _largest([(32.4878, "target"), (32.4881, "budget")]) == (32.4881, "target")  # one noise found twice
    assert _largest([(10.0, "target"), (11.0, "budget"), (10.5, "ceiling")]) == (11.0, "budget")


def test_a_target_far_above_the_budget_left_is_refused_naming_the_target(hospital):
    """A target epsilon far over what is left plans so little noise that the hospital's
    budget would need over 10 times as much: its updates would be mostly noise, so it
    refuses, naming privacy.target_epsilon and both noise multipliers."""
    answer = _plan(hospital, hospital_cfg("run.rounds=3", "privacy.target_epsilon=1000"))
    assert not answer.accepted
    assert answer.reason.startswith("'privacy.target_epsilon' is 1000, which plans noise multiplier ")
    assert "remaining training budget (1 of 1) would need " in answer.reason and "over 10 times as much" in answer.reason
    assert folder_ledger(hospital).entries == []


def test_a_spent_training_budget_refuses_the_plan(hospital):
    _spend(hospital, [LedgerEntry("earlier", r, Mechanism.DP_SGD, "weights", noise_multiplier=1.0, sample_rate=0.5,
                                  steps=5, max_grad_norm=3.0, examples=100) for r in range(1, 5)])
    answer = _plan(hospital, hospital_cfg("run.rounds=3"))
    assert not answer.accepted and "budget is spent" in answer.reason and answer.remaining["train"] == 0.0


def test_evaluation_budget_left_refuses_with_the_epsilon_that_would_fit(hospital):
    _spend(hospital, [LedgerEntry("earlier", 1, Mechanism.GAUSSIAN, "histogram", split=Split.TEST, item=Item.HISTOGRAM,
                                  noise_multiplier=8.0, sample_rate=1.0, steps=1, max_grad_norm=1.0, examples=30)])
    answer = _plan(hospital, hospital_cfg("run.rounds=3"))
    assert not answer.accepted and answer.reason.startswith("'evaluation.test_epsilon' plans test releases")
    key, value = _fix(answer)
    assert key == "evaluation.test_epsilon" and 0 < value < 1
    assert _plan(hospital, hospital_cfg("run.rounds=3", f"evaluation.test_epsilon={value}")).accepted


def test_too_many_validations_are_refused_with_the_interval_that_fits(hospital):
    answer = _plan(hospital, hospital_cfg("run.rounds=40", "evaluation.validate_every=1"))
    assert not answer.accepted and answer.reason.startswith("'evaluation.validate_every' plans 40 validation releases")
    key, value = _fix(answer)
    assert key == "evaluation.validate_every"
    assert _plan(hospital, hospital_cfg("run.rounds=40", f"evaluation.validate_every={int(value)}")).accepted
    assert not _plan(hospital, hospital_cfg("run.rounds=40", f"evaluation.validate_every={int(value) - 1}")).accepted


def test_a_target_no_noise_can_reach_is_refused_with_the_least_that_can(hospital):
    answer = _plan(hospital, hospital_cfg("run.rounds=200", "training.local_epochs=2", "privacy.target_epsilon=0.05"))
    assert not answer.accepted and "is 0.05: epsilon 0.05 is below the least the RDP accountant can certify" in answer.reason
    least = float(re.search(r"use at least ([0-9.]+)", answer.reason).group(1))
    assert _plan(hospital, hospital_cfg("run.rounds=200", "training.local_epochs=2",
                                        f"privacy.target_epsilon={least}", "evaluation.validate_every=0")).accepted


# ---------------------------------------------------------------------------------------
# The coordinator's side
# ---------------------------------------------------------------------------------------


class RecordingGrid(ReplayGrid):
    """Answers with each node's prepared reply to the message type asked; records every message sent."""

    def __init__(self, answers: dict[tuple[int, str], Message]):
        super().__init__([])
        self.answers, self.sent = answers, []

    def get_node_ids(self):
        return sorted({nid for nid, _ in self.answers})

    def push_messages(self, messages):
        self.replies = []
        for i, m in enumerate(messages):
            m.metadata.__dict__["_message_id"] = f"m{len(self.sent)}-{i}"
            self.sent.append(m)
            reply = self.answers.get((m.metadata.dst_node_id, m.metadata.message_type))
            if reply is not None:
                self.replies.append(_answering(reply, m))
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, message_ids):
        return list(self.replies)


def _answering(reply: Message, request: Message) -> Message:
    return Message(reply.content, reply_to=request)


def _answer(nid: int, name: str, accepted: bool) -> Message:
    request = Message(RecordDict({M.CONFIG: ConfigRecord({"x": 1})}), dst_node_id=nid, message_type=MessageType.QUERY)
    answer = PreflightAnswer(name, accepted, "" if accepted else "'privacy.noise_multiplier' is 0.3; use at least 0.5",
                             noise_multiplier=2.0 if accepted else 0.0, noise_set_by="the run's target epsilon",
                             planned={"train": 0.5, "val": 0.5, "test": 0.5}, remaining={"train": 1, "val": 1, "test": 1})
    return Message(RecordDict({M.STATUS: ConfigRecord(answer.to_status())}), reply_to=request)


def test_a_run_no_hospital_accepts_asks_nothing_further_and_releases_nothing(tmp_path):
    from server.coordinator import Coordinator, HospitalView
    from server.outputs import RunRecorder

    cfg = hospital_cfg("run.rounds=3")
    grid = RecordingGrid({(1, MessageType.QUERY): _answer(1, "a", False), (2, MessageType.QUERY): _answer(2, "b", False)})
    coord = Coordinator(cfg, grid, RunRecorder(tmp_path, cfg, "run-x"), "run-x")
    coord.hospitals = {1: HospitalView("a", 1), 2: HospitalView("b", 2)}
    assert not coord.agree_plan()
    coord.not_started = "the run did not start"
    coord.run()
    assert {m.metadata.message_type for m in grid.sent} == {MessageType.QUERY}  # no training, no evaluation
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["test"] is None and metrics["not_evaluated"] == "the run did not start"
    assert [a["accepted"] for a in metrics["preflight"]] == [False, False]
    assert not (tmp_path / "model.pt").exists()
    report = (tmp_path / "report.md").read_text()
    assert "| a | refuses: 'privacy.noise_multiplier' is 0.3; use at least 0.5 |" in report
    assert "without differential privacy" not in report  # DP was on; nothing was released at all


def test_an_accepting_hospital_gets_its_own_noise_and_a_refusing_one_nothing(tmp_path):
    from server.coordinator import Coordinator, HospitalView
    from server.outputs import RunRecorder

    cfg = hospital_cfg("run.rounds=1", "strategy.min_hospitals=1", "strategy.round_timeout_s=0.5")
    grid = RecordingGrid({(1, MessageType.QUERY): _answer(1, "a", True), (2, MessageType.QUERY): _answer(2, "b", False)})
    coord = Coordinator(cfg, grid, RunRecorder(tmp_path, cfg, "run-y"), "run-y")
    coord.hospitals = {1: HospitalView("a", 1), 2: HospitalView("b", 2)}
    assert coord.agree_plan()
    coord.train_round(1)
    training = [m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN]
    assert [m.metadata.dst_node_id for m in training] == [1]
    assert training[0].content[M.CONFIG][M.NOISE] == 2.0
    assert coord.hospitals[2].state.value == "refused" and "use at least 0.5" in coord.hospitals[2].reason


def test_no_evaluation_is_asked_for_a_model_nobody_trained(tmp_path):
    """Every hospital accepted, but no round's replies could be used: the final
    validation and test releases are not requested (each would cost its patients'
    budget for an untrained model)."""
    from server.coordinator import Coordinator, HospitalView
    from server.outputs import RunRecorder

    cfg = hospital_cfg("run.rounds=2", "evaluation.validate_every=1", "strategy.round_timeout_s=0.5")
    grid = RecordingGrid({(1, MessageType.QUERY): _answer(1, "a", True), (2, MessageType.QUERY): _answer(2, "b", True)})
    coord = Coordinator(cfg, grid, RunRecorder(tmp_path, cfg, "run-z"), "run-z")
    coord.hospitals = {1: HospitalView("a", 1), 2: HospitalView("b", 2)}
    assert coord.agree_plan()
    coord.run()  # the grid has no training replies: both rounds are skipped
    kinds = [m.metadata.message_type for m in grid.sent]
    assert MessageType.EVALUATE not in kinds
    assert all(not str(m.content[M.CONFIG].get(M.EVALUATE, "")) for m in grid.sent if m.metadata.message_type == MessageType.TRAIN)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["not_evaluated"].startswith("no hospital trained in this run")
    report = (tmp_path / "report.md").read_text()  # no model was released, and the settings do not claim one
    assert "Released model: none (no round trained" in report and "exponential average" not in report


def test_a_secure_plan_tells_the_coordinator_the_least_threshold_its_policy_accepts(hospital):
    """Under secure aggregation the answer carries the policy's min_honest and max_colluding
    (settings, not data), and the coordinator's threshold rises to the least they accept:
    with max_colluding 1, 4 of 5 where the majority would be 3 (every hospital refused 3)."""
    import dataclasses

    from client.folder import HospitalFolder, write_settings
    from common.secagg import least_threshold
    from server.secagg import default_threshold

    settings = HospitalFolder(hospital).settings
    write_settings(hospital, dataclasses.replace(settings, policy=dataclasses.replace(settings.policy, max_colluding=1,
                                                                                      min_honest=2)))
    secure = hospital_cfg("privacy.aggregation=secure", "training.sample_rate=1.0", "evaluation.validate_every=0")
    answer = _plan(hospital, secure)
    assert answer.accepted and (answer.min_honest, answer.max_colluding) == (2, 1)
    plain = _plan(hospital, hospital_cfg())
    assert plain.accepted and (plain.min_honest, plain.max_colluding) == (0, 0)  # per-hospital DP: nothing to say
    policies = [(answer.min_honest, answer.max_colluding)]
    assert default_threshold(secure, 5) == 3 and default_threshold(secure, 5, policies) == 4 == least_threshold(5, 1)
    assert default_threshold(secure, 3, policies) == 3  # all of 3: 2t > 3 + 1
    # a hospital no threshold of 2 satisfies refuses that round itself; the others keep their majority
    assert default_threshold(secure, 2, [(1, 3)]) == default_threshold(secure, 2)
    assert default_threshold(secure, 5, [(5, 0)]) == 5  # min_honest 5: no fewer than all five
    fixed = hospital_cfg("privacy.aggregation=secure", "privacy.secure_threshold=3")
    assert default_threshold(fixed, 5, policies) == 3  # the operator's fixed threshold stands (hospitals refuse it)


def test_a_preflight_answer_with_a_negative_policy_setting_is_not_read():
    bad = PreflightAnswer("h", True, "", 1.0, "x", max_colluding=-1).to_status()
    with pytest.raises(ValueError, match="whole numbers from 0"):
        PreflightAnswer.from_status(bad)


def test_the_coordinator_counts_only_the_policies_of_a_sessions_own_hospitals(caplog):
    """SecureRounds.threshold reads the accepted preflight answers of the session's
    hospitals: a stricter hospital that dropped out no longer raises it; logged once."""
    from types import SimpleNamespace

    from server.secure_round import SecureRounds

    cfg = hospital_cfg("privacy.aggregation=secure")
    names = {1: "a", 2: "b", 3: "c", 4: "d", 5: "e"}
    answers = [PreflightAnswer(n, True, "", 1.0, "x", min_honest=2, max_colluding=1 if n == "e" else 0)
               for n in names.values()] + [PreflightAnswer("f", False, "refused", max_colluding=3)]
    co = SimpleNamespace(cfg=cfg, hospitals={nid: SimpleNamespace(name=n) for nid, n in names.items()},
                         recorder=SimpleNamespace(preflight=answers))
    rounds = SecureRounds(co)
    with caplog.at_level("INFO", logger="fedgru.server"):
        assert rounds.threshold([1, 2, 3, 4, 5]) == 4 and rounds.threshold([1, 2, 3, 4, 5]) == 4  # e allows a colluder
        assert rounds.threshold([1, 2, 3, 4]) == 3  # e gone: a majority of 4
    assert sum("threshold 4 of 5, the least the policy of e accepts" in r.getMessage() for r in caplog.records) == 1


def _rounds(cfg, policies: dict[str, tuple[int, int]]):
    """SecureRounds over hospitals a, b, ... (node ids 1, 2, ...) whose accepted preflight
    answers state ``policies``: name -> (min_honest, max_colluding)."""
    from types import SimpleNamespace

    from server.secure_round import SecureRounds

    answers = [PreflightAnswer(n, True, "", 1.0, "x", min_honest=h, max_colluding=c) for n, (h, c) in policies.items()]
    views = {k: SimpleNamespace(name=n, active=True, reason="") for k, n in enumerate(policies, start=1)}
    return SecureRounds(SimpleNamespace(cfg=cfg, hospitals=views, recorder=SimpleNamespace(preflight=answers)))


def test_an_operator_can_keep_one_strict_policy_from_taking_everyones_dropout_tolerance(caplog):
    """privacy.secure_min_dropouts 1: e's policy (max_colluding 3 of 5 needs all five, no
    dropout survived) is not followed: the sessions leave e out (a warning names it once,
    the report gives the reason), and the other four, at their least threshold 3 of 4,
    survive a dropout. Asked, e could only have held everyone to 5 of 5 or refused, and a
    refusal is a dropout already."""
    from common.config import ConfigError
    from common.secagg import least_threshold
    from server.secagg import default_threshold

    keep_one = hospital_cfg("privacy.aggregation=secure", "privacy.secure_min_dropouts=1")
    follow_all = hospital_cfg("privacy.aggregation=secure")
    assert default_threshold(follow_all, 5, [(2, 1)] * 4 + [(2, 3)]) == 5 == least_threshold(5, 3)  # no dropout survived
    strict = {"a": (2, 1), "b": (2, 1), "c": (2, 1), "d": (2, 1), "e": (2, 3)}
    rounds = _rounds(keep_one, strict)
    with caplog.at_level("INFO", logger="fedgru.server"):
        assert rounds.session_nodes() == [1, 2, 3, 4] == rounds.session_nodes()
        assert rounds.threshold([1, 2, 3, 4]) == 3 == least_threshold(4, 1)  # 4 - 3: one dropout survived
    warned = [r.getMessage() for r in caplog.records if "secure_min_dropouts" in r.getMessage()]
    assert len(warned) == 1 and "left out e:" in warned[0], warned
    assert rounds.co.hospitals[5].reason.startswith("left out of secure aggregation")
    assert _rounds(follow_all, strict).session_nodes() == [1, 2, 3, 4, 5]  # the default follows every policy
    with pytest.raises(ConfigError, match="secure_min_dropouts"):
        hospital_cfg("privacy.aggregation=secure", "privacy.secure_min_dropouts=-1")


@pytest.mark.parametrize("extra,policies,kept,said", [
    # a review's collapse: 2 dropouts wanted of 5 with one max_colluding-1 hospital left everyone out;
    # leaving e out gives 4 at 3 of 4, no more dropouts survived than 5 at 4 of 5: all kept, and said so
    (("privacy.secure_min_dropouts=2",), {"a": (2, 0), "b": (2, 0), "c": (2, 0), "d": (2, 0), "e": (2, 1)},
     [1, 2, 3, 4, 5], "leaving out the hospitals whose policy raised it would not survive more"),
    # two hospitals, one dropout wanted: the run's own majority (2 of 2) is no policy's fault
    (("privacy.secure_min_dropouts=1",), {"a": (2, 0), "b": (2, 0)}, [1, 2], "the run's own rule"),
    # the run's min_honest 4 sets 4 of 5 whatever the policies: nobody is left out for it
    (("privacy.secure_min_dropouts=2", "privacy.min_honest=4"),
     {"a": (2, 0), "b": (2, 0), "c": (2, 0), "d": (2, 0), "e": (2, 0)}, [1, 2, 3, 4, 5], "the run's own rule"),
])
def test_the_dropout_limit_never_leaves_out_a_hospital_for_the_runs_own_rule(caplog, extra, policies, kept, said):
    with caplog.at_level("WARNING", logger="fedgru.server"):
        assert _rounds(hospital_cfg("privacy.aggregation=secure", *extra), policies).session_nodes() == kept
    warned = [r.getMessage() for r in caplog.records if "secure_min_dropouts" in r.getMessage()]
    assert len(warned) == 1 and said in warned[0] and "left out" not in warned[0], warned


@pytest.mark.parametrize("field, value", [("min_honest", "1e400"), ("max_colluding", "1" + "0" * 400),
                                          ("declared_train", "2.5"), ("noise_multiplier", "1" + "0" * 400)])
def test_a_hostile_answer_with_an_overflowing_number_is_a_refusal_not_a_crash(field, value):
    """json gives inf for 1e400 and a 400-digit int for the other: int() and float() raise
    OverflowError, which the coordinator did not catch (one hospital ended every one's run)."""
    from server.coordinator import HospitalView
    from server.preflight import _read

    reply = _answer(1, "a", True)
    status = dict(reply.content[M.STATUS])
    plan = json.loads(status[M.PLAN])
    plan[field] = json.loads(value)
    status[M.PLAN] = json.dumps(plan)
    forged = Message(RecordDict({M.STATUS: ConfigRecord(status)}), reply_to=Message(
        RecordDict({M.CONFIG: ConfigRecord({"x": 1})}), dst_node_id=1, message_type=MessageType.QUERY))
    answer = _read(HospitalView("a", 1), forged, dp=True)
    assert not answer.accepted and answer.reason.startswith("its answer to the plan cannot be read")


def test_the_console_says_before_anything_is_spent_when_a_second_run_would_not_fit():
    """A new user's three-round try-out spent its hospitals' whole validation and test
    budgets (1 each, the run's val_epsilon and test_epsilon), so every later run that
    scores them is refused, and nothing said so. The plan line now does, per group and
    hospital, where hospitals keep their ledgers; a simulation (fresh ledgers every run)
    does not. Each hospital says what a second run would take a group to."""
    from server.preflight import accepted_line

    def answer(name, val_again, test_again=1.4):
        return PreflightAnswer(name, True, "", 3.8, "the run's target", {"train": 0.83, "val": 0.9, "test": 0.9},
                               {"train": 1.0, "val": 1.0, "test": 3.0}, {"train": 1.0, "val": 1.0, "test": 3.0},
                               again={"val": val_again, "test": test_again})

    both = accepted_line([answer("a", 1.46), answer("b", 1.46)], 2)
    assert "after it a second run like it no longer fits the budget of the validation patients' at every hospital" in both
    assert "test patients'" not in both  # 1.4 of 3 fits
    split = accepted_line([answer("a", 1.46), answer("b", 0.8, test_again=3.2)], 2)
    assert "the validation patients' at a and of the test patients' at b" in split  # not "every hospital"
    assert "no longer fits" not in accepted_line([answer("a", 0.99)], 1)
    assert "no longer fits" not in accepted_line([answer("a", 1.46)], 1, keep_ledgers=False)
    old = PreflightAnswer("a", True, "", 3.8, "x", {"train": 0.8, "val": 1.0}, {"train": 1.0})  # an app without them
    assert "no longer fits" not in accepted_line([old], 1)
    assert PreflightAnswer.from_status(answer("a", 1.46).to_status()).again == {"val": 1.46, "test": 1.4}


def test_a_hospital_says_what_a_second_run_of_the_plan_would_take_each_group_to(hospital):
    """From its policy and ledger only: the composed epsilon of the plan's releases twice;
    its training budget is its own policy's, not the run's cap."""
    cfg = hospital_cfg("evaluation.val_epsilon=1.0", "evaluation.test_epsilon=1.0")
    answer = _plan(hospital, cfg)
    assert answer.accepted and answer.budgets["train"] == HospitalFolder(hospital).policy.max_epsilon
    for group in ("val", "test"):
        assert answer.planned[group] < answer.again[group] < 2 * answer.planned[group]  # composed, not added


def test_a_hospital_that_keeps_only_gaussian_onset_noise_refuses_a_laplace_plan_before_reading_data(
        hospital, monkeypatch):
    """policy.onset_noise: [gaussian] (a hospital planning many runs, where the Gaussian
    composes better): a plan with the default's discrete Laplace is refused at the
    preflight, naming the setting and the fix, before any patient is read; the same plan
    with Gaussian noise is accepted (secure aggregation's Skellam shares: the next test).
    A policy naming an unknown noise does not open."""
    from client import export

    settings = hospital / "hospital.yaml"
    text = yaml.safe_load(settings.read_text())
    assert text["policy"]["onset_noise"] == ["laplace", "gaussian"]  # hospital init writes both
    text["policy"]["onset_noise"] = ["gaussian"]
    settings.write_text(yaml.safe_dump(text))
    reads = []
    monkeypatch.setattr(export, "load", lambda folder: reads.append(1))
    refused = _plan(hospital, hospital_cfg("run.rounds=3"))
    assert not refused.accepted and "evaluation.onset_noise" in refused.reason
    assert "use evaluation.onset_noise=gaussian" in refused.reason
    assert _plan(hospital, hospital_cfg("run.rounds=3", "evaluation.onset_noise=gaussian")).accepted
    assert not reads and folder_ledger(hospital).entries == []
    text["policy"]["onset_noise"] = ["gaussian", "uniform"]
    settings.write_text(yaml.safe_dump(text))
    with pytest.raises(FolderError, match="onset_noise"):
        HospitalFolder(hospital)


def test_the_onset_noise_a_policy_lists_binds_only_the_mechanisms_it_names():
    from client.policy import PolicyRefusal, default_policy

    policy = dataclasses.replace(default_policy(1.0, 1e-5, 1.0), onset_noise=["gaussian"])
    with pytest.raises(PolicyRefusal, match="onset histogram only with gaussian"):
        policy.check_evaluation(hospital_cfg(), Split.VAL, 1)
    policy.check_evaluation(hospital_cfg(), Split.TEST, 1)  # the test split's own releases are Gaussian
    # under secure aggregation the histogram is a sum of Skellam shares whatever onset_noise says: neither
    # list refuses it (a refusal there would name a fix that changes nothing)
    for kept in (["gaussian"], ["laplace"]):
        listed = dataclasses.replace(policy, onset_noise=kept)
        for noise in ("laplace", "gaussian"):
            listed.check_evaluation(hospital_cfg("privacy.aggregation=secure", f"evaluation.onset_noise={noise}"),
                                    Split.VAL, 1)
    with pytest.raises(PolicyRefusal, match="use evaluation.onset_noise=laplace"):
        dataclasses.replace(policy, onset_noise=["laplace"]).check_evaluation(
            hospital_cfg("evaluation.onset_noise=gaussian"), Split.VAL, 1)
