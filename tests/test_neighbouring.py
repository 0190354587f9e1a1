"""The root check of a hospital's privacy against the coordinator: two hospitals whose
data differ by one patient answer every message byte for byte alike, except inside the
DP releases their ledgers count.

Five real hospital folders share one secret (so one split of every stay), one policy and
one set of declared counts: ``a`` reads an export of set A's stays, ``b`` the same
export without one training stay, ``c`` with one training stay's outcome flipped, ``d``
without one test stay, ``e`` with one validation stay's outcome flipped, ``f`` without
one validation stay (the hourly and onset histograms count every validation stay
whatever its outcome, so only a stay's absence reaches them). The same battery of
hostile messages (every config key the coordinator can set, fuzzed with hypothesis:
subsets, labels, batch sizes, sample rates, noise, clipping, splits, bins, extra or
misshapen arrays, repeated evaluations) goes to all six, each sequence
starting from the same ledger. Every reply, with its DP arrays' values left out (their
names, shapes and types stay in), must be the same bytes; so must the ledgers; and a
refused message must charge nothing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from unittest.mock import patch

import numpy as np
import pytest
import yaml
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from client import app as client_app
from client.commands import register_data
from client.folder import HospitalFolder, split_of
from client.hospital import Node
from common import messages as M
from common.data.preprocess import num_steps
from common.messages import ReplyState, Split
from tests.conftest import hospital_cfg, make_hospital

EXPORT_STAYS = 200


@pytest.fixture(autouse=True)
def _identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield


def _export(root: Path, files: dict[str, bytes], outcomes: str) -> tuple[Path, Path]:
    root.mkdir(parents=True)
    (root / "stays").mkdir()
    for name, raw in files.items():
        (root / "stays" / name).write_bytes(raw)
    (root / "outcomes.txt").write_text(outcomes)
    return root / "stays", root / "outcomes.txt"


def _point_at(folder: Path, data: Path, outcomes: Path) -> None:
    settings_file = folder / "hospital.yaml"
    text = yaml.safe_load(settings_file.read_text())
    text["data"]["path"], text["data"]["outcomes"] = str(data), str(outcomes)
    settings_file.write_text(yaml.safe_dump(text, sort_keys=False))


@pytest.fixture(scope="module")
def neighbours(tmp_path_factory, physionet_files):
    """Folders a (the export), b (one training stay fewer), c (one training label flipped),
    d (one test stay fewer), e (one validation label flipped), f (one validation stay fewer)."""
    import tarfile

    set_a, outcomes_file = physionet_files
    root = tmp_path_factory.mktemp("neighbours")
    with tarfile.open(set_a) as tar:
        members = [m for m in tar.getmembers() if m.name.endswith(".txt")][:EXPORT_STAYS]
        files = {Path(m.name).name: tar.extractfile(m).read() for m in members}
    lines = outcomes_file.read_text().splitlines()
    header, rows = lines[0], {line.split(",")[0]: line for line in lines[1:]}
    ids = [name[:-4] for name in files]
    outcomes = "\n".join([header] + [rows[i] for i in ids]) + "\n"
    data_a = _export(root / "export-a", files, outcomes)
    a = make_hospital(root, *data_a, max_epsilon=2.5, name="st-neighbour")
    folder = HospitalFolder(a)
    splits = split_of(ids, folder.secret("split"), folder.policy.split)
    trained = [i for i, s in zip(ids, splits) if s == Split.TRAIN]
    gone, flipped = trained[0], trained[1]
    tested = next(i for i, s in zip(ids, splits) if s == Split.TEST)
    validated = next(i for i, s in zip(ids, splits) if s == Split.VAL)
    data_b = _export(root / "export-b", {k: v for k, v in files.items() if k != f"{gone}.txt"},
                     "\n".join([header] + [rows[i] for i in ids if i != gone]) + "\n")
    columns = header.split(",")
    death = columns.index("In-hospital_death")

    def flip(line: str) -> str:
        cells = line.split(",")
        cells[death] = "0" if cells[death] == "1" else "1"
        return ",".join(cells)

    data_c = _export(root / "export-c", files,
                     "\n".join([header] + [flip(rows[i]) if i == flipped else rows[i] for i in ids]) + "\n")
    data_d = _export(root / "export-d", {k: v for k, v in files.items() if k != f"{tested}.txt"},
                     "\n".join([header] + [rows[i] for i in ids if i != tested]) + "\n")
    data_e = _export(root / "export-e", files,
                     "\n".join([header] + [flip(rows[i]) if i == validated else rows[i] for i in ids]) + "\n")
    data_f = _export(root / "export-f", {k: v for k, v in files.items() if k != f"{validated}.txt"},
                     "\n".join([header] + [rows[i] for i in ids if i != validated]) + "\n")
    folders = {}
    for name, data in (("a", data_a), ("b", data_b), ("c", data_c), ("d", data_d), ("e", data_e), ("f", data_f)):
        copy = root / f"hospital-{name}"
        shutil.copytree(a, copy)
        _point_at(copy, *data)
        register_data(copy)  # the staff register the export they point at (the declared counts stay)
        folders[name] = copy
    fresh = {p.name: p.read_bytes() for p in a.iterdir() if p.is_file() and p.name.startswith("ledger")}
    return folders, fresh


def _reset(folders: dict[str, Path], fresh: dict[str, bytes]) -> None:
    """Every folder back to the same ledger, with no kept replies."""
    for folder in folders.values():
        for p in folder.iterdir():
            if p.name.startswith("ledger"):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        for name, raw in fresh.items():
            (folder / name).write_bytes(raw)


# ------------------------------------------------------------------------------------
# What a reply says outside its DP releases
# ------------------------------------------------------------------------------------


def _is_dp(record: str, key: str) -> bool:
    """Whether an array of a reply is (inside) a DP release: its values may differ."""
    if record == M.ARRAYS:
        return True  # model weights after DP-SGD
    if record.startswith(M.EVALUATION_PREFIX):
        return key in ("histogram", "confusion")  # n and grid are not
    return (record, key) in ((M.SUBGROUPS, "subgroup-histograms"), (M.IMPORTANCE, "importance"),
                             (M.HOURLY, "hourly-histograms"), (M.ONSET, "onset-histogram"))


def outside_dp(reply: Message) -> dict:
    """Everything a reply carries, with the values of its DP arrays left out (their
    names, shapes and types kept): two neighbouring hospitals must give equal ones."""
    if reply.has_error():
        return {"error": [int(reply.error.code), str(reply.error.reason)]}
    content = reply.content
    return {
        "configs": {name: {k: _plain(v) for k, v in rec.items()} for name, rec in content.config_records.items()},
        "metrics": {name: {k: _plain(v) for k, v in rec.items()} for name, rec in content.metric_records.items()},
        "arrays": {name: {k: [str(a.dtype), list(a.shape), None if _is_dp(name, k) else a.data.hex()]
                          for k, a in rec.items()} for name, rec in content.array_records.items()},
    }


def _plain(value):
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def first_difference(x, y, path: str = "") -> str | None:
    """Where two replies' non-DP parts first differ, with both values (for the failure)."""
    if isinstance(x, dict) and isinstance(y, dict):
        for key in sorted(set(x) | set(y)):
            if key not in x or key not in y:
                return f"{path}/{key}: only in {'the first' if key in x else 'the second'}"
            found = first_difference(x[key], y[key], f"{path}/{key}")
            if found:
                return found
        return None
    if x != y:
        return f"{path}: {str(x)[:300]!r} != {str(y)[:300]!r}"
    return None


# ------------------------------------------------------------------------------------
# The hostile messages
# ------------------------------------------------------------------------------------

# Every config key a coordinator can set, with values that select patients or labels,
# change what is counted, or try to make a refusal carry a number.
HOSTILE_SETTINGS = {
    "data.max_stays": st.sampled_from([0, 1, 2, 3, 5, 50]),
    "data.id_column": st.sampled_from(["RecordID", "SAPS-I", "In-hospital_death"]),
    "data.cache": st.booleans(),
    "data.format": st.sampled_from(["physionet2012", "long_csv"]),
    "task.missing_label": st.sampled_from([[-1], [0], [1], [0, 1]]),
    "task.label_column": st.sampled_from(["In-hospital_death", "Survival", "SAPS-I"]),
    "task.bins": st.sampled_from([[], [0.5], [10.0]]),
    "features.select": st.sampled_from([["HR"], ["GCS", "HR"], ["BUN"]]),
    "features.window_hours": st.sampled_from([24, 48]),
    "features.variables.0.center": st.sampled_from([0.0, 1e6]),
    "split.train": st.sampled_from([0.1, 0.7, 0.98]),
    "split.folds": st.sampled_from([0, 5]),
    "partition.scheme": st.sampled_from(["icu_type", "iid"]),
    "run.seed": st.integers(0, 3),
    "run.rounds": st.sampled_from([1, 3, 80, 100000]),
    "training.batch_size": st.sampled_from([1, 2, 20, 50, 256, 100000]),
    "training.sample_rate": st.sampled_from([0.0, 0.001, 0.5, 1.0]),
    "training.local_epochs": st.sampled_from([0.01, 0.5, 1.0, 3.0]),
    "privacy.enabled": st.booleans(),
    # (noise_multiplier, target_epsilon): exactly one is a valid config; both, a forged one
    "privacy.noise": st.sampled_from([(0.0, 1.0), (0.3, 0.0), (0.5, 0.0), (0.8, 0.0), (3.0, 0.0), (0.0, 0.05),
                                      (0.0, 50.0), (0.5, 1.0)]),
    "privacy.max_grad_norm": st.sampled_from([0.001, 1.0, 3.0, 50.0]),
    "privacy.max_epsilon": st.sampled_from([0.01, 0.3, 1.0, 1e9]),
    "privacy.clipping": st.sampled_from(["flat", "per_layer"]),
    "evaluation.score_bins": st.sampled_from([2, 10, 20, 21, 1000]),
    "evaluation.subgroup_bins": st.sampled_from([2, 5, 10]),
    "evaluation.subgroups": st.sampled_from([
        [{"name": "age", "column": "Age", "bands": [50, 65, 80]}],
        [{"name": "age", "column": "Age", "bands": [float(a) for a in range(20, 100)]}],
        [],
    ]),
    "evaluation.validate_every": st.sampled_from([0, 1, 20]),
    # the monitor's releases about the validation patients: their mechanism, shares and hours
    "evaluation.onset_noise": st.sampled_from(["laplace", "gaussian"]),
    "evaluation.onset_share": st.sampled_from([0.0, 0.2, 0.9]),
    "evaluation.monitor_rate": st.sampled_from([0.01, 0.3, 0.99]),
    "evaluation.hourly_checkpoints": st.sampled_from([[], [1], [1, 6, 12, 24], list(range(1, 48))]),
    "evaluation.hourly_share": st.sampled_from([0.0, 0.3, 0.99]),
    "evaluation.final_share": st.sampled_from([0.1, 0.75, 1.0]),
    "evaluation.logit_range": st.sampled_from([[-7, 3], [-50, 50], [3, -7]]),
    "training.hourly_loss": st.booleans(),
    "training.positive_weight": st.sampled_from([1.0, 50.0]),
    "privacy.aggregation": st.sampled_from(["per_hospital", "secure"]),
    "evaluation.dp": st.booleans(),
    "evaluation.val_epsilon": st.sampled_from([0.01, 1.0, 100.0]),
    "evaluation.test_epsilon": st.sampled_from([0.01, 1.0, 100.0]),
    "model.gru_hidden": st.sampled_from([[2], [3], [100000]]),
    "model.head_hidden": st.sampled_from([0, 8]),
    "training.momentum": st.sampled_from([0.0, 0.9, 1.0]),
    "training.optimizer": st.sampled_from(["sgd", "adam"]),
    "training.keep_optimizer_state": st.booleans(),
}


def _set(tree: dict, dotted: str, value) -> None:
    if dotted == "privacy.noise":
        tree["privacy"]["noise_multiplier"], tree["privacy"]["target_epsilon"] = value
        return
    *parents, last = dotted.split(".")
    node = tree
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


ARRAY_CHANGES = st.sampled_from(["none"] * 8 + ["extra", "misshapen", "integer", "nan", "missing", "large"])


ROUNDS = {  # the base config plans 3 rounds: mostly rounds of the run, sometimes not
    MessageType.TRAIN: st.sampled_from([1, 1, 2, 2, 3, 3, 0, -1, 4, 80]),
    MessageType.EVALUATE: st.sampled_from([3, 3, 3, 3, 2, 0, -1, 80]),
    MessageType.QUERY: st.just(0),
}
SPLITS = {
    MessageType.TRAIN: st.sampled_from([[], [], ["val"], ["val"], ["test"], ["val", "val"], ["train"], ["everyone"]]),
    MessageType.EVALUATE: st.sampled_from([["val"], ["test"], ["val", "test"], ["val", "test"], ["test", "test"],
                                           ["train"], []]),
    MessageType.QUERY: st.just([]),
}


@st.composite
def hostile_message(draw) -> dict:
    """One message a hostile coordinator may send: honest ones too (a few settings
    changed or none), so that releases are made as well as refused."""
    kind = draw(st.sampled_from([MessageType.TRAIN, MessageType.TRAIN, MessageType.EVALUATE, MessageType.QUERY]))
    keys = draw(st.lists(st.sampled_from(sorted(HOSTILE_SETTINGS)), max_size=3, unique=True))
    return {
        "kind": kind,
        "settings": {k: draw(HOSTILE_SETTINGS[k]) for k in keys},
        "evaluate": draw(SPLITS[kind]),
        "round": draw(ROUNDS[kind]),
        "proximal_mu": draw(st.sampled_from([None] * 6 + [0.1, -1.0, float("inf")])),
        "run": draw(st.sampled_from(["run-1", "run-2"])),
        "threshold": draw(st.sampled_from([None, None, None, 0.12, 0.5, 2.0])),
        # each hour's threshold for the monitor's onset histogram (honest: with a test release)
        "hour_thresholds": draw(st.sampled_from([None] * 5 + ["honest", "honest", "short", "not risks", "nan"])),
        "arrays": draw(ARRAY_CHANGES),
    }


def _arrays(cfg, change: str) -> ArrayRecord:
    from server.coordinator import initial_arrays

    arrays = {k: v.numpy().copy() for k, v in initial_arrays(cfg).items()}
    first = next(iter(arrays))
    if change == "extra":
        arrays["extra.weight"] = np.zeros((3, 3), dtype=np.float32)
    elif change == "misshapen":
        arrays[first] = np.zeros((1, 1), dtype=np.float32)
    elif change == "integer":
        arrays[first] = arrays[first].astype(np.int64)
    elif change == "nan":
        arrays[first].flat[0] = np.nan
    elif change == "missing":
        del arrays[first]
    elif change == "large":
        arrays["extra.large"] = np.zeros(2_000_000, dtype=np.float32)
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


BASE = None


def _base():
    global BASE
    if BASE is None:
        BASE = hospital_cfg("training.batch_size=32", "run.rounds=3", "privacy.max_epsilon=2.5",
                            "evaluation.validate_every=1")
    return BASE


def build_message(spec: dict) -> Message:
    base = _base()
    tree = json.loads(base.to_json())
    for key, value in spec["settings"].items():
        _set(tree, key, value)
    config = {M.EXPERIMENT_JSON: json.dumps(tree, sort_keys=True), M.RUN_ID: spec["run"],
              M.SERVER_ROUND: spec["round"], M.EVALUATE: " ".join(spec["evaluate"])}
    if spec["threshold"] is not None:
        config[M.THRESHOLD] = spec["threshold"]
    if spec.get("hour_thresholds") is not None:
        steps = num_steps(base.features)
        config[M.HOUR_THRESHOLDS] = {
            "honest": [float(t) for t in np.linspace(0.4, 0.15, steps)], "short": [0.2] * 5,
            "not risks": [2.0] * steps, "nan": [float("nan")] * steps}[spec["hour_thresholds"]]
    if spec["proximal_mu"] is not None:
        config[M.PROXIMAL_MU] = spec["proximal_mu"]
    content = {M.CONFIG: ConfigRecord(config)}
    if spec["kind"] != MessageType.QUERY:
        content[M.ARRAYS] = _arrays(base, spec["arrays"])
    return Message(RecordDict(content), dst_node_id=7, message_type=spec["kind"])


HANDLERS = {MessageType.TRAIN: client_app.train, MessageType.EVALUATE: client_app.evaluate}


def answer(folder: Path, context: Context, spec: dict) -> Message:
    msg = build_message(spec)  # a fresh copy for each hospital: handlers may read it in place
    if spec["kind"] == MessageType.QUERY:
        return client_app.query(msg, context)
    return HANDLERS[spec["kind"]](msg, context)


def _ledger_json(folder: Path) -> str:
    """The hospital's own ledger, without what only it keeps (which export, and when)."""
    from client.ledger_store import FileLedgerStore

    f = HospitalFolder(folder)
    return FileLedgerStore(f.ledger_file, f.secret("ledger")).read().for_coordinator()


REFUSALS = {ReplyState.REFUSED.value, ReplyState.REFUSED_POLICY.value}


def _honest(kind, evaluate, round_, **changed) -> dict:
    return {"kind": kind, "settings": {}, "evaluate": evaluate, "round": round_, "proximal_mu": None, "run": "run-1",
            "threshold": None, "hour_thresholds": None, "arrays": "none", **changed}


# An honest run's end, always tried: the final validation, then the test release with the
# monitor's onset histogram (hour thresholds sent) and a second one, which must be refused
HONEST_END = [_honest(MessageType.EVALUATE, ["val"], 3),
              _honest(MessageType.EVALUATE, ["test"], 3, threshold=0.12, hour_thresholds="honest"),
              _honest(MessageType.EVALUATE, ["test"], 3, threshold=0.12, hour_thresholds="honest")]


@settings(max_examples=80, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(sequence=st.lists(hostile_message(), min_size=1, max_size=3))
def test_neighbouring_hospitals_answer_every_message_alike_outside_dp(neighbours, sequence):
    answer_alike(neighbours, sequence, event)


def test_the_onset_histogram_is_released_alike_and_once(neighbours):
    answers = answer_alike(neighbours, HONEST_END)
    assert M.ONSET in answers[1]["arrays"] and M.evaluation_key(Split.TEST) in answers[1]["arrays"]
    assert answers[2]["configs"][M.STATUS][M.STATE] == ReplyState.REFUSED_POLICY.value  # the test split is scored once


def answer_alike(neighbours, sequence: list[dict], note=lambda _text: None) -> list[dict]:
    """Every message of ``sequence`` to the five neighbouring folders: equal answers outside
    their DP releases, equal ledgers, and a refusal that read nothing and charged nothing.
    Returns hospital a's answers (outside DP); ``note``: hypothesis's event, in a property test."""
    folders, fresh = neighbours
    _reset(folders, fresh)
    answers = []
    contexts = {name: Context(run_id=1, node_id=7, node_config={"hospital-dir": str(f)}, state=RecordDict(),
                              run_config={}) for name, f in folders.items()}
    for step, spec in enumerate(sequence):
        before = {name: _ledger_json(folder) for name, folder in folders.items()}
        state_before = {name: _state(context) for name, context in contexts.items()}
        with patch.object(Node, "data", autospec=True, side_effect=Node.data) as reads:
            seen = {name: outside_dp(answer(folder, contexts[name], spec)) for name, folder in folders.items()}
        for other in sorted(folders)[1:]:
            diff = first_difference(seen["a"], seen[other])
            assert diff is None, f"message {step + 1} {spec}: hospital a and its neighbour {other} differ at {diff}"
            assert _ledger_json(folders[other]) == _ledger_json(folders["a"]), f"message {step + 1}: ledgers differ"
        answers.append(seen["a"])
        state = seen["a"].get("configs", {}).get(M.STATUS, {}).get(M.STATE)
        reason = seen["a"].get("configs", {}).get(M.STATUS, {}).get(M.REASON, "")
        note(f"{spec['kind']}: {state} {reason.split(' ')[0] if reason else ''}".strip())
        if state in REFUSALS or "error" in seen["a"]:
            for name, folder in folders.items():
                assert _ledger_json(folder) == before[name], f"message {step + 1} {spec} was refused but charged"
                assert _state(contexts[name]) == state_before[name], f"message {step + 1} {spec} was refused but left state"
            assert reads.call_count == 0, f"message {step + 1} {spec} was refused after patient data were read"
    return answers


def _state(context: Context) -> bytes:
    """A node's kept state (Flower's context.state), as bytes."""
    from client.replies import pack

    return pack(context.state)
