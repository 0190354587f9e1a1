"""Bedside use: the risk after each hour, contributions per variable, per-group metrics,
and the explain / monitor / predict --hourly commands on real PhysioNet stays."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score

from common.config import load_config
from common.explain import describe, exact_contributions, explain, format_value, integrated_gradients, is_exact
from common.metrics import ScoreGrid
from common.model import GRUClassifier, batch_loss, model_spec
from common.subgroups import SubgroupSummary, exact_results, groupings
from tests.conftest import DEFAULT_CONFIG, small_spec


def _model(architecture: str, pool: str = "last", input_skip: bool = False, head_hidden: int = 0, seed: int = 0):
    """A default-config model with random (not zero) weights, so every part contributes."""
    cfg = load_config(DEFAULT_CONFIG, [f"model.architecture={architecture}", "model.gru_hidden=[3]",
                                       f"model.head_hidden={head_hidden}", f"model.pool={pool}",
                                       f"model.input_skip={str(input_skip).lower()}", "model.zero_init_head=false",
                                       "model.init=random", "model.train_gru=true"])
    torch.manual_seed(seed)
    model = GRUClassifier(model_spec(cfg), "torch" if architecture == "stacked" else "fast").eval()
    return cfg, model


def _stays(cfg, dataset, n=6):
    return (torch.as_tensor(dataset.X[:n], dtype=torch.float32), torch.as_tensor(dataset.S[:n], dtype=torch.float32))


@pytest.mark.parametrize("pool, input_skip", [("last", False), ("last_mean", True), ("mean", False)])
def test_exact_contributions_add_up_to_the_logit(full_dataset, pool, input_skip):
    cfg, model = _model("per_variable", pool, input_skip)
    assert is_exact(model)
    x, s = _stays(cfg, full_dataset)
    parts, bias = exact_contributions(model, x, s, cfg.features)
    assert parts.shape == (6, len(cfg.features.variables) + len(cfg.features.static))
    with torch.no_grad():
        logits = model(x, s)[:, 0]
    torch.testing.assert_close(parts.sum(1) + bias, logits, atol=1e-5, rtol=0)
    hourly, _ = exact_contributions(model, x, s, cfg.features, hourly=True)
    with torch.no_grad():
        torch.testing.assert_close(hourly.sum(-1) + bias, model.hourly_logits(x, s)[..., 0], atol=1e-5, rtol=0)


def test_integrated_gradients_are_complete_for_the_stacked_model(full_dataset):
    """Completeness (Sundararajan et al. 2017): the attributions sum to the logit minus
    the reference's logit, up to the integral's discretisation error."""
    cfg, model = _model("stacked", head_hidden=8)
    assert not is_exact(model)
    x, s = _stays(cfg, full_dataset, 4)
    parts, reference = integrated_gradients(model, x, s, cfg.features, steps=128)
    with torch.no_grad():
        logits = model(x, s)[:, 0]
    gap = (parts.sum(1) + reference - logits).abs()
    assert float(gap.max()) < 0.01 * max(1.0, float((logits - reference).abs().max()))
    e = explain(model, full_dataset.X[0], full_dataset.S[0], cfg.features, "s0")
    assert e.method.startswith("integrated gradients")
    assert math.isclose(sum(c.contribution for c in e.contributions) + e.bias, e.logit, abs_tol=1e-5)


@pytest.mark.parametrize("architecture", ["stacked", "per_variable"])
@pytest.mark.parametrize("pool", ["last", "mean", "last_mean"])
def test_the_last_hours_risk_is_the_models_risk(full_dataset, architecture, pool):
    cfg, model = _model(architecture, pool, input_skip=True)
    x, s = _stays(cfg, full_dataset)
    with torch.no_grad():
        torch.testing.assert_close(model.hourly_logits(x, s)[:, -1], model(x, s), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("architecture", ["stacked", "per_variable"])
def test_an_hour_changes_no_earlier_risk(full_dataset, architecture):
    """A bedside monitor may only use what was observed so far: changing hour t moves the
    risk at t and later, never before."""
    cfg, model = _model(architecture, "last_mean", input_skip=True)
    x, s = _stays(cfg, full_dataset, 3)
    t = 20
    changed = x.clone()
    changed[:, t] += 3.0
    with torch.no_grad():
        before, after = model.hourly_logits(x, s)[..., 0], model.hourly_logits(changed, s)[..., 0]
    torch.testing.assert_close(before[:, :t], after[:, :t], atol=0, rtol=0)
    assert bool((before[:, t] != after[:, t]).all())


def test_explanations_speak_in_clinical_units(full_dataset):
    cfg, model = _model("per_variable")
    i = 0
    e = explain(model, full_dataset.X[i], full_dataset.S[i], cfg.features, str(full_dataset.stay_ids[i]))
    assert e.method.startswith("exact")
    assert math.isclose(sum(c.contribution for c in e.contributions) + e.bias, e.logit, abs_tol=1e-5)
    assert abs(e.risk - 1 / (1 + math.exp(-e.logit))) < 1e-12
    assert [abs(c.contribution) for c in e.contributions] == sorted((abs(c.contribution) for c in e.contributions),
                                                                  reverse=True)
    age = next(c for c in e.contributions if c.name == "Age")
    assert age.value == pytest.approx(full_dataset.groups["Age"][i], abs=1e-6)  # years again, not normalised
    hr = next(c for c in e.contributions if c.name == "HR")
    assert hr.unit == "bpm" and (hr.value is None or 20 <= hr.value <= 300)


def test_hourly_loss_keeps_per_example_gradients_exact():
    """With the loss on every hour's risk, Opacus's per-example gradients (FastDPGRU's
    sampler and the head's, which now reads (B, T, F)) still equal each example's own
    loss gradient: what DP-SGD clips is one patient's whole contribution."""
    from opacus import GradSampleModule

    torch.manual_seed(1)
    spec = small_spec(architecture="per_variable", n_variables=2, gru_hidden=[3], pool="last_mean")
    model = GRUClassifier(spec, "fast")
    x, s, y = torch.randn(5, 7, 6), torch.randn(5, 3), torch.randint(0, 2, (5,))
    reference = {}
    for i in range(5):
        model.zero_grad()
        batch_loss(model, x[i : i + 1], s[i : i + 1], y[i : i + 1], 2.0, hourly=True).backward()
        for name, p in model.named_parameters():
            reference.setdefault(name, []).append(p.grad.clone())
    model.zero_grad()
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    batch_loss(model, x, s, y, 2.0, hourly=True).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad_sample, torch.stack(reference[name]), atol=1e-6, rtol=1e-4)
    gsm._close()


def test_subgroup_metrics_match_scikit_learn_on_exact_scores(full_dataset, default_cfg):
    """Per-group AUROC from the (noise-free) histograms equals scikit-learn's on the same
    scores up to the bins' width, and the exact per-group results equal it exactly."""
    from common.subgroups import assign

    rng = np.random.default_rng(0)
    y = full_dataset.y
    risk = 1 / (1 + np.exp(-(rng.normal(size=len(y)) + 1.5 * y - 2)))
    probs = np.stack([1 - risk, risk], axis=1)
    summary = SubgroupSummary.from_predictions(default_cfg, y, probs, full_dataset.groups, ScoreGrid(-8.0, 8.0, 400))
    exact = iter(exact_results(default_cfg, y, probs, full_dataset.groups, 0.5))
    statics = {s.name: s for s in default_cfg.features.static}
    row, compared = 0, 0
    for spec, grouping in zip(default_cfg.evaluation.subgroups, groupings(default_cfg)):
        index = assign(spec, statics[spec.column], full_dataset.groups[spec.column])
        for k, name in enumerate(grouping.groups):
            result, counts = next(exact), summary.group(row)
            row += 1
            member = index == k
            assert (result.group, result.patients, result.deaths) == (name, member.sum(), y[member].sum())
            assert counts.histogram.sum() == member.sum()
            if 0 < y[member].sum() < member.sum():
                want = roc_auc_score(y[member], risk[member])
                assert result.metrics.auroc == pytest.approx(want, abs=1e-12)
                assert counts.metrics().auroc == pytest.approx(want, abs=0.01)
                compared += 1
    assert row == len(summary.histogram) and compared >= 8


@settings(max_examples=30, deadline=None)
@given(st.integers(min_value=0, max_value=199))
def test_one_patient_moves_one_count_per_grouping(full_dataset, default_cfg, leave_out):
    """The subgroup release's sensitivity: removing any one patient changes the
    histograms by exactly sqrt(groupings) in L2 (one count in each grouping)."""
    n = 200
    y, groups = full_dataset.y[:n], {k: v[:n] for k, v in full_dataset.groups.items()}
    probs = np.stack([np.full(n, 0.8), np.full(n, 0.2)], axis=1)
    grid = ScoreGrid(-8.0, 8.0, 40)
    full = SubgroupSummary.from_predictions(default_cfg, y, probs, groups, grid)
    keep = np.arange(n) != leave_out
    less = SubgroupSummary.from_predictions(default_cfg, y[keep], probs[keep], {k: v[keep] for k, v in groups.items()}, grid)
    assert np.linalg.norm(full.histogram - less.histogram) == pytest.approx(full.sensitivity)
    assert full.sensitivity == pytest.approx(math.sqrt(len(default_cfg.evaluation.subgroups)))


# -- the commands, on a bundle and real stays ------------------------------------------------


@pytest.fixture(scope="module")
def bundle_and_stays(tmp_path_factory, hospital_data):
    from common.bundle import save_bundle

    cfg, model = _model("per_variable", "last_mean", input_skip=True, seed=3)
    path = tmp_path_factory.mktemp("bundle") / "model.pt"
    save_bundle(path, model.state_dict(), model.spec, cfg, {"threshold": 0.3})
    folder, outcomes = hospital_data
    stays = sorted(p.stem for p in folder.glob("*.txt"))[:2]
    return path, folder, outcomes, stays


def test_explain_command_prints_text_and_json(bundle_and_stays, capsys):
    """Text for a reader; with --json, only JSON (one object per stay), for a program."""
    from fedgru.cli import main

    path, folder, _, stays = bundle_and_stays
    assert main(["explain", "--model", str(path), "--data", str(folder), "--stay", stays[0], "--top", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"stay {stays[0]}: risk ") and "exact" in lines[0]
    assert len(lines) == 1 + 3 + 1
    assert main(["explain", "--model", str(path), "--data", str(folder), "--stay", stays[0], "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["stay_id"] == stays[0]
    total = sum(c["contribution"] for c in record["contributions"]) + record["bias"]
    assert total == pytest.approx(record["logit"], abs=1e-5)


def test_the_note_on_unread_variables_does_not_disown_a_descriptor_the_model_reads(bundle_and_stays, capsys):
    """PhysioNet charts Weight at admission (a descriptor the model reads) and again later
    (a series it does not): the note named Weight among those that "play no part" while
    explain printed its contribution."""
    from fedgru.cli import main

    path, folder, _, stays = bundle_and_stays
    assert main(["explain", "--model", str(path), "--data", str(folder), "--stay", stays[0]]) == 0
    note = next(line for line in capsys.readouterr().err.splitlines() if "charted variables" in line)
    no_part = note.split("play no part in its risks: ")[1].split(";")[0].split(", ")
    assert "Lactate" in no_part and "Weight" not in no_part
    assert "admission descriptors: Age, Gender, Height, ICUType, Weight" in note
    assert "Weight is read at admission only: the values charted later play no part" in note


def test_explain_names_a_missing_stay(bundle_and_stays, capsys):
    from fedgru.cli import main

    path, folder, _, _ = bundle_and_stays
    assert main(["explain", "--model", str(path), "--data", str(folder), "--stay", "999999"]) == 2
    assert f"{folder}: holds no stay 999999" in capsys.readouterr().err


def test_monitor_writes_one_html_page_with_the_plot_inside(bundle_and_stays, tmp_path, capsys):
    from fedgru.cli import main

    path, folder, _, stays = bundle_and_stays
    out = tmp_path / "monitor.html"
    assert main(["monitor", "--model", str(path), "--data", str(folder), "--stay", stays[0], "--stay", stays[1],
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"stay {stays[0]}: risk" in text and f"stay {stays[1]}: risk" in text
    page = out.read_text()
    assert page.count("data:image/png;base64,") == 2 and "flag level at that hour 0.300" in page
    assert out.stat().st_mode & 0o777 == 0o600  # patients' risks: the owner's only, as the run folder's files
    # what the risks read, on the page itself (it was on the console only)
    assert "What these risks read" in page and "This model reads" in page and "admission descriptors" in page


def test_the_monitor_says_its_flag_levels_were_read_from_dp_releases_with_their_intervals(
        bundle_and_stays, tmp_path, capsys):
    """The monitor's flag levels are each hour's threshold moved by the margin: DP readings.
    The page and predict --hourly say what the run read, with the intervals it printed,
    so a ward does not copy them as settings (issue 22: every DP number with its
    uncertainty); a bundle without readings says nothing of them."""
    import html

    from common.bundle import Bundle, save_bundle
    from fedgru.cli import main

    path, folder, _, stays = bundle_and_stays
    bundle = Bundle(path)
    info = {"threshold": 0.17, "hour_thresholds": [0.33] * 47 + [0.17], "onset_margin": 0.886,
            "checkpoint_thresholds": {"1": 0.332, "6": 0.206}, "checkpoint_intervals": {"1": [0.242, 0.438]},
            "onset_margin_interval": [0.73, 1.03], "flag_level_intervals": {"1": [0.45, 0.66], "48": [0.30, 0.36]}}
    read = tmp_path / "read.pt"
    save_bundle(read, bundle.model.state_dict(), bundle.model.spec, bundle.config, info)
    out = tmp_path / "monitor.html"
    assert main(["monitor", "--model", str(read), "--data", str(folder), "--stay", stays[0], "--out", str(out)]) == 0
    said = ("The run read its monitor from DP releases: each hour's threshold after hour 1 0.332 (0.242-0.438), "
            "after hour 6 0.206; the margin 0.89 (0.73 to 1.03) in log-odds; so the flag levels (each hour's threshold "
            "moved up by the margin) after hour 1 0.544 (0.450-0.660), after hour 48 0.332 (0.300-0.360) (in brackets, "
            "nominal 99% intervals for "
            "the releases' noise and their reading, not ranges of patients' risks; at the default's settings they held")
    assert said in html.unescape(out.read_text())
    assert main(["predict", "--model", str(read), "--data", str(folder), "--out", str(tmp_path / "h.csv"),
                 "--hourly"]) == 0
    assert "note: the run read its monitor from DP releases: each hour's threshold after hour 1" in capsys.readouterr().err
    # a bundle of a run before the intervals: its margin alone, nothing in brackets to explain
    older = tmp_path / "older.pt"
    save_bundle(older, bundle.model.state_dict(), bundle.model.spec, bundle.config,
                {k: info[k] for k in ("threshold", "hour_thresholds", "onset_margin")})
    assert main(["monitor", "--model", str(older), "--data", str(folder), "--stay", stays[0], "--out", str(out)]) == 0
    page = html.unescape(out.read_text())
    assert "The run read its monitor from DP releases: the margin 0.89 in log-odds." in page and "in brackets" not in page
    # a bundle's text reaches the hospital's page and terminal: only hours and numbers of it are said, and a
    # malformed entry is left out rather than failing the page
    hostile = tmp_path / "hostile.pt"
    save_bundle(hostile, bundle.model.state_dict(), bundle.model.spec, bundle.config,
                {**info, "checkpoint_thresholds": {"1": 0.332, "**9** `x`": 0.5, "\x1b[31m": 0.1, "6": None},
                 "checkpoint_intervals": {"1": [None, 1.0]}, "onset_margin_interval": "wide",
                 "flag_level_intervals": {"**9**": [0.1, 0.2], "1": "x", "99": [0.1, 0.2]}})
    assert main(["monitor", "--model", str(hostile), "--data", str(folder), "--stay", stays[0], "--out", str(out)]) == 0
    page = html.unescape(out.read_text())
    assert "each hour's threshold after hour 1 0.332; the margin 0.89 in log-odds." in page
    assert "<strong>9" not in page and "\x1b" not in page


def test_predict_hourly_ends_at_the_models_risk(bundle_and_stays, tmp_path):
    import csv

    from fedgru.cli import main

    path, folder, _, _ = bundle_and_stays
    hourly, final = tmp_path / "hourly.csv", tmp_path / "final.csv"
    final.write_text("an older file, readable by all\n")
    final.chmod(0o644)
    assert main(["predict", "--model", str(path), "--data", str(folder), "--out", str(hourly), "--hourly"]) == 0
    assert main(["predict", "--model", str(path), "--data", str(folder), "--out", str(final)]) == 0
    # patients' risks: readable by their owner only, an existing file's mode replaced with it
    assert [p.stat().st_mode & 0o777 for p in (hourly, final)] == [0o600, 0o600]
    assert list(tmp_path.glob(".*.tmp")) == []
    rows = list(csv.DictReader(hourly.open()))
    last = {r["stay_id"]: float(r["risk"]) for r in rows if r["hour"] == "48"}
    plain = list(csv.DictReader(final.open()))
    observed = {r["stay_id"]: int(r["hours_observed"]) for r in plain}
    finals = {r["stay_id"]: float(r["risk"]) for r in plain if observed[r["stay_id"]] == 48}
    # a stay's rows end at its last observed hour: no hour after it is made up
    assert len(rows) == sum(observed.values()) and last.keys() == finals.keys()
    assert {r["stay_id"]: int(r["hour"]) for r in rows} == {k: v for k, v in observed.items() if v}
    assert max(abs(last[k] - finals[k]) for k in finals) < 1e-5
    assert all(r["flagged"] == str(int(float(r["risk"]) >= 0.3)) for r in rows)
    # flagged_since: the hour the flag on at that row was raised, a flagged hour whose risk passed its threshold
    by_stay_hour = {(r["stay_id"], int(r["hour"])): r for r in rows}
    for r in rows:
        if r["flagged"] == "0":
            assert r["flagged_since"] == ""
        else:
            since = int(r["flagged_since"])
            assert since <= int(r["hour"]) and all(by_stay_hour[(r["stay_id"], h)]["flagged"] == "1"
                                                    for h in range(since, int(r["hour"]) + 1))
            raised = by_stay_hour[(r["stay_id"], since)]
            assert float(raised["risk"]) >= float(raised["flag_level"])  # both printed to 6 digits
            assert since == 1 or by_stay_hour[(r["stay_id"], since - 1)]["flagged"] == "0"


DESCRIPTORS = {"RecordID", "Age", "Gender", "Height", "ICUType", "Weight"}


def test_a_stay_without_data_gets_no_risk_and_a_cut_stay_no_made_up_hour(bundle_and_stays, tmp_path, capsys):
    """A clinician's try flagged a stay with descriptors alone (risk 0.47 from age and sex),
    and labelled a 6-hour stay 'hour 48' with 42 made-up hourly rows: the first now has no
    risk anywhere, the second's hourly rows and monitor page end at its last observation."""
    import csv

    from client.bedside import jumps, observed_hours
    from common.bundle import Bundle
    from fedgru.cli import main

    path, folder, _, stays = bundle_and_stays
    export = tmp_path / "export"
    export.mkdir()
    empty, cut = stays
    lines = (folder / f"{empty}.txt").read_text().splitlines()
    (export / f"{empty}.txt").write_text("\n".join([lines[0]] + [x for x in lines[1:] if x.startswith("00:00,")
                                                                 and x.split(",")[1] in DESCRIPTORS]) + "\n")
    lines = (folder / f"{cut}.txt").read_text().splitlines()
    (export / f"{cut}.txt").write_text("\n".join([lines[0]] + [x for x in lines[1:] if x < "06:00"]) + "\n")
    plain, hourly = tmp_path / "plain.csv", tmp_path / "hourly.csv"
    assert main(["predict", "--model", str(path), "--data", str(export), "--out", str(plain)]) == 0
    assert "1 stay(s) have no observation in the window" in capsys.readouterr().err
    rows = {r["stay_id"]: r for r in csv.DictReader(plain.open())}
    assert rows[empty] == {"stay_id": empty, "risk": "", "flagged": "", "hours_observed": "0"}
    seen = int(rows[cut]["hours_observed"])
    assert 1 <= seen <= 6 and rows[cut]["risk"] != ""
    assert main(["predict", "--model", str(path), "--data", str(export), "--out", str(hourly), "--hourly"]) == 0
    hours = [int(r["hour"]) for r in csv.DictReader(hourly.open()) if r["stay_id"] == cut]
    assert hours == list(range(1, seen + 1))
    assert not [r for r in csv.DictReader(hourly.open()) if r["stay_id"] == empty]
    assert "1 stay(s) have no observation in the window, only descriptors: they are not scored (no rows" in \
        capsys.readouterr().err  # the note says what the file holds: no row, not a blank risk
    page = tmp_path / "monitor.html"
    assert main(["monitor", "--model", str(path), "--data", str(export), "--stay", empty, "--stay", cut,
                 "--out", str(page)]) == 0
    text = capsys.readouterr().out
    assert f"stay {empty}: no observation in the window, not scored" in text
    assert f"at hour {seen} (its last observation)" in text or seen == 48
    html = page.read_text()
    assert "No observation in the window" in html and html.count("data:image/png;base64,") == 1
    assert main(["explain", "--model", str(path), "--data", str(export), "--stay", empty, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"stay_id": empty, "risk": None,
                                                   "note": "no observation in the window, only descriptors: not scored"}
    # every variable listed behind a jump was observed that hour (it has a value), and moved it
    bundle = Bundle(path)
    ds = bundle.load(export, None, None)
    from client.bedside import MIN_JUMP, MIN_MOVE, hourly_risks

    i = int(np.flatnonzero(ds.stay_ids.astype(str) == cut)[0])
    assert observed_hours(ds, bundle.config.features)[i] == seen
    for jump in jumps(bundle, ds, i, hourly_risks(bundle, ds.subset(np.array([i])))[0][:seen]):
        assert abs(jump.after - jump.before) >= MIN_JUMP
        assert all(value and abs(change) >= MIN_MOVE for _, value, change in jump.movers)


# without either channel a value exactly at its centre normalises to 0 and cannot be told from none
@pytest.mark.parametrize("mask, since, expected", [(True, True, [6, 0]), (False, True, [6, 0]), (False, False, [0, 0])])
def test_a_stays_last_observed_hour_is_read_from_whichever_channels_the_config_has(mask, since, expected):
    """observed_hours: from the observed-mask channels, else from the hours-since-last ones
    (0 where observed); a config with neither carries values forward and cannot tell, so a
    stay with any value counts to the window's end (a review found a 6-hour stay given 48
    hours, and a stay at exactly a centre value given none, by reading values alone)."""
    from client.bedside import observed_hours
    from common.data.dataset import Dataset
    from common.data.preprocess import to_tensors
    from common.data.records import Stay

    cfg = load_config(DEFAULT_CONFIG, [f"features.observed_mask={str(mask).lower()}",
                                       f"features.time_since_last={str(since).lower()}", "model.init=random"])
    hr = next(j for j, v in enumerate(cfg.features.variables) if v.name == "HR")
    centre = cfg.features.variables[hr].center  # normalises to 0: a value alone cannot say it was seen
    stays = [Stay("cut", NORMAL_STATIC, np.asarray([0.5, 5.5], np.float32), np.asarray([hr, hr], np.int16),
                  np.asarray([centre, centre], np.float32)),
             Stay("empty", NORMAL_STATIC, np.zeros(0, np.float32), np.zeros(0, np.int16), np.zeros(0, np.float32))]
    X, S = to_tensors(stays, cfg.features)
    ds = Dataset(np.asarray(["cut", "empty"]), X, S, np.zeros(2, np.int64))
    assert observed_hours(ds, cfg.features).tolist() == expected
    if not (mask or since):  # any other value: counted to the window's end, values carried forward
        X, S = to_tensors([dataclasses.replace(stays[0], value=np.asarray([centre + 20, centre], np.float32))],
                          cfg.features)
        assert observed_hours(Dataset(np.asarray(["cut"]), X, S, np.zeros(1, np.int64)), cfg.features).tolist() == [48]


def test_predict_writes_its_csv_to_stdout_for_a_dash(bundle_and_stays, tmp_path, capsys):
    """--out -: the same CSV on stdout (the message on stderr), no file named '-'."""
    from fedgru.cli import main

    path, folder, _, _ = bundle_and_stays
    final = tmp_path / "final.csv"
    assert main(["predict", "--model", str(path), "--data", str(folder), "--out", str(final)]) == 0
    capsys.readouterr()
    assert main(["predict", "--model", str(path), "--data", str(folder), "--out", "-"]) == 0
    out, err = capsys.readouterr()
    assert out.replace("\r\n", "\n") == final.read_text().replace("\r\n", "\n")
    assert "to stdout" in err and not Path("-").exists()


@pytest.mark.parametrize("command", ["predict", "monitor"])
def test_an_output_path_that_cannot_be_written_is_refused_before_the_data_is_read(bundle_and_stays, tmp_path, capsys,
                                                                                   command):
    """--out naming a folder failed with a traceback after all the scoring; now it is
    refused first, by name (the data path here does not even exist)."""
    from fedgru.cli import main

    path, _, _, stays = bundle_and_stays
    args = [command, "--model", str(path), "--data", str(tmp_path / "absent"), "--out", str(tmp_path)]
    assert main(args + (["--stay", stays[0]] if command == "monitor" else [])) == 2
    out, err = capsys.readouterr()
    assert "--out" in err and "give a file name" in err and "absent" not in err and "Traceback" not in err


def test_exact_results_count_the_last_class_of_a_multi_class_task(default_cfg, full_dataset):
    """A group's "deaths" are its stays of the task's last class: with four classes (the
    length-of-stay config) the labels' sum read 1075 of a group of 692 stays."""
    y = np.arange(len(full_dataset.y)) % 4
    probs = np.full((len(y), 4), 0.25)
    found = exact_results(default_cfg, y, probs, full_dataset.groups, 0.5)
    for grouping in groupings(default_cfg):
        mine = [g for g in found if g.grouping == grouping.name]
        assert sum(g.deaths for g in mine) == (y == 3).sum()
        assert all(g.deaths <= g.patients for g in mine)


def test_evaluate_json_is_one_object_with_the_subgroups_and_intervals(bundle_and_stays, capsys):
    """--json --subgroups printed the text rows and then the bare metrics; now stdout holds
    one JSON object: metrics, their intervals, the threshold and every group."""
    from fedgru.cli import main

    path, folder, outcomes, _ = bundle_and_stays
    args = ["evaluate", "--model", str(path), "--data", str(folder), "--outcomes", str(outcomes)]
    assert main([*args, "--subgroups"]) == 0
    text = capsys.readouterr().out
    assert main([*args, "--subgroups", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"data", "threshold", "metrics", "intervals", "interval", "subgroups",
                           "observed_over_predicted", "patients", "deaths"}
    ratio, low, high = result["observed_over_predicted"]
    # named as each group's ratio is (a group's "calibration" is its reliability curve); counts of stays are whole
    assert all(set(g) >= {"observed_over_predicted", "calibration"} for g in result["subgroups"])
    assert all(type(g[k]) is int for g in result["subgroups"] for k in ("patients", "deaths"))
    assert low <= ratio <= high and f"{ratio:.2f} ({low:.2f}-{high:.2f})" in text
    whole = next(line for line in text.splitlines() if line.startswith("all stays "))
    assert f"  {result['metrics']['auroc']:.3f} ({result['intervals']['auroc'][0]:.3f}-" in whole
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("group "))
    assert lines[header].split()[:3] == ["group", "stays", "died"] and lines[header].endswith("observed/predicted")
    rows = lines[header + 1:header + 2 + len(result["subgroups"])]
    assert len(result["subgroups"]) >= 1 and rows[-1].split()[:4] == ["all", "stays", str(result["patients"]),
                                                                       str(result["deaths"])]
    for row, g in zip(rows, result["subgroups"]):
        assert row.startswith(f"{g['grouping']} {g['group']} "), row
        counts = row[len(f"{g['grouping']} {g['group']}"):].split()[:2]
        assert counts == [str(int(g["patients"])), str(int(g["deaths"]))], row
        if g["metrics"] is None:  # too few for metrics: no calibration either
            assert g["observed_over_predicted"] is None and "too few: under 10 stays labelled died" in row
            assert g["note"].startswith("too few for stable metrics (fewer than 10 stays labelled died")
            continue
        assert f"{g['metrics']['auroc']:.3f} ({g['intervals']['auroc'][0]:.3f}-{g['intervals']['auroc'][1]:.3f})" in row
        # each group's own calibration in the large, with its interval (a model calibrated overall can be off in one)
        ratio, low, high = g["observed_over_predicted"]
        assert low <= ratio <= high and row.endswith(f"  {ratio:.2f} ({low:.2f}-{high:.2f})")
    assert f"flagged at risk >= {result['threshold']:.3f}" in text


def test_evaluate_table_cells_are_each_groups_exact_metrics_under_their_headers(bundle_and_stays, capsys):
    """Every cell of the --subgroups table, recomputed here from the stays and the model's
    risks (scikit-learn's AUROC, the flags counted by hand) at a --threshold other than the
    bundle's, and found under its own header: swapped columns, the whole export's row
    taken from a group, or the bundle's threshold used instead would each fail."""
    from common.bundle import Bundle
    from common.subgroups import assign, group_names
    from fedgru.cli import main

    path, folder, outcomes, _ = bundle_and_stays
    bundle = Bundle(path)
    ds = bundle.load(folder, outcomes, None)
    risk = bundle.predict(ds)[:, 1]
    threshold = round(float(np.quantile(risk, 0.4)), 3)  # sensitivity and specificity both between 0 and 1
    assert threshold != pytest.approx(0.3, abs=1e-3)  # the bundle's own
    assert main(["evaluate", "--model", str(path), "--data", str(folder), "--outcomes", str(outcomes),
                 "--subgroups", "--threshold", str(threshold)]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("group "))
    start = {word: header.index(word) for word in ("AUROC", "sensitivity", "specificity", "observed/predicted")}
    end = {word: header.index(word) + len(word) for word in ("stays", "died")}  # right-aligned counts

    def check(name: str, member: np.ndarray) -> None:
        row = next(line for line in lines if line.startswith(name + " ") and line[len(name):].lstrip()[:1].isdigit())
        y, p = ds.y[member], risk[member]
        assert row[:end["stays"]].endswith(f" {int(member.sum())}") and row[:end["died"]].endswith(f" {int(y.sum())}")
        if min(y.sum(), (1 - y).sum()) < 10:  # SUBGROUP_MIN_EVENTS
            assert row[start["AUROC"]:].startswith("too few: under 10 stays labelled died or under 10 survived"), row
            return
        expected = {"AUROC": roc_auc_score(y, p), "sensitivity": (p[y == 1] >= threshold).mean(),
                    "specificity": (p[y == 0] < threshold).mean()}
        for word, value in expected.items():
            assert row[start[word]:].startswith(f"{value:.3f} ("), (word, row)
        assert row[start["observed/predicted"]:].startswith(f"{y.mean() / p.mean():.2f} ("), row

    statics = {s.name: s for s in bundle.config.features.static}
    for spec in bundle.config.evaluation.subgroups:
        index = assign(spec, statics[spec.column], ds.groups[spec.column])
        for k, group in enumerate(group_names(spec, statics[spec.column])):
            if (index == k).any():
                check(f"{spec.name} {group}", index == k)
    check("all stays", np.ones(len(ds.y), dtype=bool))
    assert f"flagged at risk >= {threshold:.3f} (sensitivity, specificity" in "\n".join(lines)


def test_evaluate_csv_holds_every_metric_of_every_group_as_the_json_does(bundle_and_stays, capsys, tmp_path):
    """The table shows three metrics a group; --csv writes all of them with their
    intervals, a row for the whole export and one per group, as --json has them."""
    import csv

    from common.metrics import METRIC_NAMES
    from fedgru.cli import main
    from fedgru.evaluate import CSV_NAMES

    path, folder, outcomes, _ = bundle_and_stays
    args = ["evaluate", "--model", str(path), "--data", str(folder), "--outcomes", str(outcomes), "--subgroups"]
    assert main([*args, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    out = tmp_path / "deep" / "metrics.csv"
    assert main([*args, "--csv", str(out)]) == 0
    text, err = capsys.readouterr()
    assert f"every group's AUPRC, accuracy, F1, Brier, min(Se,PPV) too: in {out}" in text and f"to {out}" in err
    rows = list(csv.DictReader(out.open(newline="")))
    assert [(r["grouping"], r["group"]) for r in rows] == [(g["grouping"], g["group"]) for g in result["subgroups"]] + [
        ("all", "all stays")]  # the whole export last, as in the table
    whole = {**result, "note": ""}
    for row, expected in zip(rows, [*result["subgroups"], whole]):
        assert (int(row["stays"]), int(row["died"])) == (int(expected["patients"]), int(expected["deaths"]))
        assert row["note"] == expected["note"]
        assert float(row["flagged_at_risk"]) == pytest.approx(result["threshold"])
        for name, column in CSV_NAMES.items():  # min(Se,PPV) as min_se_ppv: a spreadsheet's column name
            row.update({k.replace(column, name, 1): v for k, v in row.items() if k.startswith(column)})
        for key in METRIC_NAMES:
            if expected["metrics"] is None:  # too few: blank, not a number that means nothing
                assert row[key] == row[f"{key}_low"] == row[f"{key}_high"] == ""
                continue
            assert float(row[key]) == pytest.approx(expected["metrics"][key], abs=1e-6)
            low, high = expected["intervals"][key]
            assert (float(row[f"{key}_low"]), float(row[f"{key}_high"])) == pytest.approx((low, high), abs=1e-6)
        ratio = expected["observed_over_predicted"]
        assert [float(v) if v else None for v in (row["observed_over_predicted"], row["observed_over_predicted_low"],
                                                   row["observed_over_predicted_high"])] == (
            pytest.approx(ratio, abs=1e-6) if ratio else [None] * 3)
    # '-': the CSV alone on stdout; with --json too, refused before any data is read
    assert main([*args, "--csv", "-"]) == 0
    assert capsys.readouterr().out.replace("\r\n", "\n") == out.read_text().replace("\r\n", "\n")
    assert main([*args[:-1], "--data", str(tmp_path / "absent"), "--json", "--csv", "-"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "--csv FILE" in err and "absent" not in err
    # a folder for a file: refused before the data is read (the data path does not exist), no traceback
    assert main([*args[:-1], "--data", str(tmp_path / "absent"), "--csv", str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "give a file name" in err and "absent" not in err


def test_evaluate_subgroups_leaves_out_empty_groups_and_names_small_ones(bundle_and_stays, capsys):
    from common.bundle import Bundle
    from common.subgroups import exact_results
    from fedgru.cli import main
    from fedgru.evaluate import SUBGROUP_MIN_EVENTS

    path, folder, outcomes, _ = bundle_and_stays
    assert main(["evaluate", "--model", str(path), "--data", str(folder), "--outcomes", str(outcomes), "--subgroups"]) == 0
    bundle = Bundle(path)
    positive = bundle.config.task.classes[-1]  # "died": the outcome's own word, not "events"
    out = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(out) if line.startswith("group "))
    assert positive in out[header].split()  # "died": the outcome's own word, not "events"
    lines = out[header + 1:out.index(next(line for line in out if line.startswith("all stays ")))]
    ds = bundle.load(folder, outcomes, None)
    probs = bundle.predict(ds)
    results = [g for g in exact_results(bundle.config, ds.y, probs, ds.groups, 0.3) if g.patients]
    assert len(lines) == len(results) >= 1
    for line, g in zip(lines, results):
        small = min(g.deaths, g.patients - g.deaths) < SUBGROUP_MIN_EVENTS
        assert ("too few: under 10 stays labelled died or under 10 survived" in line) == small, line
        if not small:  # each exact metric with its sampling interval, AUROC first: "0.812 (0.761-0.858)"
            assert re.search(rf"^{re.escape(f'{g.grouping} {g.group}')} +\d+ +\d+  {g.metrics.auroc:.3f} \(\d\.\d{{3}}-\d\.\d{{3}}\)  ",
                             line), line
    # the group's own observed rate over its own mean predicted risk, as the whole export's is read
    with_draws = [g for g in exact_results(bundle.config, ds.y, probs, ds.groups, 0.3, SUBGROUP_MIN_EVENTS, 50)
                  if g.metrics is not None]
    assert with_draws
    spec = bundle.config.evaluation.subgroups[0]
    from common.subgroups import assign, group_names

    index = assign(spec, {s.name: s for s in bundle.config.features.static}[spec.column], ds.groups[spec.column])
    names = group_names(spec, {s.name: s for s in bundle.config.features.static}[spec.column])
    checked = [g for g in with_draws if g.grouping == spec.name]
    assert checked, "the fixture's first grouping has a group with metrics"
    for g in checked:
        member = index == names.index(g.group)
        assert g.observed_over_predicted[0] == pytest.approx(ds.y[member].mean() / probs[member, 1].mean())


@pytest.mark.parametrize("head_hidden", [0, 2])  # 0: exact contributions; 2: integrated gradients
def test_a_model_that_overflows_on_a_patient_still_releases_bounded_finite_importance(full_dataset, head_hidden):
    """A finite model can overflow on some patients (a hostile coordinator can craft one
    that does so only for some). Their NaN or infinite parts count as 0, so every row of
    the importance release stays within its clip and the sum is finite: a NaN sum would
    tell the coordinator that such a patient was among the tested ones."""
    from common.explain import contribution_sizes

    cfg, model = _model("per_variable", head_hidden=head_hidden)
    assert is_exact(model) == (head_hidden == 0)
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        head.weight[0, 0] = float("inf")  # inf x a zero state is NaN, inf x anything else inf
    sizes = contribution_sizes(model, full_dataset.X[:40], full_dataset.S[:40], cfg.features, clip=1.0)
    assert np.isfinite(sizes).all()
    assert (np.linalg.norm(sizes, axis=1) <= 1.0 + 1e-6).all()


# ---------------------------------------------------------------------------------------
# Explanations a clinician recognises (against a normal patient)
# ---------------------------------------------------------------------------------------

NORMAL_STATIC = {"Age": 65.0, "Gender": 1.0, "Height": 170.0, "ICUType": 3.0, "Weight": 80.0}
# name, the abnormal value, the hours it is charted at (every variable else: its textbook normal, 4-hourly)
ABNORMAL = [("GCS", 3.0), ("Lactate", 8.0), ("BUN", 100.0), ("HR", 150.0), ("SysABP", 70.0), ("Urine", 50.0),
            ("FiO2", 1.0)]  # against a normal patient on room air, whose FiO2 is not charted
# Not MechVent: against a patient not ventilated, ventilation lowers this model's risk (-0.24): set A
# ventilates most cardiac surgery patients after their operation, and they rarely die. Learnt, not physiology.


@pytest.fixture(scope="module")
def trained_on_set_a(full_dataset):
    """A model that reads every variable (features.select=[]), trained centrally without
    DP on set A: the explanation method's test needs a model that learnt the physiology."""
    from common.data.dataset import load_dataset
    from common.training import TensorData, train_local

    cfg = load_config(DEFAULT_CONFIG, ["features.select=[]", "training.optimizer=adam", "training.lr=0.05"])
    ds = load_dataset(cfg)
    torch.manual_seed(0)
    model = GRUClassifier(model_spec(cfg), "torch")
    # a seeded sampler: with the OS's entropy (secret_generator) the trained model, and so
    # whether a borderline case such as SysABP 70 raised the risk, changed from run to run
    train_local(model, TensorData.from_numpy(ds.X, ds.S, ds.y, torch.device("cpu")), cfg.training, 300, None,
                torch.Generator().manual_seed(0))
    return cfg, model.eval()


def _patient(cfg, changed: dict[str, float], age: float = 65.0):
    """One stay charted every 4 hours at the config's normal values but for ``changed``,
    through the real preprocessing; a variable a normal patient has no charted value of
    (``normal_uncharted``: FiO2, MechVent) is charted only where ``changed`` names it."""
    from common.data.preprocess import to_tensors
    from common.data.records import Stay

    names = [v.name for v in cfg.features.variables]
    times, variables, values = [], [], []
    for hour in range(2, 49, 4):
        for j, spec in enumerate(cfg.features.variables):
            if spec.normal_uncharted and spec.name not in changed:
                continue
            times.append(hour)
            variables.append(j)
            normal = spec.normal if spec.normal is not None else 0.0 if spec.binary else spec.center
            values.append(changed.get(spec.name, normal))
    stay = Stay("synthetic", {**NORMAL_STATIC, "Age": age}, np.asarray(times, np.float32),
                np.asarray(variables, np.int16), np.asarray(values, np.float32))
    X, S = to_tensors([stay], cfg.features)
    assert len(names) == X.shape[2] // 3
    return X[0], S[0]


def test_a_normal_patient_is_explained_by_nothing(trained_on_set_a):
    cfg, model = trained_on_set_a
    x, s = _patient(cfg, {})
    e = explain(model, x, s, cfg.features, "normal")
    assert max(abs(c.contribution) for c in e.contributions if c.kind == "variable") < 0.05
    assert abs(next(c for c in e.contributions if c.name == "Age").contribution) < 0.05


def test_a_textbook_normal_value_apart_from_the_center_explains_nothing(trained_on_set_a):
    """GCS 15 is normal, though its center (a normalisation constant) is 11: against a
    reference at the center GCS 15 read -0.41 in a new user's try. The config's
    ``normal`` puts the reference patient there."""
    cfg, model = trained_on_set_a
    normal = {v.name: v.normal for v in cfg.features.variables if v.normal is not None}
    assert normal == {"GCS": 15.0}
    e = explain(model, *_patient(cfg, normal), cfg.features, "normal")
    assert all(abs(c.contribution) < 0.05 for c in e.contributions if c.name in normal), e.contributions
    at_center = explain(model, *_patient(cfg, {"GCS": 11.0}), cfg.features, "drowsy")
    assert next(c for c in at_center.contributions if c.name == "GCS").contribution > 0.05  # 11 is not normal


@pytest.mark.parametrize("name, value", ABNORMAL)
def test_an_abnormal_value_raises_the_risk_and_is_what_explains_it(trained_on_set_a, name, value):
    cfg, model = trained_on_set_a
    normal = explain(model, *_patient(cfg, {}), cfg.features, "normal")
    e = explain(model, *_patient(cfg, {name: value}), cfg.features, name)
    mine = next(c for c in e.contributions if c.name == name)
    assert e.risk > normal.risk and mine.contribution > 0.05, (name, mine.contribution, e.risk, normal.risk)
    assert next(c for c in e.contributions if c.kind == "variable").name == name  # the variable that explains most
    # charted at 46:00, so in the 47th hour of the stay
    assert describe(mine).startswith(f"{name}, last {format_value(value, mine.unit)} at hour 47: +")


def test_old_age_raises_the_risk(trained_on_set_a):
    cfg, model = trained_on_set_a
    e = explain(model, *_patient(cfg, {}, age=85.0), cfg.features, "old")
    age = next(c for c in e.contributions if c.name == "Age")
    assert age.contribution > 0.1 and describe(age) == f"Age, 85 years: {age.contribution:+.2f}"


@pytest.mark.parametrize("value, unit, shown", [(1.06e-7, "mL", "0 mL"), (80.0, "bpm", "80 bpm"), (7.354, "", "7.35"),
                                               (0.0031, "μg/L", "0.0031 μg/L"), (2170.4, "IU/L", "2170 IU/L"),
                                               (145.2, "mEq/L", "145 mEq/L"), (3.0, "points", "3 points")])
def test_values_print_in_their_units_with_sensible_digits(value, unit, shown):
    assert format_value(value, unit) == shown


def test_a_yes_no_variable_says_yes_or_no(full_dataset):
    """MechVent is a 0/1 indicator: 'MechVent, last yes at hour 48', not 'last 1'."""
    cfg, model = _model("per_variable")
    j = [v.name for v in cfg.features.variables].index("MechVent")
    ventilated = next(i for i in range(len(full_dataset.X)) if full_dataset.X[i, -1, len(cfg.features.variables) + j] > 0)
    e = explain(model, full_dataset.X[ventilated], full_dataset.S[ventilated], cfg.features, "v")
    mech = next(c for c in e.contributions if c.name == "MechVent")
    assert mech.label == "yes" and describe(mech).startswith("MechVent, last yes at hour 48: ")


def test_evaluate_table_aligns_group_and_class_names_in_wide_scripts():
    """The table padded by characters: a group or class name in a wide script (CJK) took
    two terminal columns a character, and its row's numbers stood right of the others'."""
    from common.metrics import Metrics
    from common.subgroups import GroupResult
    from fedgru.evaluate import ExactEvaluation, _shown_width, subgroup_table

    metrics = Metrics(auroc=0.8, auprc=0.4, accuracy=0.8, sensitivity=0.7, specificity=0.8, f1=0.4, brier=0.1,
                      event1_score=0.3, n=100)
    groups = [GroupResult("sex", name, 100.0, 20.0, metrics, [], "", {"auroc": [0.7, 0.9]}, [1.0, 0.8, 1.2])
              for name in ("男性", "female", "Zoë")]
    result = ExactEvaluation("d", 0.12, metrics, {"auroc": [0.7, 0.9]}, "", groups, [1.0, 0.9, 1.1], 300, 60)
    lines = subgroup_table(result, "死亡", "survived")
    for line in lines[1:]:  # each row's AUROC starts in the header's AUROC column
        before = line[:line.index("0.800")]
        assert _shown_width(before) == _shown_width(lines[0][:lines[0].index("AUROC")]), line
    assert _shown_width("Zoe\u0308") == 3 and _shown_width("男性") == 4


def test_a_named_device_or_link_is_written_through_not_replaced(tmp_path):
    """Renaming a private temporary file over the output replaced /dev/null (as root) or
    a symbolic link with a plain file: a device or a link the user named is written
    through; a regular file is replaced whole, 0600, and a failure leaves nothing behind."""
    from common.files import patient_output

    target = tmp_path / "shared" / "risks.csv"
    target.parent.mkdir()
    target.write_text("old\n")
    link = tmp_path / "risks.csv"
    link.symlink_to(target)
    with patient_output(link) as handle:
        handle.write("stay_id,risk\n")
    assert link.is_symlink() and target.read_text() == "stay_id,risk\n"
    with patient_output("/dev/null") as handle:  # a character device: still one afterwards
        handle.write("stay_id,risk\n")
    assert os.path.exists("/dev/null") and not os.path.isfile("/dev/null")
    plain = tmp_path / "plain.csv"
    with pytest.raises(RuntimeError), patient_output(plain) as handle:
        handle.write("half")
        raise RuntimeError("the data failed mid-write")
    assert not plain.exists() and list(tmp_path.glob(".*.tmp")) == []
