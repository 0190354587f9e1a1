"""A hospital's export as it may really arrive: every damage is a clear error naming the
file, line and column, or a skip that is counted and reported; never a traceback, and
never a patient's value in a message.

One test per damage seen in the wild (the issue's table), then a property test
(hypothesis) that feeds randomly damaged files to both readers.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.config import load_config
from common.data.dataset import load_dataset
from common.data.long_csv import read_long_csv, read_outcomes
from common.data.physionet import parse_stay
from common.data.preprocess import to_tensors
from common.data.records import DataError, ReadSummary
from tests.conftest import DEFAULT_CONFIG, ROOT

CFG = load_config(DEFAULT_CONFIG, ["data.cache=false"])
VARIABLES = [v.name for v in CFG.features.variables]
STATIC = [s.name for s in CFG.features.static]


def _stays(folder: Path, set_a: Path, count: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    ids = []
    with tarfile.open(set_a) as tar:
        for m in [m for m in tar.getmembers() if m.name.endswith(".txt")][:count]:
            (folder / Path(m.name).name).write_bytes(tar.extractfile(m).read())
            ids.append(Path(m.name).stem)
    return ids


def _outcomes(path: Path, rows: list[tuple[str, int]], header: str = "RecordID,SAPS-I,SOFA,Length_of_stay,Survival,In-hospital_death"):
    path.write_text((header + "\n" if header else "") + "".join(f"{i},11,4,9,-1,{y}\n" for i, y in rows))
    return path


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, physionet_files):
    """A model bundle (untrained weights: these tests are about reading, not scoring)."""
    from common.bundle import save_bundle
    from common.model import model_spec
    from server.coordinator import initial_arrays

    path = tmp_path_factory.mktemp("bundle") / "model.pt"
    save_bundle(path, {k: v.numpy() for k, v in initial_arrays(CFG).items()}, model_spec(CFG), CFG)
    return path


def _fedgru(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedgru.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=300)


def test_an_outcomes_file_missing_half_the_rows_is_reported(bundle, physionet_files, tmp_path):
    ids = _stays(tmp_path / "stays", physionet_files[0], 30)
    outcomes = _outcomes(tmp_path / "outcomes.csv", [(i, 0 if k % 3 else 1) for k, i in enumerate(ids[:15])])
    proc = _fedgru("evaluate", "--model", str(bundle), "--data", str(tmp_path / "stays"), "--outcomes", str(outcomes), "--json")
    assert proc.returncode == 0, proc.stderr
    assert '"n": 15' in proc.stdout.splitlines()[-1]
    assert "15 of 30 stays have no outcome" in proc.stderr


def test_one_stay_written_two_ways_with_two_labels_is_an_error(tmp_path):
    path = _outcomes(tmp_path / "o.csv", [("132539.0", 0), ("132539", 1)])
    with pytest.raises(DataError) as err:
        read_outcomes(path, "RecordID", "In-hospital_death")
    assert "line 3, column 'RecordID'" in str(err.value) and "appears twice" in str(err.value)


def test_nan_and_inf_values_are_counted_not_silently_missing(tmp_path, physionet_files):
    stays = tmp_path / "stays"
    ids = _stays(stays, physionet_files[0], 3)
    f = stays / f"{ids[0]}.txt"
    f.write_text(f.read_text().rstrip("\n") + "\n01:00,HR,nan\n02:00,HR,inf\n03:00,Urine,-Infinity\n")
    ds = load_dataset(CFG, data_path=stays, outcomes_path=_outcomes(tmp_path / "o.csv", [(i, 0) for i in ids]))
    assert ds.summary.read.non_finite == {"HR": 2, "Urine": 1}
    assert any("3 values written as nan or inf were set aside (HR 2, Urine 1)" in n for n in ds.summary.notes())
    assert np.isfinite(ds.X).all()


def test_an_outcomes_file_without_header_never_prints_its_first_row(tmp_path):
    path = _outcomes(tmp_path / "o.csv", [("132539", 1)], header="")
    path.write_text("132539,23,7,18,-1,1\n")
    with pytest.raises(DataError) as err:
        read_outcomes(path, "RecordID", "In-hospital_death")
    msg = str(err.value)
    assert "line 1" in msg and "holds numbers, not column names" in msg
    for cell in ("132539", "23", "18"):
        assert cell not in msg.replace(str(path), "")


def test_a_latin1_byte_names_its_line(tmp_path):
    path = tmp_path / "o.csv"
    path.write_bytes("RecordID,In-hospital_death\n1,0\n2,1\n3,0 caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"line 4: is not UTF-8"):
        read_outcomes(path, "RecordID", "In-hospital_death")


@pytest.mark.parametrize("row, problem", [
    ('1,0.5,HR,"80\n', "quote"),
    ("1,0.5,HR," + "9" * 200_000 + "\n", "too long"),
    ('1,0.5,HR,8"0\n', "value is not a number"),
])
def test_malformed_csv_in_a_long_export_names_its_line(tmp_path, row, problem):
    path = tmp_path / "events.csv"
    path.write_text("stay_id,time_hours,variable,value\n1,0.1,HR,80\n" + row)
    with pytest.raises(DataError) as err:
        read_long_csv(path, VARIABLES, STATIC, ReadSummary())
    assert "events.csv, line 3" in str(err.value) and problem in str(err.value)
    assert "9999" not in str(err.value) and "80" not in str(err.value).replace(str(path), "")


def test_a_label_that_is_no_class_names_the_files_column_and_the_classes(tmp_path, physionet_files):
    """A 2 in a binary export's 'label' column: the error names that column (not the task's
    'In-hospital_death') and what each class index means, and suggests task.bins only for
    a continuous (fractional) outcome."""
    stays = tmp_path / "stays"
    ids = _stays(stays, physionet_files[0], 6)
    for value, bins in (("2", False), ("0.5", True)):
        labels = tmp_path / "labels.csv"
        labels.write_text("stay_id,label\n" + "".join(f"{i},{value if k == 3 else k % 2}\n" for k, i in enumerate(ids)))
        cfg = load_config(DEFAULT_CONFIG, ["data.cache=false", f"data.path={stays}", f"data.outcomes={labels}"])
        with pytest.raises(DataError) as raised:
            load_dataset(cfg)
        message = str(raised.value)
        assert f"{labels}, column 'label': 1 label(s) are not a class index (0 = survived, 1 = died; first: stay " in message
        # no patient value in the message (the file's path is the test's own, and may hold any digit: pytest-215)
        assert ("task.bins" in message) == bins and value not in message.split("first: stay")[0].replace(str(labels), "")


def test_an_outcomes_header_without_its_columns_names_the_export_alternative(tmp_path):
    bad = _outcomes(tmp_path / "o.csv", [("1", 0)], header="id,outcome")
    with pytest.raises(DataError, match=r"line 1: header lacks column\(s\) 'RecordID', 'In-hospital_death' \(or "
                                        r"'stay_id' and 'label', as a long export's labels file names them\)"):
        read_outcomes(bad, "RecordID", "In-hospital_death")


def test_a_missing_data_path_given_on_the_command_line_is_not_told_to_use_set(tmp_path, bundle):
    """predict has no --set: a --data that does not exist is simply not found."""
    missing = tmp_path / "set-b.tar.gz"
    proc = _fedgru("predict", "--model", str(bundle), "--data", str(missing), "--out", str(tmp_path / "x.csv"))
    assert proc.returncode == 2 and f"{missing}: data not found" in proc.stderr and "--set" not in proc.stderr


def test_a_labels_file_with_stay_id_and_label_is_read_as_documented(tmp_path, physionet_files, bundle):
    stays = tmp_path / "stays"
    ids = _stays(stays, physionet_files[0], 20)
    labels = tmp_path / "labels.csv"
    labels.write_text("stay_id,label\n" + "".join(f"{i},{k % 2}\n" for k, i in enumerate(ids)))
    assert len(read_outcomes(labels, "RecordID", "In-hospital_death")) == 20
    proc = _fedgru("evaluate", "--model", str(bundle), "--data", str(stays), "--outcomes", str(labels), "--json")
    assert proc.returncode == 0, proc.stderr
    proc = _fedgru("hospital", "init", "--out", str(tmp_path / "h"), "--name", "h", "--data", str(stays),
                   "--outcomes", str(labels), "--max-epsilon", "1")
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------------------------------
# Randomly damaged files: a valid dataset, or a DataError with file and line, never more
# ---------------------------------------------------------------------------------------

VALUES = ["187.654321", "63.918273", "7.364519", "142.807265", "36.481937", "0.918364"]
STAY = ("Time,Parameter,Value\n00:00,RecordID,4242\n00:00,Age,71.482913\n00:00,Gender,1\n00:00,ICUType,3\n"
        + "".join(f"0{h}:{m}0,{p},{v}\n" for h, (m, p, v) in enumerate(zip("12345", ["HR", "MAP", "pH", "Na", "Temp"], VALUES))))
LONG = ("stay_id,time_hours,variable,value\n" + "4242,0,Age,71.482913\n"
        + "".join(f"4242,{h}.5,{p},{v}\n" for h, (p, v) in enumerate(zip(["HR", "MAP", "pH", "Na", "Temp", "K"], VALUES))))
OUTCOMES = "RecordID,SAPS-I,SOFA,Length_of_stay,Survival,In-hospital_death\n4242,17.482913,6,11,-1,1\n"
SECRETS = VALUES + ["71.482913", "17.482913"]

damage = st.lists(
    st.one_of(
        st.tuples(st.just("byte"), st.integers(0, 10_000), st.integers(0, 255)),
        st.tuples(st.just("delete"), st.integers(0, 10_000), st.integers(1, 40)),
        st.tuples(st.just("insert"), st.integers(0, 10_000), st.sampled_from(
            ['"', ",", "\n", "nan", "inf", "-1", "\x00", "\r", " ", "99:99", "x" * 140_000, "\xff\xfe", ",,,,"])),
        st.tuples(st.just("truncate"), st.integers(0, 10_000), st.just(0)),
        st.tuples(st.just("duplicate line"), st.integers(0, 20), st.just(0)),
    ),
    min_size=1, max_size=4,
)


def _damaged(text: str, ops) -> bytes:
    data = bytearray(text.encode())
    for op, at, arg in ops:
        at = at % (len(data) + 1)
        if op == "byte" and data:
            data[at % len(data)] = arg
        elif op == "delete":
            del data[at:at + arg]
        elif op == "insert":
            data[at:at] = arg.encode("latin-1") if arg == "\xff\xfe" else arg.encode()
        elif op == "truncate":
            del data[at:]
        elif op == "duplicate line":
            lines = bytes(data).split(b"\n")
            lines.insert(at % len(lines), lines[at % len(lines)])
            data = bytearray(b"\n".join(lines))
    return bytes(data)


def _clean_error(exc: DataError, path: Path) -> None:
    msg = str(exc)
    assert str(path) in msg and exc.line is not None, msg  # names the file and the line
    rest = msg.replace(str(path), "")
    assert not any(secret in rest for secret in SECRETS), msg  # never a patient's value


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=damage, kind=st.sampled_from(["physionet", "long_csv", "outcomes"]))
def test_randomly_damaged_files_give_a_dataset_or_a_clean_error(tmp_path, ops, kind):
    raw = _damaged({"physionet": STAY, "long_csv": LONG, "outcomes": OUTCOMES}[kind], ops)
    path = tmp_path / {"physionet": "4242.txt", "long_csv": "events.csv", "outcomes": "outcomes.csv"}[kind]
    path.write_bytes(raw)
    summary = ReadSummary()
    try:
        if kind == "physionet":
            stays = [parse_stay(str(path), "4242", raw, {n: i for i, n in enumerate(VARIABLES)}, summary)]
        elif kind == "long_csv":
            stays = read_long_csv(path, VARIABLES, STATIC, summary)
        else:
            labels = read_outcomes(path, "RecordID", "In-hospital_death")
            assert all(isinstance(k, str) and isinstance(v, float) for k, v in labels.items())
            return
    except DataError as exc:
        _clean_error(exc, path)
        return
    X, S = to_tensors(stays, CFG.features)  # what was read is usable
    assert np.isfinite(X).all() and np.isfinite(S).all()
