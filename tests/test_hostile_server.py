"""A hospital's privacy holds against the coordinator itself, and the coordinator holds
against a hostile hospital.

Each test plays one row of the attack table (issue "A hospital's privacy holds even
against the server") against the real hospital ClientApp on its own folder, with real
Flower Message objects in process, or against the real coordinator with crafted
replies. A different app submitted to the SuperLink is played by the deployment test
(a real SuperNode). The last test checks a whole simulated run: every value in every
reply is a DP release in the ledger or a declared non-DP release.
"""

from __future__ import annotations

import bisect
import json
import math
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
import yaml
from flwr.app import ArrayRecord, MessageType
from flwr.supercore.task_identity import TaskIdentity

from client import app as client_app
from client.folder import FolderError, HospitalFolder
from common import messages as M
from common.ledger import Ledger
from common.messages import Item, Mechanism, ReplyState, Split
from common.metrics import ScoreGrid, ScoreSummary
from common.model import GRUClassifier, model_spec
from common.privacy import epsilon
from common.training import predict_proba
from server.coordinator import initial_arrays
from tests.conftest import (
    ROOT,
    coordinator_for,
    folder_ledger,
    hospital_cfg,
    hospital_message,
    make_hospital,
    node_context,
    reply_status,
    small_cfg,
    train_reply,
)


@pytest.fixture(autouse=True)
def _identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield


@pytest.fixture
def hospital(hospital_data, tmp_path):
    return make_hospital(tmp_path, *hospital_data, max_epsilon=2.5)


def _refused(reply, setting: str) -> None:
    status = reply_status(reply)
    assert status[M.STATE] == ReplyState.REFUSED_POLICY, status
    assert setting in status[M.REASON]
    assert not reply.content.array_records and not reply.content.metric_records  # nothing released


# ---------------------------------------------------------------------------------------
# The hospital refuses what its policy does not allow, before reading patient data
# ---------------------------------------------------------------------------------------


def test_training_without_dp_is_refused(hospital, monkeypatch):
    reads = []
    monkeypatch.setattr("client.export.load", lambda *a, **k: reads.append(1))
    reply = client_app.train(hospital_message(hospital_cfg("privacy.enabled=false"), "r", 1), node_context(hospital))
    _refused(reply, "privacy.enabled")
    assert not reads  # refused before any patient file was read
    assert folder_ledger(hospital).entries == []


def test_weak_noise_and_a_huge_budget_in_the_message_are_refused(hospital):
    weak = hospital_cfg("privacy.noise_multiplier=0.3", "privacy.target_epsilon=0", "privacy.max_epsilon=1e9")
    _refused(client_app.train(hospital_message(weak, "r", 1), node_context(hospital)), "privacy.noise_multiplier")
    # above the floor, but one round would cost more than the hospital allows per round
    costly = hospital_cfg("privacy.noise_multiplier=0.6", "privacy.target_epsilon=0", "privacy.max_epsilon=1e9")
    _refused(client_app.train(hospital_message(costly, "r", 1), node_context(hospital)), "per round")
    assert folder_ledger(hospital).epsilon() == 0.0


def test_the_per_round_ceiling_is_measured_with_the_hospitals_own_accountant(hospital):
    """The message's accountant (PRV reads about 20% lower than RDP) cannot stretch the
    hospital's per-round ceiling, which its own ledger measures (RDP)."""
    from common.privacy import NoisyRelease, steps_per_round

    policy, ledger = HospitalFolder(hospital).policy, folder_ledger(hospital)
    base = hospital_cfg("privacy.accountant=prv")
    n = HospitalFolder(hospital).declared.train  # the count the hospital declares, which every cost uses
    q, steps = steps_per_round(n, base.training.batch_size, base.training.local_epochs, base.training.sample_rate)

    def cost(sigma, accountant):
        return epsilon([NoisyRelease(1, sigma, q, steps, 1.0)], ledger.delta, accountant)

    # a noise level whose round passes the ceiling by PRV but not by RDP: the smallest on a
    # 0.01 grid that passes by PRV (a bisection: the cost falls as the noise grows, and
    # each PRV epsilon takes a while), which RDP must still find too costly
    grid = np.arange(policy.min_noise_multiplier, 5.0, 0.01)
    assert cost(grid[-1], "prv") <= policy.max_epsilon_per_round
    low = bisect.bisect_left(range(len(grid)), True, key=lambda i: cost(grid[i], "prv") <= policy.max_epsilon_per_round)
    sigma = grid[low]
    assert low > 0 and cost(grid[low - 1], "prv") > policy.max_epsilon_per_round  # the smallest indeed
    assert cost(sigma, "prv") <= policy.max_epsilon_per_round < cost(sigma, "rdp")
    costly = hospital_cfg("privacy.accountant=prv", f"privacy.noise_multiplier={sigma:.4f}", "privacy.target_epsilon=0",
                          "privacy.max_epsilon=1e9")
    _refused(client_app.train(hospital_message(costly, "r", 1), node_context(hospital)), "per round")
    assert folder_ledger(hospital).entries == []


def test_a_release_the_run_did_not_plan_is_refused_and_the_ledger_stays_readable(hospital):
    """validate_every 0 plans no validation during training: its noise is calibrated for
    none (infinite), so a message asking for one anyway is refused, not recorded."""
    cfg = hospital_cfg("evaluation.validate_every=0")
    _refused(client_app.train(hospital_message(cfg, "r", 1, evaluate="val"), node_context(hospital)), "do not plan")
    assert folder_ledger(hospital).entries == []  # still readable, nothing recorded
    assert reply_status(client_app.train(hospital_message(cfg, "r", 1), node_context(hospital)))[M.STATE] == "trained"


def test_a_hospital_without_its_own_budget_cannot_start(hospital):
    settings = hospital / "hospital.yaml"
    text = yaml.safe_load(settings.read_text())
    del text["policy"]["max_epsilon"]
    settings.write_text(yaml.safe_dump(text))
    with pytest.raises(FolderError, match="policy.max_epsilon"):
        HospitalFolder(hospital)
    reply = client_app.train(hospital_message(hospital_cfg(), "r", 1), node_context(hospital))
    assert reply_status(reply)[M.STATE] == ReplyState.REFUSED and "max_epsilon" in reply_status(reply)[M.REASON]


def test_listing_peers_checks_each_key_and_a_damaged_one_stops_the_hospital_naming_it(hospital, tmp_path):
    from client.commands import add_peer

    settings = hospital / "hospital.yaml"
    before = settings.read_bytes()
    try:
        with pytest.raises(FolderError, match="list the others"):
            add_peer(hospital, HospitalFolder(hospital).name, hospital / f"{HospitalFolder(hospital).name}.pub")
        with pytest.raises(FolderError, match="not an OpenSSH public key"):
            add_peer(hospital, "north", settings)  # not a key file
        other = make_hospital_key(tmp_path)
        assert "north added" in add_peer(hospital, "north", other)
        assert "north kept" in add_peer(hospital, "north", other)
        with pytest.raises(FolderError, match="already listed for north"):
            add_peer(hospital, "south", other)  # one hospital under two names would count twice
        assert list(HospitalFolder(hospital).policy.peer_keys) == ["north"]
        settings.write_text(settings.read_text().replace("north: ecdsa-sha2-nistp384 AAAA", "north: ecdsa-sha2-nistp384 AAAB"))
        with pytest.raises(FolderError, match="policy.peer_keys.north"):
            HospitalFolder(hospital)
        reply = client_app.train(hospital_message(hospital_cfg(), "r", 1), node_context(hospital))
        assert reply_status(reply)[M.STATE] == ReplyState.REFUSED and "peer_keys" in reply_status(reply)[M.REASON]
    finally:
        settings.write_bytes(before)


def make_hospital_key(folder):
    from client.folder import make_supernode_keypair

    return make_supernode_keypair(folder, "north")[1]


@pytest.mark.parametrize("split", ["train", "everyone"])
def test_evaluating_the_training_split_or_an_unknown_one_is_refused(hospital, split):
    reply = client_app.evaluate(hospital_message(hospital_cfg(), "r", 1, MessageType.EVALUATE, split), node_context(hospital))
    _refused(reply, "evaluate")


def test_a_fine_histogram_is_refused(hospital):
    cfg = hospital_cfg("evaluation.score_bins=1000000")
    reply = client_app.evaluate(hospital_message(cfg, "r", 1, MessageType.EVALUATE, "val"), node_context(hospital))
    _refused(reply, "evaluation.score_bins")


def test_more_evaluations_than_the_policy_allows_are_refused(hospital):
    per_round = hospital_cfg("run.rounds=40", "evaluation.validate_every=1")  # 40 validation releases planned
    reply = client_app.train(hospital_message(per_round, "r", 2, evaluate="val"), node_context(hospital))
    _refused(reply, "evaluation")
    context = node_context(hospital)
    cfg = hospital_cfg()
    first = client_app.evaluate(hospital_message(cfg, "r2", 3, MessageType.EVALUATE, "test"), context)
    assert reply_status(first)[M.STATE] == ReplyState.EVALUATED
    again = client_app.evaluate(hospital_message(cfg, "r2", 3, MessageType.EVALUATE, "test"), context)
    _refused(again, "evaluation")  # the test patients are scored once per run


def test_more_validations_than_the_run_plans_are_declined_and_cost_nothing(hospital):
    """Each progress validation's noise is calibrated for the number the run's settings
    plan; a coordinator asking one more in the same run (within the policy's count of 10)
    would take the validation patients past the epsilon the plan agreed: declined, saying
    why (the round's training goes on), nothing released, nothing charged."""
    cfg = hospital_cfg("run.rounds=6", "evaluation.validate_every=3")
    progress = len(cfg.validation_rounds())
    assert 1 <= progress < cfg.planned_evaluations()["val"] <= 10  # the policy's count would allow more
    context = node_context(hospital)
    for r in range(1, progress + 1):
        reply = client_app.train(hospital_message(cfg, "r", r, evaluate="val"), context)
        assert reply_status(reply)[M.STATE] == ReplyState.TRAINED and M.NOT_EVALUATED not in reply_status(reply)
    charged = folder_ledger(hospital).epsilon(Split.VAL)
    final = client_app.evaluate(hospital_message(cfg, "r", 6, MessageType.EVALUATE, "val"), context)
    assert reply_status(final)[M.STATE] == ReplyState.EVALUATED
    after_final = folder_ledger(hospital).epsilon(Split.VAL)
    assert charged < after_final <= cfg.evaluation.val_epsilon + 1e-9
    more = client_app.train(hospital_message(cfg, "r", progress + 1, evaluate="val"), context)
    assert reply_status(more)[M.STATE] == ReplyState.TRAINED
    assert "releases its settings plan" in reply_status(more)[M.NOT_EVALUATED]
    assert not any(name.startswith(M.EVALUATION_PREFIX) for name in more.content.array_records)
    assert folder_ledger(hospital).epsilon(Split.VAL) == after_final


def test_a_validation_past_a_plan_that_fills_the_policys_count_is_declined_too(hospital_data, tmp_path):
    """The policy's own fix ('use evaluation.validate_every >= N') makes the plan equal its
    per-run count: a replayed validation is then past both, and still only declined."""
    cfg = hospital_cfg("run.rounds=6", "evaluation.validate_every=3")
    plan = cfg.planned_evaluations()["val"]
    folder = make_hospital(tmp_path, *hospital_data, max_epsilon=2.5)
    _set_policy(folder, max_evaluations_per_run={"val": plan, "test": 1})
    context = node_context(folder)
    rounds = cfg.validation_rounds()
    for r in rounds:
        assert reply_status(client_app.train(hospital_message(cfg, "r", r, evaluate="val"), context))[M.STATE] == \
            ReplyState.TRAINED
    final = client_app.evaluate(hospital_message(cfg, "r", 6, MessageType.EVALUATE, "val"), context)
    assert reply_status(final)[M.STATE] == ReplyState.EVALUATED and M.NOT_EVALUATED not in reply_status(final)
    spent = folder_ledger(folder).epsilon(Split.VAL)
    replayed = client_app.train(hospital_message(cfg, "r", rounds[0], evaluate="val",
                                                 arrays=_other_model(cfg)), context)
    assert reply_status(replayed)[M.STATE] == ReplyState.TRAINED
    assert "releases its settings plan" in reply_status(replayed)[M.NOT_EVALUATED]
    assert folder_ledger(folder).epsilon(Split.VAL) == spent


def _other_model(cfg):
    """The run's initial weights moved a little: another global model (a replayed round's)."""
    from flwr.app import Array

    arrays = initial_arrays(cfg)
    return ArrayRecord({k: Array(v.numpy() + np.float32(0.01)) for k, v in arrays.items()})


def test_a_crafted_model_reads_back_only_a_noisy_coarse_histogram(hospital, hospital_data):
    """Before: a model whose logit is one weight on Age read back every validation
    patient's age with their outcome. Now the release is a few bins per class
    (evaluation.score_bins) with Gaussian noise, recorded in the ledger as a DP release about the validation patients."""
    cfg = hospital_cfg()
    spec = model_spec(cfg)
    crafted = GRUClassifier(spec, "torch")
    with torch.no_grad():
        for p in crafted.parameters():
            p.zero_()
        crafted.head[-1].weight[0, -spec.n_static] = 4.0  # the head's Age input (the first descriptor)
    arrays = ArrayRecord(torch_state_dict=crafted.state_dict())
    reply = client_app.evaluate(hospital_message(cfg, "r", 3, MessageType.EVALUATE, "val", arrays=arrays),
                                node_context(hospital))
    released = ScoreSummary.from_arrays({k: v.numpy() for k, v in reply.content[M.evaluation_key(Split.VAL)].items()})
    assert released.histogram.shape == (2, 1, cfg.evaluation.score_bins)
    entry = folder_ledger(hospital).entries[-1]
    assert (entry.mechanism, entry.split) == (Mechanism.GAUSSIAN, Split.VAL) and entry.noise_multiplier > 2
    # the exact histogram, as the hospital itself would compute it, is hidden under the noise
    from client.hospital import Node

    data = Node(node_context(hospital)).data()
    probs = predict_proba(crafted.eval(), data.dataset.X[data.val], data.dataset.S[data.val])
    exact = ScoreSummary.from_predictions(data.dataset.y[data.val], probs,
                                          ScoreGrid(*cfg.evaluation.logit_range, cfg.evaluation.score_bins))
    assert np.std(released.histogram - exact.histogram) > 2.0


def test_no_evaluation_after_the_evaluation_budget_is_spent(hospital_data, tmp_path):
    folder = make_hospital(tmp_path, *hospital_data, max_epsilon=1.0, eval_epsilon=1.0)
    cfg = hospital_cfg()
    states = []
    for run in ("a", "b", "c"):
        reply = client_app.evaluate(hospital_message(cfg, run, 3, MessageType.EVALUATE, "val"), node_context(folder))
        states.append(M.evaluation_key(Split.VAL) in reply.content.array_records)
        if not states[-1]:
            assert "budget" in reply_status(reply)[M.NOT_EVALUATED]
    assert states[0] and not states[-1]
    assert folder_ledger(folder).epsilon(Split.VAL) <= 1.0


def test_the_training_loss_is_never_released_and_repeats_differ(hospital):
    cfg = hospital_cfg("training.sample_rate=1.0", "model.dropout=0")
    replies = [client_app.train(hospital_message(cfg, f"run-{i}", 1), node_context(hospital)) for i in range(3)]
    for reply in replies:
        assert set(reply.content[M.METRICS].keys()) == set(M.TRAIN_METRIC_KEYS)  # no loss, nothing else
    weights = [np.concatenate([v.numpy().ravel() for v in r.content[M.ARRAYS].values()]) for r in replies]
    assert not np.allclose(weights[0], weights[1]) and not np.allclose(weights[1], weights[2])  # fresh noise each time


def test_two_trainings_at_once_keep_every_entry(hospital):
    cfg = hospital_cfg()
    errors = []

    def train(r):
        try:
            client_app.train(hospital_message(cfg, "run-x", r), node_context(hospital))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=train, args=(r,)) for r in (1, 2, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    ledger = folder_ledger(hospital)
    assert sorted(e.round for e in ledger.noisy(Split.TRAIN)) == [1, 2, 3]
    assert ledger.epsilon() == pytest.approx(epsilon(ledger.history(Split.TRAIN), ledger.delta), abs=1e-12)


# ---------------------------------------------------------------------------------------
# The coordinator drops a hostile hospital's reply, names its node, and goes on
# ---------------------------------------------------------------------------------------


def _forged(reply, change):
    status = dict(reply.content[M.STATUS])
    status[M.LEDGER] = change(status[M.LEDGER])
    from flwr.app import ConfigRecord

    reply.content[M.STATUS] = ConfigRecord(status)
    return reply


def _sigma(value):
    def change(text):
        data = json.loads(text)
        data["entries"][0]["noise_multiplier"] = value
        return json.dumps(data)

    return change


@pytest.mark.parametrize("forgery, reason", [
    (lambda text: "{not json", "not valid JSON"),
    (_sigma("2.0"), "finite numbers"),
    (_sigma(0.0), "noise multiplier > 0"),
])
def test_a_forged_ledger_is_dropped_with_the_node_and_the_run_goes_on(tmp_path, forgery, reason):
    cfg = small_cfg()
    good = {k: v.numpy().copy() + 0.01 for k, v in initial_arrays(cfg).items()}
    replies = [train_reply(1, good, hospital="a"), train_reply(2, good, hospital="b"),
               _forged(train_reply(3, good, hospital="c"), forgery)]
    coord = coordinator_for(cfg, replies, tmp_path)
    record = coord.train_round(1)
    assert not record.skipped and set(record.hospitals) == {"a", "b"}
    (dropped,) = record.dropped
    assert (dropped.hospital, dropped.node_id) == ("c", 3) and reason in dropped.reason


@pytest.mark.parametrize("onset_noise", ["laplace", "gaussian"])
def test_an_evaluation_recorded_with_more_noise_than_the_runs_calibration_is_dropped(hospital, onset_noise):
    """A hostile hospital that records more noise than it was calibrated for widens its own
    range check (10 sd of the noise it claims) and drowns the pooled readings. The
    coordinator computes every release's noise from the run's config and the delta the
    hospital's preflight stated (common.evaluation_noise) and drops a release recording
    other noise; an honest hospital's final release (validation, hourly, test, subgroups,
    importance, onset histogram) passes."""
    from flwr.app import ConfigRecord

    from common.evaluation_noise import calibrated_evaluation_noise
    from common.preflight import PreflightAnswer
    from server.validation import ReplyRejected, read_evaluations

    cfg = hospital_cfg(f"evaluation.onset_noise={onset_noise}")
    delta = HospitalFolder(hospital).policy.delta
    expected = calibrated_evaluation_noise(cfg.to_json(), delta)
    context = node_context(hospital)
    val = client_app.evaluate(hospital_message(cfg, "r", 3, MessageType.EVALUATE, "val"), context)
    test = client_app.evaluate(hospital_message(cfg, "r", 3, MessageType.EVALUATE, "test",
                                                **{M.THRESHOLD: 0.15, M.HOUR_THRESHOLDS: _hours(cfg)}), context)
    for reply, splits in ((val, [Split.VAL]), (test, [Split.TEST])):
        ledger = Ledger.from_json(reply_status(reply)[M.LEDGER])
        read = read_evaluations(reply, cfg, ledger, "r", 3, splits, 0.15 if splits == [Split.TEST] else None, expected)
        assert splits[0] in read.summaries
    assert M.ONSET in test.content.array_records
    # the same test reply with its onset histogram's entry recording ten times the noise
    plain = json.loads(reply_status(test)[M.LEDGER])
    for entry in plain["entries"]:
        if entry.get("item") == Item.ONSET_HISTOGRAM.value:
            entry["noise_multiplier"] *= 10
    status = dict(test.content[M.STATUS])
    status[M.LEDGER] = json.dumps(plain)
    test.content[M.STATUS] = ConfigRecord(status)
    forged = Ledger.from_json(status[M.LEDGER])
    with pytest.raises(ReplyRejected, match="records noise .* onset-histogram of the val split; the run's calibration"):
        read_evaluations(test, cfg, forged, "r", 3, [Split.TEST], 0.15, expected)
    # a release the run's calibration does not plan is dropped
    progress = {k: v for k, v in expected.items()}
    progress[(Split.VAL, True, Item.ONSET_HISTOGRAM)] = math.inf
    with pytest.raises(ReplyRejected, match="settings do not plan"):
        read_evaluations(test, cfg, Ledger.from_json(reply_status(test)[M.LEDGER]), "r", 3, [Split.TEST], 0.15,
                         progress)
    # the delta travels in the preflight answer (a policy setting, listed with the non-DP values)
    answer = PreflightAnswer.from_status(PreflightAnswer("h", True, delta=delta).to_status())
    assert answer.delta == delta
    with pytest.raises(ValueError):
        PreflightAnswer.from_status(PreflightAnswer("h", True, delta=2.0).to_status())


def test_a_validation_during_training_is_checked_against_the_progress_noise(hospital):
    """An honest validation sent with a training round records the progress releases'
    noise and passes as such (final=False); read as a final release it would not."""
    from common.evaluation_noise import calibrated_evaluation_noise
    from server.validation import ReplyRejected, read_evaluations

    cfg = hospital_cfg("run.rounds=6", "evaluation.validate_every=3")
    expected = calibrated_evaluation_noise(cfg.to_json(), HospitalFolder(hospital).policy.delta)
    assert not math.isclose(expected[(Split.VAL, False, Item.HISTOGRAM)], expected[(Split.VAL, True, Item.HISTOGRAM)])
    reply = client_app.train(hospital_message(cfg, "r", 3, evaluate="val"), node_context(hospital))
    assert M.evaluation_key(Split.VAL) in reply.content.array_records
    ledger = Ledger.from_json(reply_status(reply)[M.LEDGER])
    assert Split.VAL in read_evaluations(reply, cfg, ledger, "r", 3, [Split.VAL], None, expected, final=False).summaries
    with pytest.raises(ReplyRejected, match="records noise"):
        read_evaluations(reply, cfg, ledger, "r", 3, [Split.VAL], None, expected, final=True)


def test_the_coordinator_checks_every_hospital_whatever_delta_it_states(tmp_path):
    """No delta in its answer (a run folder from before it): its ledger's; a delta that
    admits no calibration: its releases are dropped, never left unchecked."""
    from common.evaluation_noise import calibrated_evaluation_noise
    from common.preflight import PreflightAnswer
    from server.validation import ReplyRejected

    cfg = small_cfg()
    coord = coordinator_for(cfg, [], tmp_path)
    coord.recorder.preflight = [PreflightAnswer("a", True, delta=1e-6), PreflightAnswer("b", True),
                                PreflightAnswer("c", True, delta=1e-300)]
    assert coord._expected_evaluation_noise("a", Ledger("a", 1e-5)) == calibrated_evaluation_noise(cfg.to_json(), 1e-6)
    assert coord._expected_evaluation_noise("b", Ledger("b", 1e-5)) == calibrated_evaluation_noise(cfg.to_json(), 1e-5)
    with pytest.raises(ReplyRejected, match="admit no noise calibration"):
        coord._expected_evaluation_noise("c", Ledger("c", 1e-5))


def test_a_claimed_huge_count_and_a_huge_update_are_dropped(tmp_path):
    cfg = small_cfg()
    base = {k: v.numpy().copy() for k, v in initial_arrays(cfg).items()}
    good = {k: v + 0.01 for k, v in base.items()}
    replies = [
        train_reply(1, good, hospital="a"), train_reply(2, good, hospital="b"),
        train_reply(3, good, hospital="c", metrics={M.NUM_EXAMPLES: 1_000_000}),
        train_reply(4, {k: v + 1e29 for k, v in base.items()}, hospital="d"),
    ]
    coord = coordinator_for(cfg, replies, tmp_path)
    record = coord.train_round(1)
    reasons = {d.hospital: d.reason for d in record.dropped}
    assert "its ledger says it sampled from 100" in reasons["c"] and "L2 norm" in reasons["d"]
    for k, v in coord.arrays.items():  # the average is the two honest updates'
        np.testing.assert_allclose(v.numpy(), good[k], rtol=1e-6)


def test_a_node_replying_under_another_hospitals_name_is_dropped_as_itself(tmp_path):
    cfg = small_cfg()
    good = {k: v.numpy().copy() + 0.01 for k, v in initial_arrays(cfg).items()}
    replies = [train_reply(1, good, hospital="a"), train_reply(2, good, hospital="b"), train_reply(3, good, hospital="c")]
    coord = coordinator_for(cfg, replies, tmp_path)
    replies[2] = train_reply(3, good, hospital="a")  # node 3 registered as c, now claims to be a
    coord.grid.replies = replies
    record = coord.train_round(1)
    (dropped,) = record.dropped
    assert (dropped.hospital, dropped.node_id) == ("c", 3) and "claims to come from 'a'" in dropped.reason
    assert set(record.hospitals) == {"a", "b"} and coord.hospitals[1].rounds_trained == 1


# ---------------------------------------------------------------------------------------
# A whole run: every value in every reply is a DP release in the ledger or a declared one
# ---------------------------------------------------------------------------------------

RECORDING_RUN = r"""
import json, sys
from pathlib import Path
from flwr.serverapp import ServerApp
from flwr.simulation import run_simulation
from client.app import build_client_app
from common.config import load_config
from server.app import run_server

cfg = load_config(None, sys.argv[2:])
out = Path(sys.argv[1])
seen = []

class RecordingGrid:
    def __init__(self, grid):
        self.grid = grid
    def __getattr__(self, name):
        return getattr(self.grid, name)
    def _record(self, replies):
        for r in replies:
            if r.has_error():
                continue
            c = r.content
            seen.append({
                "arrays": {k: list(v.keys()) for k, v in c.array_records.items()},
                "metrics": {k: list(v.keys()) for k, v in c.metric_records.items()},
                "configs": {k: dict(v) for k, v in c.config_records.items()},
            })
        return replies
    # every reply the coordinator reads, whichever way it asks for them
    def send_and_receive(self, messages, *, timeout=None):
        return self._record(list(self.grid.send_and_receive(messages, timeout=timeout)))
    def pull_messages(self, message_ids):
        return self._record(list(self.grid.pull_messages(message_ids)))

app = ServerApp()

@app.main()
def main(grid, context):
    run_server(cfg, RecordingGrid(grid), out / "run")

run_simulation(server_app=app, client_app=build_client_app(simulation=cfg), num_supernodes=4,
               backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}})
(out / "replies.json").write_text(json.dumps(seen))
"""


@pytest.mark.slow
def test_every_value_a_whole_run_releases_is_dp_or_declared(tmp_path, physionet_files):
    overrides = ["data.max_stays=400", "run.rounds=3", "evaluation.validate_every=1", "model.gru_hidden=[4]"]
    proc = subprocess.run([sys.executable, "-c", RECORDING_RUN, str(tmp_path), *overrides], cwd=ROOT,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    replies = json.loads((tmp_path / "replies.json").read_text())
    declared = {r.field: r for r in M.RELEASES}
    privacy = json.loads((tmp_path / "run" / "privacy.json").read_text())
    # the report lists every kind of non-DP release, and every value a reply carried is a DP release or one of those
    reported = {r["field"] for r in privacy["non_dp_releases"]}
    assert reported == {f for f, r in declared.items() if not r.dp}

    def listed(field: str) -> bool:
        return field in declared and (declared[field].dp or field in reported)

    dp_kinds = set()
    assert len(replies) >= 4 * (1 + 3 + 1)  # query, 3 training rounds, the final evaluation
    for reply in replies:
        status = reply["configs"][M.STATUS]
        assert set(reply["configs"]) == {M.STATUS}
        for key in status:
            assert listed(M.FIELD_RELEASES[key]), key
        for keys in reply["metrics"].values():
            for key in keys:
                assert not declared[M.FIELD_RELEASES[key]].dp and listed(M.FIELD_RELEASES[key]), key
        ledger = Ledger.from_json(status[M.LEDGER]) if M.LEDGER in status else None
        for name, keys in reply["arrays"].items():
            # every array record is matched to the ledger entry that released it
            if name == M.ARRAYS:
                split, mechanism, item = Split.TRAIN, Mechanism.DP_SGD, Item.WEIGHTS
            elif name == M.SUBGROUPS:
                split, mechanism, item = Split.TEST, Mechanism.GAUSSIAN, Item.SUBGROUP_HISTOGRAMS
            elif name == M.IMPORTANCE:
                split, mechanism, item = Split.TEST, Mechanism.GAUSSIAN, Item.IMPORTANCE
            elif name == M.HOURLY:
                split, mechanism, item = Split.VAL, Mechanism.GAUSSIAN, Item.HOURLY_HISTOGRAMS
            elif name == M.ONSET:
                split, mechanism, item = Split.VAL, Mechanism.LAPLACE, Item.ONSET_HISTOGRAM  # the default's
            else:
                assert name.startswith(M.EVALUATION_PREFIX), name
                split, mechanism, item = Split(name[len(M.EVALUATION_PREFIX):]), Mechanism.GAUSSIAN, Item.HISTOGRAM
            if name != M.ARRAYS:
                for key in keys:
                    assert listed(M.FIELD_RELEASES[key]), key
            dp_kinds.add(name)
            assert ledger is not None and any(e.split == split and e.mechanism == mechanism and e.item == item
                                              for e in ledger.entries), name
    # the default config's final evaluation also releases per-group histograms, importance,
    # the validation patients' histograms after each checkpoint hour and their onset histogram
    assert dp_kinds == {M.ARRAYS, M.evaluation_key(Split.VAL), M.evaluation_key(Split.TEST), M.SUBGROUPS,
                        M.IMPORTANCE, M.HOURLY, M.ONSET}


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e39])
def test_a_global_model_with_non_finite_weights_is_refused_before_anything_is_read(hospital, monkeypatch, bad):
    import numpy as np
    from flwr.app import Array, ArrayRecord

    from server.coordinator import initial_arrays

    cfg = hospital_cfg()
    arrays = {k: np.asarray(v.numpy(), dtype=np.float64) for k, v in initial_arrays(cfg).items()}
    name = next(iter(arrays))
    arrays[name].flat[0] = bad  # 1e39 is finite in float64 and inf once loaded as float32
    reads = []
    monkeypatch.setattr("client.export.load", lambda *a, **k: reads.append(1))
    message = hospital_message(cfg, "r", 1, arrays=ArrayRecord({k: Array(v) for k, v in arrays.items()}))
    _refused(client_app.train(message, node_context(hospital)), "arrays")
    assert not reads and folder_ledger(hospital).entries == []


def test_a_finite_model_that_overflows_on_some_patients_is_still_evaluated_with_finite_releases(hospital):
    """Finite weights that overflow only for some patients (old AND tall: +inf from age,
    -inf from height, NaN together) make those patients' scores NaN; the hospital still
    answers as for any model, with finite noisy histograms, per-group histograms and
    importance: a failure or a NaN would tell the coordinator such a patient is there."""
    import numpy as np
    from flwr.app import Array, ArrayRecord

    from server.coordinator import initial_arrays

    cfg = hospital_cfg()
    arrays = {k: np.asarray(v.numpy()).copy() for k, v in initial_arrays(cfg).items()}
    head = next(k for k in arrays if k.startswith("head") and k.endswith("weight"))
    pooled = len(cfg.features.variables) * cfg.model.gru_hidden[-1]
    arrays[head][0, pooled + 0] = 3e38  # age, normalised: > 1.2 (about 85 years) overflows to +inf
    arrays[head][0, pooled + 4] = -3e38  # height: > 1.2 (about 185 cm) to -inf
    message = hospital_message(cfg, "r", 1, MessageType.EVALUATE, "val test",
                               arrays=ArrayRecord({k: Array(v) for k, v in arrays.items()}))
    reply = client_app.evaluate(message, node_context(hospital))
    assert reply_status(reply)[M.STATE] == ReplyState.EVALUATED, reply_status(reply)
    released = reply.content.array_records
    assert {M.evaluation_key(Split.VAL), M.evaluation_key(Split.TEST), M.SUBGROUPS, M.IMPORTANCE} <= set(released)
    for name in released:
        for key, value in released[name].items():
            assert np.isfinite(value.numpy()).all(), (name, key)


# ---------------------------------------------------------------------------------------
# The monitor's onset histogram (common.onset): hour thresholds come with the test release
# ---------------------------------------------------------------------------------------

def _hours(cfg, value=None) -> list[float]:
    from common.data.preprocess import num_steps

    steps = num_steps(cfg.features)
    return [float(t) for t in np.linspace(0.4, 0.15, steps)] if value is None else [value] * steps


@pytest.mark.parametrize("case", ["five hours", "not risks", "NaN", "with a validation release", "a text"])
def test_hour_thresholds_a_hospital_cannot_read_are_refused_before_any_data(hospital, monkeypatch, case):
    cfg = hospital_cfg()
    reads = []
    monkeypatch.setattr("client.export.load", lambda *a, **k: reads.append(1))
    hours = {"five hours": [0.2] * 5, "not risks": _hours(cfg, 1.5), "NaN": _hours(cfg, float("nan")),
             "with a validation release": _hours(cfg), "a text": "0.2 0.3"}[case]
    splits = "val" if case == "with a validation release" else "test"
    reply = client_app.evaluate(hospital_message(cfg, "r", 3, MessageType.EVALUATE, splits, **{M.HOUR_THRESHOLDS: hours}),
                                node_context(hospital))
    _refused(reply, "hour-thresholds")
    assert not reads and folder_ledger(hospital).entries == []


@pytest.mark.parametrize("noise", ["laplace", "gaussian"])
def test_the_onset_histogram_is_made_once_per_run_with_its_own_ledger_entry(hospital, noise):
    from client.folder import HospitalFolder
    from client.ledger_store import FileLedgerStore

    cfg = hospital_cfg(f"evaluation.onset_noise={noise}")
    reply = client_app.evaluate(hospital_message(cfg, "r", 3, MessageType.EVALUATE, "test",
                                                 **{M.THRESHOLD: 0.15, M.HOUR_THRESHOLDS: _hours(cfg)}),
                                node_context(hospital))
    assert reply_status(reply)[M.STATE] == ReplyState.EVALUATED
    histogram = reply.content[M.ONSET]["onset-histogram"].numpy()
    assert histogram.shape == (cfg.evaluation.score_bins,) and np.isfinite(histogram).all()
    onset = [e for e in folder_ledger(hospital).noisy(Split.VAL) if e.item == Item.ONSET_HISTOGRAM]
    assert len(onset) == 1 and onset[0].run_id == "r" and onset[0].mechanism == Mechanism(noise)
    # discrete Laplace noise keeps the counts whole: no low bits of a floating-point sample leave
    assert (noise == "laplace") == bool(np.all(histogram == np.round(histogram)))
    # and the Gaussian releases are snapped (common.gaussian_noise): every value a multiple of one power-of-two step,
    # the onset histogram's and the test histogram's alike
    from common.gaussian_noise import snap_step

    test = ScoreSummary.from_arrays({k: v.numpy() for k, v in reply.content[M.evaluation_key(Split.TEST)].items()})
    (test_entry,) = [e for e in folder_ledger(hospital).entries if (e.split, e.item) == (Split.TEST, Item.HISTOGRAM)]
    released = [(test.histogram, snap_step(test_entry.noise_multiplier * test.sensitivity))]
    if noise == "gaussian":
        released.append((histogram, snap_step(onset[0].noise_multiplier)))
    for values, step in released:
        assert np.array_equal(values / step, np.round(values / step)) and not np.array_equal(values, np.round(values))
    # without hour thresholds the test release is made and the onset histogram declined, saying why
    plain = client_app.evaluate(hospital_message(cfg, "r2", 3, MessageType.EVALUATE, "test", **{M.THRESHOLD: 0.15}),
                                node_context(hospital))
    assert reply_status(plain)[M.STATE] == ReplyState.EVALUATED and M.ONSET not in plain.content.array_records
    assert "hour thresholds" in reply_status(plain)[M.NOT_EVALUATED]
    # a run that already had one (its test entries gone, as if its test split had been declined) gets no second
    f = HospitalFolder(hospital)
    with FileLedgerStore(f.ledger_file, f.secret("ledger")).transaction() as ledger:
        ledger.entries = [e for e in ledger.entries if not (e.run_id == "r" and e.split == Split.TEST)]
    again = client_app.evaluate(hospital_message(cfg, "r", 3, MessageType.EVALUATE, "test",
                                                 **{M.THRESHOLD: 0.15, M.HOUR_THRESHOLDS: _hours(cfg)}),
                                node_context(hospital))
    _refused(again, "evaluate")
    assert "second onset histogram" in reply_status(again)[M.REASON]


def _set_policy(folder, **changes):
    settings = folder / "hospital.yaml"
    text = yaml.safe_load(settings.read_text())
    text["policy"].update(changes)
    settings.write_text(yaml.safe_dump(text))


def test_a_hospital_that_never_evaluates_its_validation_patients_releases_nothing_about_them(hospital_data, tmp_path):
    """Policy evaluation_splits: [test] (and no val release allowed per run): the test
    message must not release a histogram of the validation patients."""
    folder = make_hospital(tmp_path, *hospital_data)
    _set_policy(folder, evaluation_splits=["test"], max_evaluations_per_run={"test": 1})
    cfg = hospital_cfg()
    reply = client_app.evaluate(hospital_message(cfg, "r", 3, MessageType.EVALUATE, "test",
                                                 **{M.THRESHOLD: 0.15, M.HOUR_THRESHOLDS: _hours(cfg)}),
                                node_context(folder))
    assert reply_status(reply)[M.STATE] == ReplyState.EVALUATED
    assert M.ONSET not in reply.content.array_records, "val patients released against the policy"
    assert folder_ledger(folder).noisy(Split.VAL) == []


def test_one_message_cannot_take_the_validation_patients_past_their_budget(hospital_data, tmp_path):
    """'val test' in one final message: the final validation and the onset histogram are
    each checked against the ledger alone, never together."""
    cfg = hospital_cfg()
    msg = lambda: hospital_message(cfg, "r", 3, MessageType.EVALUATE, "val test",  # noqa: E731
                                   **{M.THRESHOLD: 0.15, M.HOUR_THRESHOLDS: _hours(cfg)})
    probe = make_hospital(tmp_path / "probe", *hospital_data)
    assert reply_status(client_app.evaluate(msg(), node_context(probe)))[M.STATE] == ReplyState.EVALUATED
    val = folder_ledger(probe).noisy(Split.VAL)
    onset = [e for e in val if e.item == Item.ONSET_HISTOGRAM]
    final = [e for e in val if e.item != Item.ONSET_HISTOGRAM]
    fresh = folder_ledger(make_hospital(tmp_path / "fresh", *hospital_data))
    alone = max(fresh.epsilon_with(final), fresh.epsilon_with(onset))
    both = fresh.epsilon_with(final + onset)
    budget = alone * 1.001
    assert both > budget
    folder = make_hospital(tmp_path / "h", *hospital_data, eval_epsilon=budget)
    reply = client_app.evaluate(msg(), node_context(folder))
    assert reply_status(reply)[M.STATE] == ReplyState.EVALUATED
    spent = folder_ledger(folder).epsilon(Split.VAL)
    assert spent <= budget, f"validation patients at epsilon {spent:.3f}, budget {budget:.3f}"
