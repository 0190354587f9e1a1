"""The hospital defines its data, and a hostile coordinator learns nothing outside DP.

One test per finding of the issue "Privacy against the server, at the root", each
played against the real hospital ClientApp on its own folder (as test_hostile_server
does) or against the real coordinator; every one fails on the code before the fix.
The root check, two hospitals whose data differ by one patient answering a fuzzed
battery of messages alike, is tests/test_neighbouring.py.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import yaml
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client import app as client_app
from client.folder import HospitalFolder
from common import messages as M
from common.ledger import Ledger, LedgerEntry
from common.messages import Item, Mechanism, NodeMode, ReplyState, Split
from common.privacy import NoisyRelease, epsilon, steps_per_round
from server.coordinator import initial_arrays
from tests.conftest import folder_ledger, hospital_cfg, hospital_message, make_hospital, node_context, reply_status


@pytest.fixture(autouse=True)
def _identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield


@pytest.fixture
def hospital(hospital_data, tmp_path):
    return make_hospital(tmp_path, *hospital_data, max_epsilon=2.5)


@pytest.fixture
def reads(monkeypatch):
    """Counts every time a hospital opens its patients' data."""
    from client import export

    opened = []
    real = export.load

    def load(folder):
        opened.append(folder.name)
        return real(folder)

    monkeypatch.setattr(export, "load", load)
    return opened


def _declared(folder):
    """The split sizes the hospital declares (hospital.yaml)."""
    return HospitalFolder(folder).declared


def _refused(reply, setting: str) -> str:
    status = reply_status(reply)
    assert status[M.STATE] == ReplyState.REFUSED_POLICY, status
    assert f"'{setting}'" in status[M.REASON], status[M.REASON]
    assert not reply.content.array_records and not reply.content.metric_records  # nothing released
    return status[M.REASON]


# ---------------------------------------------------------------------------------------
# 1. The coordinator cannot choose which stays, values or labels a hospital reads
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("override, key", [
    ("data.max_stays=1", "data.max_stays"),  # "the first k stays by id"
    ("task.missing_label=[1]", "task.missing_label[0]"),  # "only the survivors"
    ("task.label_column=Survival", "task.label_column"),
    ("task.bins=[0.5]", "task.bins"),
    ("features.select=[HR]", "features.select"),  # crashed the app after the charge before
    ("features.window_hours=24", "features.window_hours"),
])
def test_a_message_cannot_choose_the_stays_or_labels_a_hospital_reads(hospital, reads, override, key):
    cfg = hospital_cfg(override)
    for reply in (client_app.train(hospital_message(cfg, "r", 1), node_context(hospital)),
                  client_app.evaluate(hospital_message(cfg, "r", 1, MessageType.EVALUATE, "val"), node_context(hospital))):
        reason = _refused(reply, key)
        assert reason.startswith(f"'{key}' differs from what this hospital reads")  # the key, nothing else
    assert not reads and folder_ledger(hospital).entries == []


def test_a_message_with_the_data_settings_of_another_machine_still_trains(hospital):
    """Where the coordinator keeps its own copy of data (data.path, outcomes, id column,
    cache) and how a simulation shares it out are not the hospital's concern: ignored."""
    cfg = hospital_cfg("data.path=/elsewhere/set-b.tar.gz", "data.id_column=SAPS-I", "data.cache=false",
                       "split.train=0.98", "split.val=0.01", "split.test=0.01", "partition.scheme=iid")
    assert reply_status(client_app.train(hospital_message(cfg, "r", 1), node_context(hospital)))[M.STATE] == "trained"


def test_a_simulated_hospital_reads_its_simulation_not_the_message(physionet_files):
    from flwr.app import Context

    cfg = hospital_cfg("data.max_stays=300")
    train = client_app.handlers(simulation=cfg)["train"]
    context = Context(run_id=1, node_id=0, node_config={"partition-id": 0, "num-partitions": 4}, state=RecordDict(),
                      run_config={})
    for override, key in (("data.max_stays=5", "data.max_stays"), ("run.seed=7", "run.seed"),
                          ("split.seed=3", "split.seed"), ("task.missing_label=[0]", "task.missing_label[0]")):
        _refused(train(hospital_message(hospital_cfg("data.max_stays=300", override), "r", 1), context), key)
    assert reply_status(train(hospital_message(cfg, "r", 1), context))[M.STATE] == ReplyState.TRAINED


# ---------------------------------------------------------------------------------------
# 2. Refusals carry only numbers of the message, the policy and the declared counts
# ---------------------------------------------------------------------------------------


def test_refusal_numbers_come_from_the_declared_count_not_the_data(hospital, hospital_data):
    """The issue's decoding attack: three costly-round refusals at batch sizes 1, 20, 50
    gave epsilons from which the exact number of training stays followed. They now
    follow from the count the hospital declares, and stay the same when the export
    loses a training stay."""
    declared = _declared(hospital).train
    ledger = folder_ledger(hospital)

    def reasons():
        out = []
        for batch in (1, 20, 50):
            cfg = hospital_cfg("privacy.noise_multiplier=0.5", "privacy.target_epsilon=0", "training.local_epochs=0.01",
                               f"training.batch_size={batch}")
            out.append(_refused(client_app.train(hospital_message(cfg, "r", 1), node_context(hospital)), "privacy"))
        return out

    before = reasons()
    for batch, reason in zip((1, 20, 50), before):
        q, steps = steps_per_round(declared, batch, 0.01)
        cost = epsilon([NoisyRelease(1, 0.5, q, steps, 1.0)], ledger.delta, "rdp")
        assert f"spend epsilon {cost:.3g} in one round" in reason
    _drop_one_training_stay(hospital)
    assert reasons() == before
    assert folder_ledger(hospital).entries == []


def _drop_one_training_stay(folder, register: bool = True) -> None:
    """The hospital's export loses one training stay (the same folder, secret and counts),
    registered by its staff unless ``register`` is false."""
    from client.folder import split_of

    settings = yaml.safe_load((folder / "hospital.yaml").read_text())
    data = folder.parent / "export-minus-one"
    shutil.copytree(settings["data"]["path"], data)
    ids = sorted(p.stem for p in data.glob("*.txt"))
    f = HospitalFolder(folder)
    first = next(i for i, s in zip(ids, split_of(ids, f.secret("split"), f.policy.split)) if s == Split.TRAIN)
    (data / f"{first}.txt").unlink()
    settings["data"]["path"] = str(data)
    (folder / "hospital.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    if register:
        from client.commands import register_data

        register_data(folder)  # the staff register it; the declared counts stay


def test_an_empty_split_is_declined_by_its_declared_count_even_after_the_budget(hospital_data, tmp_path):
    """"val: the split is empty" answered from the data, uncharged and before the budget,
    so a hostile coordinator could ask it for ever. A declared count of zero is the
    hospital's setting: the answer is the same whatever its data."""
    folder = make_hospital(tmp_path, *hospital_data)
    settings = yaml.safe_load((folder / "hospital.yaml").read_text())
    settings["declared"]["val"] = 0
    (folder / "hospital.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    reply = client_app.evaluate(hospital_message(hospital_cfg(), "r", 3, MessageType.EVALUATE, "val"),
                                node_context(folder))
    assert reply_status(reply)[M.NOT_EVALUATED] == "val: this hospital declares no val stays"
    assert folder_ledger(folder).entries == []


def test_every_count_a_hospital_sends_is_the_declared_one(hospital, hospital_data):
    declared = _declared(hospital)
    cfg = hospital_cfg("evaluation.validate_every=1")
    _drop_one_training_stay(hospital)
    trained = client_app.train(hospital_message(cfg, "r", 2, evaluate="val"), node_context(hospital))
    assert trained.content[M.METRICS][M.NUM_EXAMPLES] == declared.train
    assert trained.content[M.evaluation_key(Split.VAL)]["n"].numpy().tolist() == [declared.val]
    sent = Ledger.from_json(reply_status(trained)[M.LEDGER])
    assert {e.examples for e in sent.entries if e.split == Split.TRAIN} == {declared.train}
    assert {e.examples for e in sent.entries if e.split == Split.VAL} == {declared.val}


# ---------------------------------------------------------------------------------------
# 3. Nothing is charged for a request that will fail
# ---------------------------------------------------------------------------------------


def _with_arrays(cfg, arrays: dict[str, np.ndarray], **kwargs) -> Message:
    return hospital_message(cfg, "r", 1, arrays=ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()}),
                            **kwargs)


def test_a_huge_model_is_refused_before_anything_is_built_or_charged(hospital, reads):
    cfg = hospital_cfg("model.gru_hidden=[100000]", "model.init=random", "model.carry_units=[]")
    base = {k: v.numpy() for k, v in initial_arrays(hospital_cfg()).items()}
    _refused(client_app.train(_with_arrays(cfg, base), node_context(hospital)), "model")
    assert not reads and folder_ledger(hospital).entries == []


def test_an_oversized_array_is_refused_by_its_size_before_it_is_copied(hospital, reads, monkeypatch):
    base = {k: v.numpy() for k, v in initial_arrays(hospital_cfg()).items()}
    big = ArrayRecord({**{k: Array(v) for k, v in base.items()}, "extra.huge": Array(np.zeros(20_000_000, np.float32))})
    copies = []
    real = Array.numpy
    monkeypatch.setattr(Array, "numpy", lambda self: copies.append(self.shape) or real(self))
    message = hospital_message(hospital_cfg(), "r", 1, arrays=big)
    reason = _refused(client_app.train(message, node_context(hospital)), "arrays")
    assert "carry 80,00" in reason and "at most 67,108,864" in reason  # its bytes and the policy's limit: settings, not data
    assert (20_000_000,) not in copies and not reads and folder_ledger(hospital).entries == []


@pytest.mark.parametrize("change", ["extra", "missing", "misshapen", "integer"])
def test_weights_that_are_not_the_models_are_refused_before_the_charge(hospital, reads, change):
    cfg = hospital_cfg()
    arrays = {k: v.numpy().copy() for k, v in initial_arrays(cfg).items()}
    first = next(iter(arrays))
    if change == "extra":
        arrays["extra.weight"] = np.zeros(3, np.float32)
    elif change == "missing":
        del arrays[first]
    elif change == "misshapen":
        arrays[first] = np.zeros((1, 1), np.float32)
    else:
        arrays[first] = arrays[first].astype(np.int64)
    _refused(client_app.train(_with_arrays(cfg, arrays), node_context(hospital)), "arrays")
    assert not reads and folder_ledger(hospital).entries == []


def test_a_failure_after_reading_the_data_charges_nothing_and_names_no_exception(hospital, monkeypatch):
    """A crash once patient data are read (here: in training) records nothing, sends
    nothing, and its reply does not say which exception it was (which can depend on the
    data): the hospital's log does."""
    def broken(*args, **kwargs):
        raise OverflowError("a value of one patient")

    monkeypatch.setattr(client_app, "train_local", broken)
    reply = client_app.train(hospital_message(hospital_cfg(), "r", 1), node_context(hospital))
    status = reply_status(reply)
    assert status[M.STATE] == ReplyState.REFUSED and status[M.REASON] == "the hospital's app failed; its log says why"
    assert folder_ledger(hospital).entries == []


# ---------------------------------------------------------------------------------------
# 4. Tensors, counts, bands, forged cells, the budget check, damaged files
# ---------------------------------------------------------------------------------------


def test_the_hospitals_tensors_live_in_its_own_folder_only(hospital_data, tmp_path, monkeypatch):
    shared = tmp_path / "shared-cache"
    shared.mkdir()
    monkeypatch.setenv("FEDGRU_CACHE", str(shared))
    folder = make_hospital(tmp_path / "h", *hospital_data)
    for cfg in (hospital_cfg(), hospital_cfg("features.select=[HR]")):  # a hostile second definition: refused
        client_app.train(hospital_message(cfg, "r", 1), node_context(folder))
    assert list(shared.iterdir()) == []  # nothing in the shared cache, whatever the messages asked
    cache = folder / "cache"
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700 and stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert {p.name for p in cache.iterdir()} >= {"X.npy", "S.npy", "y.npy", "stay_ids.npy", "meta.json"}


def test_the_shared_cache_is_its_owners_only(tmp_path, monkeypatch):
    from common.paths import cache_dir

    monkeypatch.setenv("FEDGRU_CACHE", str(tmp_path / "fresh"))
    assert stat.S_IMODE(cache_dir().stat().st_mode) == 0o700
    os.chmod(tmp_path / "fresh", 0o755)
    assert stat.S_IMODE(cache_dir().stat().st_mode) == 0o700


def test_a_split_named_twice_in_one_message_is_refused(hospital):
    """"val val val" made one release but passed the per-run count as one message."""
    reply = client_app.evaluate(hospital_message(hospital_cfg(), "r", 3, MessageType.EVALUATE, "val val val"),
                                node_context(hospital))
    _refused(reply, "evaluate")
    assert folder_ledger(hospital).entries == []


def test_subgroup_bands_count_against_the_bin_limit(hospital):
    yearly = json.dumps([{"name": "age", "column": "Age", "bands": list(range(20, 100))}])
    cfg = hospital_cfg(f"evaluation.subgroups={yearly}")
    reply = client_app.evaluate(hospital_message(cfg, "r", 3, MessageType.EVALUATE, "test"), node_context(hospital))
    reason = _refused(reply, "evaluation.subgroups[0]")
    assert "82 groups" in reason and "at most 20" in reason  # 81 bands and "unknown"
    assert folder_ledger(hospital).entries == []


def test_a_forged_histogram_cell_is_dropped_by_the_coordinator():
    """A hostile peer's cells of 1e308 passed every check; pooled with honest ones they
    made the pooled histogram infinite."""
    from common.metrics import ScoreGrid, ScoreSummary
    from server.validation import ReplyRejected, read_evaluations

    cfg = hospital_cfg()
    grid = ScoreGrid(*cfg.evaluation.logit_range, cfg.evaluation.score_bins)
    honest = ScoreSummary(np.full((2, 1, grid.bins), 3.0), None, 60, grid)
    ledger = Ledger("peer", 1e-5)
    ledger.record(LedgerEntry("run", 2, Mechanism.GAUSSIAN, "histogram", split=Split.VAL, item=Item.HISTOGRAM,
                              noise_multiplier=4.0, sample_rate=1.0, steps=1, max_grad_norm=1.0, examples=60))

    def reply(histogram):
        summary = ScoreSummary(histogram, None, 60, grid)
        request = Message(RecordDict({M.CONFIG: ConfigRecord({"x": 1})}), dst_node_id=3, message_type=MessageType.TRAIN)
        return Message(RecordDict({M.evaluation_key(Split.VAL): ArrayRecord({k: Array(v) for k, v in summary.to_arrays().items()})}),
                       reply_to=request)

    assert Split.VAL in read_evaluations(reply(honest.histogram), cfg, ledger, "run", 2, [Split.VAL]).summaries
    forged = honest.histogram.copy()
    forged[1, 0, 4] = 1e308
    with pytest.raises(ReplyRejected, match="no 60 patients"):
        read_evaluations(reply(forged), cfg, ledger, "run", 2, [Split.VAL])
    below = honest.histogram.copy()
    below[0, 0, 0] = -1e6
    with pytest.raises(ReplyRejected, match="no 60 patients"):
        read_evaluations(reply(below), cfg, ledger, "run", 2, [Split.VAL])


def test_an_rdp_budget_check_costs_the_same_however_long_the_ledger(monkeypatch):
    """RDP composes by adding vectors: the check adds the planned release's to a running
    sum instead of recomposing every entry (a loop of small releases took minutes)."""
    from common import ledger as ledger_module

    ledger = Ledger("h", 1e-5)
    for r in range(3000):
        ledger.record(LedgerEntry("run", r, Mechanism.GAUSSIAN, "histogram", split=Split.VAL, item=Item.HISTOGRAM,
                                  noise_multiplier=40 + r % 700 / 100, sample_rate=1.0, steps=1, max_grad_norm=1.0,
                                  examples=50))
    first = ledger.epsilon(Split.VAL)
    calls = []
    real = ledger_module.rdp_of
    monkeypatch.setattr(ledger_module, "rdp_of", lambda *a: calls.append(a) or real(*a))
    planned = LedgerEntry("run", 3000, Mechanism.GAUSSIAN, "histogram", split=Split.VAL, item=Item.HISTOGRAM,
                          noise_multiplier=3.3, sample_rate=1.0, steps=1, max_grad_norm=1.0, examples=50)
    checked = ledger.epsilon_with([planned])
    assert len(calls) == 1  # the planned release's RDP only
    assert checked == pytest.approx(epsilon(ledger.history(Split.VAL) + [planned.as_release()], 1e-5, "rdp"), rel=1e-12)
    ledger.record(planned)
    assert len(calls) == 2 and ledger.epsilon(Split.VAL) == pytest.approx(checked, rel=1e-12) and checked > first


def test_a_truncated_archive_is_a_clear_error_not_a_traceback(tmp_path, physionet_files):
    from common.data.physionet import read_physionet
    from common.data.records import DataError, ReadSummary

    set_a, _ = physionet_files
    truncated = tmp_path / "set-a.tar.gz"
    truncated.write_bytes(set_a.read_bytes()[: 200_000])
    with pytest.raises(DataError, match=r"set-a\.tar\.gz: is damaged or truncated"):
        read_physionet(truncated, ["HR"], ReadSummary())


def test_a_time_after_48_hours_names_its_line(tmp_path, physionet_files):
    from common.data.physionet import parse_stay
    from common.data.records import DataError, ReadSummary

    raw = b"Time,Parameter,Value\n00:00,RecordID,1\n12:00,HR,80\n73:30,HR,90\n"
    with pytest.raises(DataError, match=r"line 4, column 'Time': time is after 48:00"):
        parse_stay("1.txt", "1", raw, {"HR": 0}, ReadSummary())


def test_a_definition_from_a_hospital_is_checked_like_a_config():
    from common.config import ConfigError
    from common.definition import DataDefinition

    good = DataDefinition.of(hospital_cfg())
    assert DataDefinition.from_json(good.to_json(), "x") == good
    plain = good.to_plain()
    plain["task"]["classes"] = ["only one"]
    with pytest.raises(ConfigError, match="task.classes"):
        DataDefinition.from_plain(plain, "x")


# ---------------------------------------------------------------------------------------
# The coordinator learns what hospitals read, and builds the model to match
# ---------------------------------------------------------------------------------------


def _ready(node_id: int, name: str, definition) -> Message:
    request = Message(RecordDict({M.CONFIG: ConfigRecord({"x": 1})}), dst_node_id=node_id, message_type=MessageType.QUERY)
    status = {M.HOSPITAL: name, M.STATE: ReplyState.READY.value, M.MODE: NodeMode.DEPLOYMENT.value}
    if definition is not None:
        status[M.DEFINITION] = definition.to_json()
    return Message(RecordDict({M.STATUS: ConfigRecord(status)}), reply_to=request)


def test_the_run_reads_data_as_its_hospitals_do_and_leaves_out_one_that_differs():
    from common.definition import DataDefinition
    from server.discovery import Roster
    from tests.conftest import ReplayGrid

    cfg = hospital_cfg()  # the coordinator's config: the 15 SAPS II variables
    everything = DataDefinition.of(hospital_cfg("features.select=[]"))  # the hospitals read all 37
    other = DataDefinition.of(hospital_cfg("features.select=[]", "features.window_hours=24"))
    grid = ReplayGrid([_ready(1, "a", everything), _ready(2, "b", everything), _ready(3, "c", other)])
    roster = Roster()
    roster.discover(grid, lambda: RecordDict(), wait_s=5, min_hospitals=2)
    agreed = roster.agreed_config(cfg)
    assert len(agreed.features.variables) == 37 and everything.difference(agreed) is None
    assert agreed.model == cfg.model and agreed.training == cfg.training  # only what is read changes
    left_out = roster.hospitals[3]
    assert left_out.state.value == "refused" and "(features.window_hours)" in left_out.reason
    assert roster.hospitals[1].active and roster.hospitals[2].active
    with pytest.raises(RuntimeError, match="otherwise than when this run started"):
        roster.agreed_config(cfg, resumed=True)


def test_a_definition_from_before_normal_existed_still_reads_alike_and_is_not_left_out(hospital):
    """'normal', 'normal_uncharted', 'unit' and 'labels' change how results are shown, not
    what is read: a hospital whose definition.yaml predates 'normal' and 'normal_uncharted'
    (their defaults there) trains in a run whose config has GCS normal 15 and FiO2
    uncharted, and a federation mixing both is not split (a review found the tensors' key
    of such a folder changed with 'normal_uncharted', so its registered export was lost)."""
    import dataclasses

    from common.definition import DataDefinition
    from server.discovery import Roster
    from tests.conftest import ReplayGrid

    cfg = hospital_cfg()
    new = DataDefinition.of(cfg)
    assert any(v.normal is not None for v in new.features.variables)
    assert any(v.normal_uncharted for v in new.features.variables)
    old = DataDefinition(new.task, dataclasses.replace(new.features, variables=[
        dataclasses.replace(v, normal=None, normal_uncharted=False) for v in new.features.variables]))
    # the tensors' cache key of a folder registered before 'normal' existed: no 'normal' key at all
    before = old.to_plain()
    for v in before["features"]["variables"]:
        del v["normal"], v["normal_uncharted"]
    for d in before["features"]["static"]:
        del d["normal"]
    assert old.tensors_json() == new.tensors_json() == json.dumps(before, sort_keys=True)
    unit_less = DataDefinition(new.task, dataclasses.replace(new.features, variables=[
        dataclasses.replace(v, unit="") for v in new.features.variables]))
    assert unit_less.difference(cfg) is None and unit_less.reading_json() == new.reading_json()
    assert old.difference(cfg) is None and old.reading_json() == new.reading_json()
    grid = ReplayGrid([_ready(1, "a", new), _ready(2, "b", old), _ready(3, "c", old)])
    roster = Roster()
    roster.discover(grid, lambda: RecordDict(), wait_s=5, min_hospitals=2)
    roster.agreed_config(cfg)
    assert all(h.active for h in roster.hospitals.values())
    moved = DataDefinition(new.task, dataclasses.replace(new.features, variables=[
        dataclasses.replace(v, center=v.center + 1) if v.name == "GCS" else v for v in new.features.variables]))
    assert moved.difference(cfg).endswith(".center")  # what is read still counts
    # the hospital's own check: a folder whose definition has no 'normal' takes the new config
    (hospital / "definition.yaml").write_text(yaml.safe_dump(before, sort_keys=False))  # as an older fedgru wrote it
    assert HospitalFolder(hospital).definition.difference(cfg) is None
    status = reply_status(client_app.train(hospital_message(cfg, "r", 1), node_context(hospital)))
    assert status[M.STATE] == "trained", status


# ---------------------------------------------------------------------------------------
# What the staff run: registering an export, declaring counts
# ---------------------------------------------------------------------------------------


def test_a_folder_from_an_earlier_fedgru_is_told_to_register_its_export(hospital):
    from client.commands import register_data

    settings = yaml.safe_load((hospital / "hospital.yaml").read_text())
    counts = settings.pop("declared")
    settings["data"]["id_column"] = settings["data"]["label_column"] = ""  # as `hospital init` wrote them then
    (hospital / "hospital.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    (hospital / "definition.yaml").unlink()
    shutil.rmtree(hospital / "cache")
    reply = client_app.train(hospital_message(hospital_cfg(), "r", 1), node_context(hospital))
    status = reply_status(reply)
    assert status[M.STATE] == ReplyState.REFUSED and "`fedgru hospital data --hospital-dir <path>` once" in status[M.REASON]
    text = register_data(hospital)
    assert f"declared split sizes: train {counts['train']}, validation {counts['val']}, test {counts['test']}" in text
    assert reply_status(client_app.train(hospital_message(hospital_cfg(), "r", 1), node_context(hospital)))[M.STATE] == "trained"


def test_counts_change_only_when_the_staff_recount(hospital):
    from client.commands import register_data

    declared = _declared(hospital)
    _drop_one_training_stay(hospital, register=False)
    kept = register_data(hospital)  # a new export: registered, the declared counts kept
    assert _declared(hospital) == declared and f"now hold train {declared.train - 1}," in kept
    register_data(hospital, recount=True)
    assert _declared(hospital).train == declared.train - 1
    reply = client_app.train(hospital_message(hospital_cfg(), "r", 1), node_context(hospital))
    assert reply.content[M.METRICS][M.NUM_EXAMPLES] == declared.train - 1


def test_a_new_definition_is_the_staffs_choice_and_runs_must_follow_it(hospital):
    from client.commands import register_data

    every_variable = hospital_cfg("features.select=[]")
    register_data(hospital, cfg=every_variable)
    _refused(client_app.train(hospital_message(hospital_cfg(), "r", 1), node_context(hospital)), "features.select")
    reply = client_app.train(hospital_message(every_variable, "r", 1), node_context(hospital))
    assert reply_status(reply)[M.STATE] == ReplyState.TRAINED


def test_a_changed_export_is_not_read_while_messages_are_served(hospital, reads):
    """Files that change on disk are read only when the staff register them: a message
    cannot be answered differently because one new stay's file cannot be parsed."""
    _drop_one_training_stay(hospital, register=False)
    settings = yaml.safe_load((hospital / "hospital.yaml").read_text())
    bad = sorted(Path(settings["data"]["path"]).glob("*.txt"))[0]
    bad.write_text(bad.read_text() + "49:00,HR,80\n")  # a time this format cannot hold
    reply = client_app.train(hospital_message(hospital_cfg(), "r", 1), node_context(hospital))
    assert reply_status(reply)[M.STATE] == ReplyState.TRAINED  # the registered stays still serve
    assert folder_ledger(hospital).noisy(Split.TRAIN)[0].examples == _declared(hospital).train


def test_a_round_outside_the_run_and_non_finite_settings_are_refused_before_reading(hospital, reads):
    """Round -1 trained, then failed to record (charged nothing, yet the optimizer state
    it left fed the next round); an infinite noise multiplier (JSON's Infinity) did the
    same. Both are refused now before anything is read."""
    for round_ in (-1, 0, 4):
        status = reply_status(client_app.train(hospital_message(hospital_cfg(), "r", round_), node_context(hospital)))
        assert status[M.STATE] == ReplyState.REFUSED_POLICY and "'server-round'" in status[M.REASON], status
    for section, key, value in (("privacy", "noise_multiplier", float("inf")), ("training", "momentum", 1.0),
                                ("training", "lr", float("nan"))):
        tree = json.loads(hospital_cfg().to_json())
        tree[section][key] = value
        if key == "noise_multiplier":
            tree["privacy"]["target_epsilon"] = 0.0
        message = hospital_message(hospital_cfg(), "r", 1)
        message.content[M.CONFIG] = ConfigRecord({**dict(message.content[M.CONFIG]), M.EXPERIMENT_JSON: json.dumps(tree)})
        status = reply_status(client_app.train(message, node_context(hospital)))
        assert status[M.STATE] == ReplyState.REFUSED and f"{section}.{key}" in status[M.REASON], status
    assert not reads and folder_ledger(hospital).entries == []


def test_training_memory_does_not_depend_on_how_many_stays_are_sampled():
    """Each step's Poisson sample is processed in pieces of exactly ``micro_batch`` rows,
    padded, so the largest tensor a step holds is the same for 1 sampled stay or 300."""
    import torch

    from common.model import GRUClassifier, model_spec
    from common.training import DPSettings, TensorData, secret_generator, train_local

    cfg = hospital_cfg()
    for n in (1, 300):
        model = GRUClassifier(model_spec(cfg), "fast")
        data = TensorData(torch.zeros(n, 48, model.spec.n_channels), torch.zeros(n, model.spec.n_static),
                          torch.zeros(n, dtype=torch.long))
        seen = []
        hook = model.head.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
        train_local(model, data, cfg.training, 1, DPSettings(1.0, 1.0, 1.0, expected_batch_size=64, micro_batch=64),
                    secret_generator(), secret_generator())
        hook.remove()
        assert {s[0] for s in seen} == {64}, (n, seen)  # every forward pass: exactly 64 rows
