"""Readers on the real PhysioNet files and on generated bad input."""

import tarfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.data.long_csv import read_long_csv, read_outcomes
from common.data.physionet import read_physionet
from common.data.records import DataError, ReadSummary
from tests.conftest import extract


def _var_names(cfg):
    return [v.name for v in cfg.features.variables]


def test_real_set_a_counts(full_dataset):
    assert full_dataset.summary.stays_read == 4000
    assert len(full_dataset) == 4000
    assert int(full_dataset.y.sum()) == 554
    assert full_dataset.summary.class_counts == {"survived": 3446, "died": 554}
    # ICU types as PhysioNet documents them
    icu = full_dataset.groups["ICUType"]
    assert [int((icu == k).sum()) for k in (1, 2, 3, 4)] == [577, 874, 1481, 1068]


def test_descriptors_and_minus_one(default_cfg, physionet_files, tmp_path):
    set_a, _ = physionet_files
    with tarfile.open(set_a) as tar:
        member = tar.getmember("set-a/132539.txt")
        extract(tar, member, tmp_path)
    summary = ReadSummary()
    (stay,) = read_physionet(tmp_path / "set-a", _var_names(default_cfg), summary)
    # The file opens with: Age 54, Gender 0, Height -1, ICUType 4, Weight -1
    assert stay.stay_id == "132539"
    assert stay.static == {"Age": 54.0, "Gender": 0.0, "Height": -1.0, "ICUType": 4.0, "Weight": -1.0}
    assert "RecordID" not in _var_names(default_cfg)
    # -1 descriptors become "unknown", not values
    from common.data.preprocess import PreprocessSummary, static_names, static_tensor

    pre = PreprocessSummary()
    S = static_tensor([stay], default_cfg.features.static, pre)
    names = static_names(default_cfg.features)
    row = dict(zip(names, S[0]))
    assert row["Height"] == 0.0 and row["Height:unknown"] == 1.0
    assert row["Weight"] == 0.0 and row["Weight:unknown"] == 1.0
    assert row["Age:unknown"] == 0.0 and row["Age"] == pytest.approx((54 - 65) / 17)
    assert row["ICUType=4"] == 1.0 and row["ICUType=1"] == 0.0
    assert row["Gender=0"] == 1.0 and row["Gender=1"] == 0.0
    # observations: first HR at 00:07 is 73
    hr = _var_names(default_cfg).index("HR")
    first = np.flatnonzero(stay.var == hr)[0]
    assert stay.time[first] == pytest.approx(7 / 60) and stay.value[first] == 73


def test_folder_and_archive_give_the_same_stays(default_cfg, physionet_files, tmp_path):
    set_a, _ = physionet_files
    names = [f"set-a/{rid}.txt" for rid in (132539, 132540, 132541, 132543)]
    with tarfile.open(set_a) as tar:
        for n in names:
            extract(tar, tar.getmember(n), tmp_path / "folder")
    archive = tmp_path / "small.tar.gz"
    with tarfile.open(archive, "w:gz") as out:
        for n in reversed(names):  # archive order must not matter
            out.add(tmp_path / "folder" / n, arcname=n)
    a = read_physionet(tmp_path / "folder" / "set-a", _var_names(default_cfg), ReadSummary())
    b = sorted(read_physionet(archive, _var_names(default_cfg), ReadSummary()), key=lambda s: s.stay_id)
    assert [s.stay_id for s in a] == [s.stay_id for s in b]
    for x, y in zip(a, b):
        assert x.static == y.static
        np.testing.assert_array_equal(x.value, y.value)


def _write_stay(folder, name, lines):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.txt").write_text("\n".join(lines) + "\n")


HEADER = ["Time,Parameter,Value", "00:00,RecordID,1", "00:00,Age,70", "00:00,Gender,1",
          "00:00,Height,-1", "00:00,ICUType,3", "00:00,Weight,80"]


@pytest.mark.parametrize(
    "bad_line, line_no, column",
    [("01:xx,HR,88", 8, "Time"), ("01:00,HR,eighty-eight", 8, "Value"), ("01:00,HR", 8, None), ("01:00,,88", 8, "Parameter")],
    ids=["time", "value", "fields", "parameter"],
)
def test_bad_lines_name_file_line_and_column_but_no_value(default_cfg, tmp_path, bad_line, line_no, column):
    _write_stay(tmp_path / "d", "1", HEADER + [bad_line])
    with pytest.raises(DataError) as err:
        read_physionet(tmp_path / "d", _var_names(default_cfg), ReadSummary())
    msg = str(err.value)
    assert "1.txt" in msg and f"line {line_no}" in msg
    if column:
        assert f"column '{column}'" in msg
    said = msg.replace(str(tmp_path), "<tmp>")  # pytest's folder name can hold the digits (pytest-188)
    for value in ("eighty-eight", "88", "01:xx"):
        assert value not in said


def test_empty_file_missing_path_and_unknown_format(default_cfg, tmp_path):
    _write_stay(tmp_path / "e", "7", [])
    (tmp_path / "e" / "7.txt").write_text("")
    with pytest.raises(DataError, match="7.txt.*empty"):
        read_physionet(tmp_path / "e", _var_names(default_cfg), ReadSummary())
    with pytest.raises(DataError, match="no such file"):
        read_physionet(tmp_path / "missing.tar.gz", _var_names(default_cfg), ReadSummary())
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00\x01 not an archive")
    with pytest.raises(DataError, match="unknown format"):
        read_physionet(junk, _var_names(default_cfg), ReadSummary())


def test_stay_with_descriptors_only_is_kept_and_counted(default_cfg, tmp_path):
    _write_stay(tmp_path / "f", "1", HEADER)
    summary = ReadSummary()
    (stay,) = read_physionet(tmp_path / "f", _var_names(default_cfg), summary)
    assert stay.time.size == 0 and summary.stays_without_observations == 1


def test_outcomes_reader_and_errors(physionet_files, tmp_path):
    _, outcomes = physionet_files
    labels = read_outcomes(outcomes, "RecordID", "In-hospital_death")
    assert len(labels) == 4000 and sum(labels.values()) == 554
    bad = tmp_path / "labels.csv"
    bad.write_text("stay_id,label\n1,0\n2,maybe\n")
    with pytest.raises(DataError) as err:
        read_outcomes(bad, "stay_id", "label")
    assert "line 3" in str(err.value) and "maybe" not in str(err.value)
    with pytest.raises(DataError, match="lacks column\(s\) 'label'"):
        read_outcomes(outcomes, "RecordID", "label")


def test_long_csv_matches_physionet_reader(default_cfg, physionet_files, tmp_path):
    """The same stays exported in the generic long format give identical tensors."""
    from common.data.preprocess import to_tensors

    set_a, _ = physionet_files
    ids = (132539, 132540, 132541)
    with tarfile.open(set_a) as tar:
        for rid in ids:
            extract(tar, tar.getmember(f"set-a/{rid}.txt"), tmp_path)
    stays = read_physionet(tmp_path / "set-a", _var_names(default_cfg), ReadSummary())
    rows = ["stay_id,time_hours,variable,value"]
    for s in stays:
        for name, v in s.static.items():
            rows.append(f"{s.stay_id},0,{name},{v}")
        for t, k, v in zip(s.time, s.var, s.value):
            rows.append(f"{s.stay_id},{float(t)!r},{default_cfg.features.variables[k].name},{float(v)!r}")
    csv_path = tmp_path / "events.csv"
    csv_path.write_text("\n".join(rows) + "\n")
    static_names = [x.name for x in default_cfg.features.static]
    long = read_long_csv(csv_path, _var_names(default_cfg), static_names, ReadSummary())
    X1, S1 = to_tensors(stays, default_cfg.features)
    X2, S2 = to_tensors(long, default_cfg.features)
    np.testing.assert_allclose(X1, X2, atol=1e-6)
    np.testing.assert_allclose(S1, S2, atol=1e-6)


def test_long_csv_errors_name_line_and_column(default_cfg, tmp_path):
    path = tmp_path / "events.csv"
    path.write_text("stay_id,time_hours,variable,value\n1,0.5,HR,80\n1,abc,HR,81\n")
    with pytest.raises(DataError) as err:
        read_long_csv(path, _var_names(default_cfg), [], ReadSummary())
    assert "events.csv, line 3, column 'time_hours'" in str(err.value)
    path.write_text("id,t,var,val\n")
    with pytest.raises(DataError, match="header lacks"):
        read_long_csv(path, _var_names(default_cfg), [], ReadSummary())


# ---------------------------------------------------------------------------------------
# The PhysioNet reader's per-line loop is written for speed (44 million lines at 100,000
# stays); this is the straightforward version it replaced, kept as the reference it must
# equal: the same stays, the same summary, the same error at the same line and column.
# ---------------------------------------------------------------------------------------


def _reference_parse_stay(source, record_name, raw, var_index, summary):
    from common.data.physionet import DESCRIPTORS, HEADER, LAST_TIME_HOURS, parse_time
    from common.data.records import StayBuilder, decode_lines, parse_number

    lines = decode_lines(raw, source)
    if not lines or not lines[0].strip():
        raise DataError(source, "is empty: a stay file needs the header and descriptor lines", line=1)
    if lines[0].strip() != HEADER:
        raise DataError(source, f"first line must be the header '{HEADER}'", line=1)
    stay = StayBuilder(var_index, summary)
    record_id, record_line = None, 0
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        parts = line.split(",")
        if len(parts) != 3:
            raise DataError(source, f"expected 3 fields (Time,Parameter,Value), found {len(parts)}", line=lineno)
        t_text, name, v_text = (p.strip() for p in parts)
        try:
            t = parse_time(t_text)
        except ValueError:
            raise DataError(source, "time is not HH:MM", line=lineno, column="Time") from None
        if t > LAST_TIME_HOURS:
            raise DataError(source, "time is after 48:00, the end of a PhysioNet 2012 record (export longer stays "
                                    "in the long CSV format)", line=lineno, column="Time")
        if not name:
            raise DataError(source, "parameter name is empty", line=lineno, column="Parameter")
        try:
            v = parse_number(v_text)
        except ValueError:
            raise DataError(source, "value is not a number", line=lineno, column="Value") from None
        if t == 0.0 and name == "RecordID":
            if record_id is None:
                record_id, record_line = v_text, lineno
            continue
        if t == 0.0 and name in DESCRIPTORS and name not in stay.static:
            stay.descriptor(name, v)
            continue
        stay.observation(name, t, v)
    summary.lines += len(lines) - 1
    summary.files += 1
    if record_id is not None and record_id != record_name:
        try:
            same = float(record_id) == float(record_name)
        except ValueError:
            same = False
        if not same:
            raise DataError(source, "RecordID does not match the file name", line=record_line, column="Value")
    return stay.build(record_name)


def _parse_both(raw: bytes, var_index: dict):
    """Each parser's (stay or error text, summary) for one file."""
    from common.data.physionet import parse_stay

    out = []
    for parse in (parse_stay, _reference_parse_stay):
        summary = ReadSummary()
        try:
            result = parse("7.txt", "7", raw, var_index, summary)
        except DataError as exc:
            result = str(exc)
        out.append((result, summary))
    return out


def _same_stay(a, b) -> None:
    assert a.stay_id == b.stay_id and a.static == b.static
    for field in ("time", "var", "value"):
        x, y = getattr(a, field), getattr(b, field)
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


def test_the_fast_physionet_loop_reads_set_a_exactly_as_the_reference(default_cfg, physionet_files):
    from common.data.physionet import iter_stay_files, parse_stay

    var_index = {n: i for i, n in enumerate(_var_names(default_cfg))}
    fast, reference = ReadSummary(), ReadSummary()
    for source, name, raw in iter_stay_files(physionet_files[0]):
        _same_stay(parse_stay(source, name, raw, var_index, fast), _reference_parse_stay(source, name, raw, var_index, reference))
    assert fast == reference and fast.files == 4000


ODD_LINES = ["00:00,RecordID,7", "00:00,RecordID,8", "00:00,Age,70", "00:00,Weight,-1", "00:00,Weight,81",
             "00:00,HR,60", "01:30,HR,88", "01:30, HR , 88 ", "01:30,HR,nan", "02:00,Temp,inf", "03:00,Foo,1",
             "48:00,HR,70", "48:01,HR,70", "1:5,HR,1", "01:60,HR,1", "01:xx,HR,1", "01:00,,1", "01:00,HR,x",
             "01:00,HR", "01:00,HR,1,2", "", "   ", "\t", "05:00,GCS,15", "7:00,MechVent,1", "00:00,ICUType,2"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(ODD_LINES), max_size=12))
def test_the_fast_physionet_loop_equals_the_reference_on_odd_lines(default_cfg, lines):
    raw = ("\n".join(["Time,Parameter,Value", *lines]) + "\n").encode()
    var_index = {n: i for i, n in enumerate(_var_names(default_cfg))}
    (fast, fast_summary), (ref, ref_summary) = _parse_both(raw, var_index)
    if isinstance(ref, str):
        assert fast == ref
    else:
        _same_stay(fast, ref)
    assert fast_summary == ref_summary


# A long-format export is read a chunk at a time (records.stream_lines) and must give
# exactly the lines reading it whole gives: every kind of line break splitlines knows, a
# CR LF pair at a chunk's edge, a byte-order mark, multi-byte characters, and a byte that is
# not UTF-8 named at the same line.
_PIECES = st.sampled_from(["a", "1,2.5,HR,80", "é", "€", "\n", "\r\n", "\r", "\x0b", "\x1c", "\x85", "\u2028", ",", "\"", ""])


@settings(max_examples=200, deadline=None)
@given(pieces=st.lists(_PIECES, max_size=40), bom=st.booleans(), chunk=st.integers(1, 9))
def test_streamed_lines_are_the_lines_of_the_whole_file(tmp_path_factory, pieces, bom, chunk):
    from common.data.records import decode_lines, stream_lines

    raw = (b"\xef\xbb\xbf" if bom else b"") + "".join(pieces).encode()
    path = tmp_path_factory.mktemp("lines") / "events.csv"
    path.write_bytes(raw)
    assert list(stream_lines(path, "events.csv", chunk_bytes=chunk)) == decode_lines(raw, "events.csv")


@settings(max_examples=100, deadline=None)
@given(pieces=st.lists(_PIECES, min_size=1, max_size=30), at=st.integers(0, 30), chunk=st.integers(1, 9))
def test_a_byte_that_is_not_utf8_is_named_at_the_same_line_when_streamed(tmp_path_factory, pieces, at, chunk):
    from common.data.records import decode_lines, stream_lines

    text = "".join(pieces).encode()
    raw = text[: at] + b"\xff" + text[at:]
    path = tmp_path_factory.mktemp("bad") / "events.csv"
    path.write_bytes(raw)
    with pytest.raises(DataError) as whole:
        decode_lines(raw, "events.csv")
    with pytest.raises(DataError) as streamed:
        list(stream_lines(path, "events.csv", chunk_bytes=chunk))
    assert str(streamed.value) == str(whole.value)


# The long-format reader's per-line loop is also written for speed (the current stay kept
# across its rows, float() called directly); this is the straightforward loop it replaced.


def _reference_read_long_csv(path, variables, static_names, summary):
    import math

    from common.data.long_csv import EVENT_COLUMNS, _header, _missing_columns, _read_lines
    from common.data.records import StayBuilder, csv_rows, natural_key, parse_number

    var_index = {name: i for i, name in enumerate(variables)}
    statics = set(static_names)
    rows = csv_rows(_read_lines(path, "events file"), str(path))
    header = _header(rows, path, "events file")
    if any(c not in header for c in EVENT_COLUMNS):
        raise _missing_columns(path, header, list(EVENT_COLUMNS))
    col = {name: header.index(name) for name in EVENT_COLUMNS}
    width = len(header)
    per_stay = {}
    for lineno, row in rows:
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != width:
            raise DataError(str(path), f"expected {width} fields, found {len(row)}", line=lineno)
        stay_id = row[col["stay_id"]].strip()
        if not stay_id:
            raise DataError(str(path), "stay id is empty", line=lineno, column="stay_id")
        name = row[col["variable"]].strip()
        if not name:
            raise DataError(str(path), "variable name is empty", line=lineno, column="variable")
        try:
            t = parse_number(row[col["time_hours"]])
        except ValueError:
            raise DataError(str(path), "time is not a number", line=lineno, column="time_hours") from None
        if not math.isfinite(t) or t < 0:
            raise DataError(str(path), "time must be a finite number of hours >= 0", line=lineno, column="time_hours")
        try:
            v = parse_number(row[col["value"]])
        except ValueError:
            raise DataError(str(path), "value is not a number", line=lineno, column="value") from None
        stay = per_stay.setdefault(stay_id, StayBuilder(var_index, summary))
        summary.lines += 1
        if name in statics and name not in stay.static:
            stay.descriptor(name, v)
        else:
            stay.observation(name, t, v)
    summary.files += 1
    if not per_stay:
        raise DataError(str(path), "holds no observations after its header", line=2)
    return [per_stay[stay_id].build(stay_id) for stay_id in sorted(per_stay, key=natural_key)]


ODD_EVENTS = ["1,0,Age,70", "1,0,Age,71", "1,0.5,HR,80", "1, 1.5 , HR , 82 ", "2,0,HR,90", "2,3,Temp,inf", "2,4,HR,nan",
              "10,1,Foo,3", "2,1e1,GCS,15", "1,-0,HR,70", "1,-1,HR,70", "1,nan,HR,70", "1,inf,HR,1", "1,x,HR,1",
              "1,1,HR,x", "1,1,,1", ",1,HR,1", "1,1,HR", "1,1,HR,1,2", ",,,", "", " ", "3,2,Weight,80", "3,0,Weight,81",
              "1,1_0,HR,7", "1,2,HR,\"8\"", "2,5,MechVent,1"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(ODD_EVENTS), max_size=14))
def test_the_fast_long_csv_loop_equals_the_reference_on_odd_and_interleaved_lines(default_cfg, tmp_path_factory, lines):
    path = tmp_path_factory.mktemp("long") / "events.csv"
    path.write_text("\n".join(["stay_id,time_hours,variable,value", *lines]) + "\n")
    statics = [x.name for x in default_cfg.features.static]
    results = []
    for read in (read_long_csv, _reference_read_long_csv):
        summary = ReadSummary()
        try:
            results.append((read(path, _var_names(default_cfg), statics, summary), summary))
        except DataError as exc:
            results.append((str(exc), None))  # an error ends the read: only its message is compared
    (fast, fast_summary), (ref, ref_summary) = results
    if isinstance(ref, str):
        assert fast == ref
    else:
        assert len(fast) == len(ref)
        for a, b in zip(fast, ref):
            _same_stay(a, b)
        assert fast_summary == ref_summary


def test_a_cached_dataset_names_the_path_this_run_read_not_the_one_that_filled_the_cache(hospital_data, tmp_path,
                                                                                       monkeypatch):
    """Two checkouts read the same files by two paths and share one cache entry: a new
    user's partition.json named the other checkout's path."""
    import shutil

    from common.config import load_config
    from common.data.dataset import load_dataset

    monkeypatch.setenv("FEDGRU_CACHE", str(tmp_path / "cache"))
    folder, outcomes = hospital_data
    first, second = tmp_path / "one" / "set-a", tmp_path / "two" / "set-a"
    for copy in (first, second):
        shutil.copytree(folder, copy)
    for path in (first, second):
        cfg = load_config(None, [f"data.path={path}", f"data.outcomes={outcomes}", "data.max_stays=0"])
        ds = load_dataset(cfg)
        assert ds.summary.data == str(path), (ds.summary.data, path)
    assert len(list((tmp_path / "cache").glob("dataset-*.npz"))) == 1  # one entry, both reads
