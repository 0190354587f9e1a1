"""The hospital ClientApp on its own folder: it composes every group's epsilon across runs
and exports, never passes its budget, refuses to release without a sound ledger, and
never pays twice for a resent round.

The tests call the real ClientApp handlers with real Flower Message and Context objects,
the way a SuperNode would, on stays cut from set A.
"""

from __future__ import annotations

import os
import shutil

import pytest
from flwr.app import MessageType
from flwr.supercore.task_identity import TaskIdentity
from opacus.accountants import RDPAccountant

from client import app as client_app
from client.folder import HospitalFolder
from client.ledger_store import FileLedgerStore
from client.replies import without_paths
from common import messages as M
from common.ledger import Ledger
from common.messages import Item, Mechanism, ReplyState, Split
from tests.conftest import folder_ledger, hospital_cfg, hospital_message, make_hospital, node_context, reply_status


@pytest.fixture(autouse=True)
def _identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield


def test_ledger_survives_restart_and_composes_across_runs(hospital_data, tmp_path):
    folder = make_hospital(tmp_path, *hospital_data)
    cfg = hospital_cfg()
    eps = []
    for run_id in ("run-1", "run-2"):
        context = node_context(folder)  # a fresh process: nothing in memory
        for r in (1, 2):
            reply = client_app.train(hospital_message(cfg, run_id, r), context)
            assert reply_status(reply)[M.STATE] == ReplyState.TRAINED
            eps.append(reply.content[M.METRICS][M.EPSILON])
    assert all(b > a for a, b in zip(eps, eps[1:]))  # the second run continues from the first
    ledger = folder_ledger(folder)
    assert ledger.runs() == ["run-1", "run-2"]
    assert eps[-1] == pytest.approx(ledger.epsilon(), abs=1e-12)
    acc = RDPAccountant()
    for e in ledger.history(Split.TRAIN):
        for _ in range(e.steps):
            acc.step(noise_multiplier=e.noise_multiplier, sample_rate=e.sample_rate)
    assert acc.get_epsilon(delta=ledger.delta) == pytest.approx(eps[-1], abs=1e-9)
    # the final evaluation is a DP release about the validation and the test patients, recorded too
    before = len(ledger.entries)
    ev = client_app.evaluate(hospital_message(cfg, "run-2", 2, MessageType.EVALUATE, "val test"), node_context(folder))
    assert reply_status(ev)[M.STATE] == ReplyState.EVALUATED
    assert {M.evaluation_key(Split.VAL), M.evaluation_key(Split.TEST)} <= set(ev.content.array_records)
    after = folder_ledger(folder)
    # one entry per release: the validation histogram and the unlabelled histograms at the
    # hourly checkpoints (for the per-hour thresholds); the test histogram, its per-group
    # histograms and the importance (the test budget shared between them)
    assert [(e.mechanism, e.split, e.item) for e in after.entries[before:]] == [
        (Mechanism.GAUSSIAN, Split.VAL, Item.HISTOGRAM), (Mechanism.GAUSSIAN, Split.VAL, Item.HOURLY_HISTOGRAMS),
        (Mechanism.GAUSSIAN, Split.TEST, Item.HISTOGRAM),
        (Mechanism.GAUSSIAN, Split.TEST, Item.SUBGROUP_HISTOGRAMS), (Mechanism.GAUSSIAN, Split.TEST, Item.IMPORTANCE)]
    assert 0 < after.epsilon(Split.TEST) <= cfg.evaluation.test_epsilon
    assert after.epsilon(Split.TRAIN) == pytest.approx(eps[-1], abs=1e-12)  # other patients: their own budget


def test_budget_is_never_passed_and_the_run_config_may_only_tighten_it(hospital_data, tmp_path):
    folder = make_hospital(tmp_path, *hospital_data, max_epsilon=2.5)
    cfg = hospital_cfg("run.rounds=10", "privacy.max_epsilon=0.4")  # tighter than the hospital's 2.5
    context = node_context(folder)
    states, eps = [], []
    for r in range(1, 11):
        reply = client_app.train(hospital_message(cfg, "run-b", r), context)
        states.append(reply_status(reply)[M.STATE])
        eps.append(reply.content[M.METRICS][M.EPSILON] if states[-1] == ReplyState.TRAINED else reply_status(reply)[M.EPSILON])
    assert ReplyState.TRAINED in states and states[-1] == ReplyState.BUDGET_EXHAUSTED
    first_stop = states.index(ReplyState.BUDGET_EXHAUSTED)
    assert all(s == ReplyState.BUDGET_EXHAUSTED for s in states[first_stop:])
    assert max(eps) <= 0.4 and folder_ledger(folder).epsilon() <= 0.4
    loose = hospital_cfg("privacy.max_epsilon=50")  # a config cannot loosen the hospital's budget
    reply = client_app.train(hospital_message(loose, "run-c", 1), context)
    assert reply_status(reply)[M.STATE] == ReplyState.TRAINED and reply.content[M.METRICS][M.BUDGET] == 2.5


def test_missing_or_altered_ledger_refuses_to_release(hospital_data, tmp_path):
    folder = make_hospital(tmp_path, *hospital_data)
    cfg = hospital_cfg()
    client_app.train(hospital_message(cfg, "run-c", 1), node_context(folder))
    ledger_file = folder / "ledger.json"
    ledger_file.write_text(ledger_file.read_text().replace('"steps": ', '"steps": 1'))  # edited by hand
    reply = client_app.train(hospital_message(cfg, "run-c", 2), node_context(folder))
    status = reply_status(reply)
    assert status[M.STATE] == ReplyState.REFUSED and "seal does not match" in status[M.REASON]
    assert M.ARRAYS not in reply.content.array_records  # nothing released
    ledger_file.unlink()
    status = reply_status(client_app.train(hospital_message(cfg, "run-c", 2), node_context(folder)))
    assert status[M.STATE] == ReplyState.REFUSED and "restore the file from backup" in status[M.REASON]
    # The reason names no path of the hospital's machine (its log does).
    assert str(tmp_path) not in status[M.REASON] and "<path>" in status[M.REASON]


@pytest.mark.parametrize("text, sent", [
    ("no ledger at /srv/icu/ledger.json. Restore it", "no ledger at <path>. Restore it"),
    ("C:\\hosp\\secret.key is missing", "<path> is missing"),
    ("read ../exports/a.csv and ~/h/x (line 3)", "read <path> and <path> (line 3)"),
    ("train/validation/test shares; delta 1/(10 n); 0.5/1.0", "train/validation/test shares; delta 1/(10 n); 0.5/1.0"),
])
def test_refusal_reasons_lose_their_paths(text, sent):
    assert without_paths(text) == sent


@pytest.mark.parametrize("text, known, sent", [
    ("no ledger at /home/Jo Smith/icu/ledger.json", ("/home/Jo Smith/icu",), "no ledger at <path>"),
    ("no ledger at sites/icu a/ledger.json. Restore", ("sites/icu a",), "no ledger at <path>. Restore"),
    ("~bob/icu/secret.key is missing", (), "<path> is missing"),
    ("\\\\server\\share\\export is gone", (), "<path> is gone"),
])
def test_refusal_reasons_lose_known_folders_whole(text, known, sent):
    """The hospital's folder is taken out whole first (a name with a space would be cut
    at the space by the pattern alone); home, user-home and network paths too."""
    assert without_paths(text, known) == sent


def test_a_new_export_of_the_same_patients_continues_the_ledger(hospital_data, tmp_path):
    """The ledger belongs to the hospital, not to one export: corrected or larger files,
    once the staff register them, go on spending the same budget, and each entry names
    the export it read."""
    from client.commands import register_data

    data, outcomes = hospital_data
    export = tmp_path / "export"
    shutil.copytree(data, export)
    folder = make_hospital(tmp_path, export, outcomes)
    cfg = hospital_cfg()
    first = client_app.train(hospital_message(cfg, "run-d", 1), node_context(folder)).content[M.METRICS][M.EPSILON]
    dropped = sorted(export.iterdir())[0]
    dropped.unlink()  # a re-export without one stay
    register_data(folder)
    second = client_app.train(hospital_message(cfg, "run-d", 2), node_context(folder))
    assert reply_status(second)[M.STATE] == ReplyState.TRAINED
    assert second.content[M.METRICS][M.EPSILON] > first
    ledger = folder_ledger(folder)
    assert len({e.data for e in ledger.entries}) == 2  # two exports, one ledger


def test_the_ledger_names_an_export_by_a_keyed_label_and_keeps_it_at_home(hospital_data, tmp_path):
    """The hospital's own ledger names each release's export by a label keyed with its
    secret (by the plain sha256 of its files, an export could be confirmed by anyone
    holding a guess of them). The copy that goes to the coordinator leaves the label out,
    and the time too: the label changes whenever one patient is added or removed."""
    from client.export import export_label
    from common.data.dataset import fingerprint_files

    data, outcomes = hospital_data
    folder = make_hospital(tmp_path, data, outcomes)
    reply = client_app.train(hospital_message(hospital_cfg(), "run-k", 1), node_context(folder))
    assert reply_status(reply)[M.STATE] == ReplyState.TRAINED
    labels = {e.data for e in folder_ledger(folder).entries}
    plain = fingerprint_files(data, outcomes)
    assert labels == {export_label(plain, HospitalFolder(folder).secret("export"))}
    sent = reply_status(reply)[M.LEDGER]
    assert plain not in sent and not any(label in sent for label in labels)
    assert {(e.data, e.time) for e in Ledger.from_json(sent).entries} == {("", "")}
    other = make_hospital(tmp_path / "other", data, outcomes)  # the same files at another hospital
    client_app.train(hospital_message(hospital_cfg(), "run-k", 1), node_context(other))
    assert {e.data for e in folder_ledger(other).entries}.isdisjoint(labels)


def test_a_resent_round_is_not_charged_twice(hospital_data, tmp_path):
    folder = make_hospital(tmp_path, *hospital_data)
    cfg = hospital_cfg()
    context = node_context(folder)
    first = client_app.train(hospital_message(cfg, "run-e", 1), context)
    again = client_app.train(hospital_message(cfg, "run-e", 1), context)  # a resumed server asks again
    assert again.content[M.METRICS][M.EPSILON] == first.content[M.METRICS][M.EPSILON]
    assert len(folder_ledger(folder).history(Split.TRAIN)) == 1
    for k, v in first.content[M.ARRAYS].items():
        assert (again.content[M.ARRAYS][k].numpy() == v.numpy()).all()


def test_a_resent_round_is_not_charged_twice_when_another_run_trained_in_between(hospital_data, tmp_path):
    folder = make_hospital(tmp_path, *hospital_data)
    cfg = hospital_cfg()
    context = node_context(folder)
    first = client_app.train(hospital_message(cfg, "run-a", 1), context)
    client_app.train(hospital_message(cfg, "run-b", 1), context)  # a second run at this hospital
    again = client_app.train(hospital_message(cfg, "run-a", 1), node_context(folder))  # run-a's coordinator restarted
    entries = [e for e in folder_ledger(folder).entries if e.item == Item.WEIGHTS]
    assert sorted(e.run_id for e in entries) == ["run-a", "run-b"]
    for k, v in first.content[M.ARRAYS].items():
        assert (again.content[M.ARRAYS][k].numpy() == v.numpy()).all()


def test_the_resend_slots_keep_the_runs_that_saved_most_recently(tmp_path):
    from client.ledger_store import MAX_REPLY_RUNS

    store = FileLedgerStore(tmp_path / "ledger.json", b"k" * 32)
    runs = [f"run-{i}" for i in range(MAX_REPLY_RUNS + 2)]
    for run in runs[:MAX_REPLY_RUNS]:
        store.save_reply(run, f"{run}/1/train", run.encode())
    slots = tmp_path / "ledger.json.replies"
    for f in slots.iterdir():  # equal file times (and clocks that jump) must not change the order
        os.utime(f, ns=(0, 0))
    store.save_reply(runs[0], f"{runs[0]}/2/train", b"round 2")  # the oldest run saves again: now the newest
    for run in runs[MAX_REPLY_RUNS:]:
        store.save_reply(run, f"{run}/1/train", run.encode())
    kept = [run for run in runs if store.load_reply(run, f"{run}/1/train") is not None]
    assert kept == runs[3:]  # run-0 holds round 2 now; run-1 and run-2, the oldest, were dropped
    assert store.load_reply(runs[0], f"{runs[0]}/2/train") == b"round 2"
    assert store.load_reply(runs[5], f"{runs[5]}/1/train") == runs[5].encode()
    assert store.load_reply(runs[5], f"{runs[5]}/2/train") is None  # another round, or another global model
    assert len(list(slots.iterdir())) == MAX_REPLY_RUNS
    assert slots.stat().st_mode & 0o777 == 0o700


def test_a_reply_that_cannot_be_kept_is_still_sent(tmp_path, caplog):
    """The round is charged and trained when its reply is saved for resending: a failure
    there is logged, never turned into a refusal; odd run ids are kept like any other."""
    store = FileLedgerStore(tmp_path / "ledger.json", b"k" * 32)
    for odd in ("run\nwith a newline", "run-\udcff", "x" * 10_000):
        store.save_reply(odd, f"{odd}/1/train", b"reply")
        assert store.load_reply(odd, f"{odd}/1/train") == b"reply"
    (tmp_path / "ledger.json.replies" / ".slot.tmp").write_bytes(b"left by a crash")
    store.save_reply("run-a", "run-a/1/train", b"reply")
    assert not list((tmp_path / "ledger.json.replies").glob("*.tmp"))
    blocked = FileLedgerStore(tmp_path / "blocked" / "ledger.json", b"k" * 32)
    (tmp_path / "blocked").mkdir()
    (tmp_path / "blocked" / "ledger.json.replies").write_bytes(b"not a folder")
    with caplog.at_level("WARNING", logger="fedgru.hospital"):
        blocked.save_reply("run-a", "run-a/1/train", b"reply")  # no exception
    assert "could not be kept for resending" in caplog.text
    assert blocked.load_reply("run-a", "run-a/1/train") is None


def test_a_simulated_hospital_without_dp_lists_its_weights_in_its_ledger(physionet_files):
    """A simulation may switch DP off; the weights it then releases are outside the
    guarantee but never unrecorded: the ledger lists them as a release without noise."""
    from flwr.app import Context, RecordDict

    cfg = hospital_cfg("privacy.enabled=false", "data.max_stays=400")
    context = Context(run_id=1, node_id=0, node_config={"partition-id": 0, "num-partitions": 4},
                      state=RecordDict(), run_config={})
    train = client_app.handlers(simulation=cfg)["train"]  # the simulation defines its hospitals
    reply = train(hospital_message(cfg, "run-1", 1), context)
    status = reply_status(reply)
    assert status[M.STATE] == ReplyState.TRAINED, status
    ledger = Ledger.from_json(status[M.LEDGER])  # the copy that travels with the reply
    weights = [(e.mechanism, e.split, e.released) for e in ledger.entries if e.item == Item.WEIGHTS]
    assert weights == [(Mechanism.NONE, Split.TRAIN, "model weights trained WITHOUT DP on the training split")]
    assert ledger.epsilon() == 0.0
