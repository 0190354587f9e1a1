"""End to end: real Flower simulations on real PhysioNet stays, through the CLI.

Each test runs ``fedgru`` in a subprocess (as a user would), so the Ray workers the
simulation starts end with it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest
from opacus.accountants import RDPAccountant

from tests.conftest import OUTCOMES, ROOT, SET_A

pytestmark = pytest.mark.slow

SMALL = [
    "--set", "data.max_stays=400",
    "--set", "model.gru_hidden=[16]",
    "--set", "training.batch_size=32",
]
# The default's linear head: the test release's importance is exact. A hidden head would
# make it Captum's integrated gradients, which pad every hospital's test split to a full
# batch: about 20 s more a run on 2 cores. That path's release is tested message by
# message (tests/test_neighbouring.py draws head_hidden 0 or 8; tests/test_explain.py).


def fedgru(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "fedgru.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, physionet_files):
    run_dir = tmp_path_factory.mktemp("sim") / "run"
    proc = fedgru("simulate", "--out", str(run_dir), "--rounds", "2", *SMALL)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return run_dir, proc


def test_simulation_writes_every_output(small_run):
    run_dir, proc = small_run
    for name in ("model.pt", "metrics.json", "privacy.json", "partition.json", "report.md", "epsilon.png", "config.yaml", "checkpoint.pt"):
        assert (run_dir / name).is_file(), name
    # the default validates the final model only: one point is no curve, and the report says why there is none
    assert not (run_dir / "auroc.png").exists()
    assert "so there is no curve to show" in (run_dir / "report.md").read_text()
    partition = json.loads((run_dir / "partition.json").read_text())
    assert [h["hospital"] for h in partition["hospitals"]] == ["coronary_care", "cardiac_surgery", "medical", "surgical"]
    assert sum(h["stays"] for h in partition["hospitals"]) == 400
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    assert set(metrics["test"]["pooled"]) >= {"auroc", "auprc", "accuracy", "sensitivity", "specificity", "f1", "brier", "event1_score", "n"}
    assert metrics["test"]["pooled"]["n"] == sum(h["test"] for h in partition["hospitals"])
    # a hospital row the noise drowns (about 20 test stays each here) holds no number a script could take for one
    drowned = [n for n in metrics["test"]["hospitals"] if n not in metrics["test"]["intervals"]]
    assert drowned and all(metrics["test"]["hospitals"][n][k] is None for n in drowned for k in ("auroc", "brier"))
    assert all(metrics["test"]["hospitals"][n]["n"] > 0 for n in drowned)
    # one progress line per round
    out = proc.stdout + proc.stderr
    assert out.count("round 1/2 | max epsilon") == 1 and out.count("round 2/2 | max epsilon") == 1
    report = (run_dir / "report.md").read_text()
    assert "Silva" in report and "## Privacy" in report
    # the released model is the average of both rounds' models, and the settings say which rounds
    assert metrics["test"]["averaged_rounds"] == [1, 2]
    assert "Released model: an exponential average of the global models of the rounds that trained from 1 to 2" in report
    # at 80 test patients no group's row can be read: the report says what size it would take
    least = metrics["test"]["subgroup_least"]
    assert all(g["metrics"] is None for g in metrics["test"]["subgroups"])
    assert "No group could be read at this run's size." in report
    assert f"at least {least:.0f} deaths and {least:.0f} survivors" in report and f"{least / 0.2:,.0f} deaths" in report


def test_a_hospitals_row_with_intervals_is_told_how_often_such_rows_held(small_run):
    """The small run's hospitals are too small for intervals of their own; given one (as a
    hospital of a default run has), the report prints the coverage measured for such rows."""
    from common.document import markdown
    from common.intervals import HOSPITAL_INTERVAL_COVERAGE
    from server.report.run_folder import RunFolder
    from server.report.sections import test_results_section

    run = RunFolder.load(small_run[0])
    for name in run.metrics.test.hospitals:  # about 20 test stays a hospital: drowned, whatever the draw
        run.metrics.test.intervals.pop(name, None)
    assert f"For one hospital's row: {HOSPITAL_INTERVAL_COVERAGE}" not in markdown("r", [test_results_section(run)])
    name = sorted(run.metrics.test.hospitals)[0]
    run.metrics.test.intervals[name] = {"specificity": [0.5, 0.9]}
    assert f"For one hospital's row: {HOSPITAL_INTERVAL_COVERAGE}" in markdown("r", [test_results_section(run)])
    run.metrics.test.intervals["pooled"] = {"auroc": [0.6, 0.9]}  # the 2-round run's own may reach anywhere
    assert "reaches below 0.5" not in markdown("r", [test_results_section(run)])
    # an AUROC interval reaching below a coin's 0.5 (a default run's medical row: 0.768, 0.388-1.000) is said
    run.metrics.test.intervals[name] = {"auroc": [0.388, 1.0], "specificity": [0.5, 0.9]}
    text = markdown("r", [test_results_section(run)])
    assert f"The AUROC interval of {name} reaches below 0.5, a coin's" in text


def test_the_importance_table_shows_no_mean_size_below_zero_and_each_with_its_noise_interval(small_run):
    """The DP noise can take a mean |contribution| below 0 (the default run showed -0.056):
    it shows as 0, and each mean carries the noise's 99% interval (value +- 2.576 sd), the
    report's level everywhere (it was 95% here alone)."""
    from common.document import markdown
    from server.report.groups import importance_section
    from server.report.run_folder import RunFolder

    run = RunFolder.load(small_run[0])
    run.metrics.test.importance = {"GCS": 0.2, "Gender (descriptor)": -0.01, "ICUType (descriptor)": -0.09}
    run.metrics.test.importance_noise = 0.03
    text = markdown("r", [importance_section(run)])
    assert "| GCS | 0.200 (0.123-0.277) |" in text and "| Gender (descriptor) | 0.000 (0.000-0.067) |" in text
    assert "99% interval for the DP noise" in text
    assert "| ICUType (descriptor) | 0.000 (0.000-0.000) |" in text
    assert "| -" not in text and "(-" not in text and ".000--" not in text  # no negative size, no negative bound


def test_an_unread_groups_row_shows_the_range_its_noisy_counts_leave_never_below_zero(small_run):
    """The report used to leave an unread group's counts blank, so "age unknown" (empty in
    set A) looked like any small group: it now shows the 99% range of each noisy count,
    clipped at 0 (a count below 0 is no number to show a clinician), deaths never above
    the patients; and a group is read only with GROUP_READ_MARGIN sds to spare."""
    import math

    from common.document import markdown
    from common.estimates import GROUP_READ_MARGIN, MIN_SIGNAL
    from server.report.groups import subgroup_section
    from server.report.run_folder import RunFolder

    run = RunFolder.load(small_run[0])
    test = run.metrics.test
    sd = test.subgroup_count_sd
    assert test.subgroup_least == pytest.approx((MIN_SIGNAL + GROUP_READ_MARGIN) * sd)
    text = markdown("r", [subgroup_section(run)])
    nothing_fits = "no count fits (the noise drew it below 0)"
    for g in test.subgroups:
        assert g.metrics is None  # 80 test stays: none is read
        spread = 2.576 * math.sqrt(2) * sd
        low, high = max(0.0, g.patients - spread), g.patients + spread
        patients = f"{low:.0f}-{high:.0f}" if high >= 0 else nothing_fits
        most = high if high >= 0 else math.inf
        deaths = (f"{min(max(0.0, g.deaths - 2.576 * sd), most):.0f}-{min(g.deaths + 2.576 * sd, most):.0f}"
                  if g.deaths + 2.576 * sd >= 0 else nothing_fits)
        assert f"| {g.grouping} | {g.group} | {patients} | {deaths} |" in text, g
    assert "a range that starts at 0 cannot tell a small group from an empty one" in text
    assert "| -" not in text


def test_the_console_is_quiet(small_run):
    """Hospitals table, one line per round, the summary: no line twice, none of Flower's
    per-round bookkeeping, no deprecation or Ray warnings, no DEBUG lines."""
    run_dir, proc = small_run
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert len(lines) <= 25, "\n".join(lines)
    assert len(lines) == len(set(lines)), "a line printed twice"
    text = "\n".join(lines)
    for noise in ("DEBUG", "DEPRECATED", "configure_train", "aggregate_train", "FutureWarning", "repeated", "Ray"):
        assert noise not in text, noise
    assert "Privacy spent" in text and f"Report: {run_dir}" in text and "hospital         stays" in text
    # results on stdout, the log on stderr: the threshold and the monitor are results a bedside user keeps
    margin = json.loads((run_dir / "metrics.json").read_text())["test"]["onset_margin"]  # none at 80 test stays, often
    assert "decision threshold" in proc.stdout and ("monitor: a stay is flagged" in proc.stdout) == (margin is not None)
    assert "decision threshold" not in proc.stderr and "Pooled test" not in proc.stderr
    assert "Pooled test (read from the DP releases with a skew-normal fit;" in proc.stdout  # not "skewnormal estimate"
    assert "(starting the federation itself is not counted: Ray and Flower in a simulation)" in (
        run_dir / "report.md").read_text()


def test_epsilon_is_cumulative_and_matches_an_independent_replay(small_run):
    run_dir, _ = small_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    privacy = json.loads((run_dir / "privacy.json").read_text())
    assert len(privacy["hospitals"]) == 4
    for name, h in privacy["hospitals"].items():
        eps1 = metrics["rounds"][0]["hospitals"][name]["epsilon"]
        eps2 = metrics["rounds"][1]["hospitals"][name]["epsilon"]
        assert 0 < eps1 < eps2 == pytest.approx(h["epsilon"])
        # the hospital's own report of its epsilon equals the server's replay
        assert metrics["rounds"][1]["hospitals"][name]["train"]["epsilon"] == pytest.approx(h["epsilon"], abs=1e-9)
        acc = RDPAccountant()
        for entry in h["history"]:
            for _ in range(entry["steps"]):
                acc.step(noise_multiplier=entry["noise_multiplier"], sample_rate=entry["sample_rate"])
        assert acc.get_epsilon(delta=h["delta"]) == pytest.approx(h["epsilon"], abs=1e-9)
        assert [e["round"] for e in h["history"]] == [1, 2]
        assert h["accountant"] == "rdp" and h["delta"] == 1e-5


def test_evaluate_and_predict_on_the_saved_bundle(small_run, tmp_path):
    run_dir, _ = small_run
    proc = fedgru("evaluate", "--model", str(run_dir / "model.pt"), "--data", str(SET_A), "--outcomes", str(OUTCOMES), "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)  # one JSON object, and nothing else, on stdout
    metrics = result["metrics"]
    assert set(metrics) == {"auroc", "auprc", "accuracy", "sensitivity", "specificity", "f1", "brier", "event1_score", "n"}
    assert metrics["n"] == 4000 and 0 <= metrics["auroc"] <= 1
    low, high = result["intervals"]["auroc"]
    assert low <= metrics["auroc"] <= high and 0 < result["threshold"] < 1
    out = tmp_path / "risk.csv"
    proc = fedgru("predict", "--model", str(run_dir / "model.pt"), "--data", str(SET_A), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    lines = out.read_text().splitlines()
    assert lines[0] == "stay_id,risk,flagged,hours_observed" and len(lines) == 4001  # "risk", as --hourly names it
    # set A's 4 stays with descriptors alone get no risk (a blank cell), not one read from age and sex
    unscored = [line for line in lines[1:] if line.split(",")[1] == ""]
    assert len(unscored) == 4 and all(line.endswith(",,0") for line in unscored)
    # The run's decision threshold (the config's level, or read from pooled validation); the bundle carries it.
    test = json.loads((run_dir / "metrics.json").read_text())["test"]
    threshold = test["threshold"]
    assert 0 < threshold < 1
    # Recalibration on pooled validation: whether this tiny 2-round run gets a usable fit
    # depends on its (secret) noise, so both outcomes must be recorded consistently; the
    # fit itself is checked in test_calibration.py.
    import torch

    calibration = test["calibration"]
    assert calibration is None or calibration["scale"] > 0
    assert torch.load(run_dir / "model.pt", weights_only=True)["info"]["calibration"] == calibration
    assert ("recalibrated" in (run_dir / "report.md").read_text()) == (calibration is not None)
    rows = [line.split(",") for line in lines[1:]]
    assert all(int(flag) == (float(risk) >= threshold) for _, risk, flag, _ in rows if risk)


def test_a_run_starts_from_an_earlier_runs_bundle(small_run, tmp_path):
    """model.init_from: the first global model is the bundle's; the run names the file."""
    import hashlib

    import torch

    start = small_run[0] / "model.pt"
    run_dir = tmp_path / "run"
    # a learning rate of 1e-9 moves no weight by more than about 1e-6, noise included
    proc = fedgru("simulate", "--out", str(run_dir), "--rounds", "1", *SMALL,
                  "--set", f"model.init_from={start}", "--set", "training.lr=1e-9")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    before = torch.load(start, weights_only=True)["weights"]
    after = torch.load(run_dir / "model.pt", weights_only=True)["weights"]
    assert before["head.0.weight"].abs().max() > 1e-3  # a trained head, not the zero-initialised start
    for key in before:
        torch.testing.assert_close(after[key], before[key], atol=1e-5, rtol=0)
    recorded = json.loads((run_dir / "metrics.json").read_text())["start"]
    assert recorded["sha256"] == hashlib.sha256(start.read_bytes()).hexdigest()
    assert recorded["source_run"] == torch.load(start, weights_only=True)["info"]["run_id"]
    assert f"Start: the weights of `{start}`" in (run_dir / "report.md").read_text()


def test_evaluate_errors_are_clear(small_run, tmp_path):
    run_dir, _ = small_run
    proc = fedgru("evaluate", "--model", str(run_dir / "model.pt"), "--data", str(tmp_path / "nope.tar.gz"), "--outcomes", str(OUTCOMES))
    assert proc.returncode == 2 and "nope.tar.gz" in proc.stderr and "Traceback" not in proc.stderr
    folder = tmp_path / "stays"
    folder.mkdir()
    (folder / "5.txt").write_text("Time,Parameter,Value\n00:00,RecordID,5\n00:10,HR,12O\n")
    proc = fedgru("evaluate", "--model", str(run_dir / "model.pt"), "--data", str(folder), "--outcomes", str(OUTCOMES))
    assert proc.returncode == 2
    assert "5.txt, line 3, column 'Value'" in proc.stderr and "12O" not in proc.stderr


def test_a_hospital_sending_nan_is_dropped_and_the_model_stays_finite(tmp_path, physionet_files):
    import torch

    run_dir = tmp_path / "hostile"
    proc = fedgru("simulate", "--out", str(run_dir), "--rounds", "2", "--fault", "medical=nan", "--fault", "surgical=huge_count", *SMALL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for r in metrics["rounds"]:
        dropped = {d["hospital"]: d["reason"] for d in r["dropped"]}
        assert "NaN" in dropped["medical"] and "example count" in dropped["surgical"]
        assert not r["skipped"]
    out = proc.stdout + proc.stderr
    assert "dropped the reply of medical" in out
    bundle = torch.load(run_dir / "model.pt", weights_only=True)
    assert all(torch.isfinite(w).all() for w in bundle["weights"].values())


def _chromium() -> str:
    import shutil

    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("headless Chromium is needed to check the HTML report: apt-get install chromium (.ci/run does)")


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _render(page, tmp_path) -> tuple[str, int]:
    """The page as headless Chromium builds it (its DOM), and the size of a screenshot."""
    flags = [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([_chromium(), *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    shot = tmp_path / f"{page.stem}.png"
    subprocess.run([_chromium(), *flags, f"--screenshot={shot}", "--window-size=1200,2400", page.as_uri()],
                   capture_output=True, timeout=120, check=True)
    return dom.stdout, shot.stat().st_size


def _looks_finished(dom: str) -> None:
    """What a new user must not see: raw Markdown, Python reprs, impossible numbers, a
    table with a header and no rows."""
    text = re.sub(r"<[^>]+>", " ", re.sub(r"<(style|script)[^>]*>.*?</\1>", " ", dom, flags=re.S))
    assert "`" not in text and "**" not in text, "raw Markdown on the page"
    assert not re.search(r"[{\[]'", text), "a Python repr on the page"
    numbers = text.replace("written as nan or inf", "")  # the data section's count of such values
    assert not re.search(r"\b(nan|inf)\b", numbers, flags=re.I) and not re.search(r"\bNone\b", numbers), \
        "NaN, inf or None printed as a number"
    assert not re.search(r"\d\.?\d*e-0*[1-9]\d+", text), "an impossibly small number printed"  # delta 1e-05 is fine
    for table in re.findall(r"<table.*?</table>", dom, flags=re.S):
        assert "<td" in table, "a table with no rows"


def test_html_report_renders_in_headless_chromium(small_run, tmp_path):
    run_dir, _ = small_run
    proc = fedgru("report", str(run_dir))
    assert proc.returncode == 0, proc.stderr
    assert "epsilon" in proc.stdout and "report.html" in proc.stdout
    page = run_dir / "report.html"
    assert "<img" in page.read_text() and "data:image/png;base64," in page.read_text()  # self-contained
    text, shot = _render(page, tmp_path)
    privacy = json.loads((run_dir / "privacy.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for name, h in privacy["hospitals"].items():
        assert name in text
        assert f"{h['epsilon_rdp']:.3f}" in text and f"{h['epsilon_prv']:.3f}" in text
        assert f"For every ICU stay of hospital {name}" in text
    test = metrics["test"]
    from common.metrics import with_interval

    # a number only with an interval that says something (an interval of all of 0-1 is "cannot be estimated": a
    # CI run's noise drew one, and this test expected a number the report rightly did not print)
    shown = with_interval(test["pooled"]["auroc"], test["intervals"].get("pooled", {}).get("auroc"))
    if not shown.startswith("cannot be estimated"):
        assert f"{test['pooled']['auroc']:.3f}" in text and f"{test['intervals']['pooled']['auroc'][0]:.3f}" in text
    else:  # 80 test patients, about 10 deaths: usually drowned by the noise (or unranked by the bins): its row says so
        pooled_row = next(line for line in (run_dir / "report.md").read_text().splitlines() if line.startswith("| pooled |"))
        assert [c.strip() for c in pooled_row.split("|")][2].startswith("cannot be estimated")  # the AUROC's cell
    assert f"{test['exact']['auroc']:.3f}" in text and "a real federation never sees" in text  # labelled as exact
    # the exact reliability diagram of the same test patients, drawn beside the DP reading
    assert sum(p["patients"] for p in test["exact_calibration_curve"]) == test["exact"]["n"]
    assert "the dashed black line is" in text and "from the simulation's exact scores" in text
    # a DP point's band (where the bootstrap drew one) holds the point, and the caption then says what the bars are
    banded = [p for p in test["calibration_curve"] if p["low"] is not None]
    assert all(0 <= p["low"] <= p["observed"] <= p["high"] <= 1 for p in banded)
    assert ("its bar is its interval" in text) == bool(banded)
    _looks_finished(text)
    assert shot > 20_000  # a real page with plots, not a blank one


def test_monitor_page_renders_in_headless_chromium(small_run, hospital_data, tmp_path):
    """The monitor of two stays from the run's model: each stay's plot, its hour's
    threshold, nothing unfinished."""
    from common.bundle import Bundle, hour_thresholds

    run_dir, _ = small_run
    folder, _ = hospital_data
    stays = sorted(p.stem for p in folder.glob("*.txt"))[:2]
    page = tmp_path / "monitor.html"
    proc = fedgru("monitor", "--model", str(run_dir / "model.pt"), "--data", str(folder),
                  *[a for s in stays for a in ("--stay", s)], "--out", str(page))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [p.name for p in tmp_path.iterdir()] == ["monitor.html"]  # one page, its plots inside: no stray files
    text, shot = _render(page, tmp_path)
    # a run this small releases too few validation patients for per-hour thresholds: its one threshold serves
    thresholds = hour_thresholds(Bundle(run_dir / "model.pt").info, 48)
    for stay in stays:
        assert f"Stay {stay}" in text and f"flag level at that hour {thresholds[-1]:.3f}" in text
    assert text.count("data:image/png;base64,") == 2
    _looks_finished(text)
    assert shot > 20_000


def test_a_small_budget_trains_every_hospital_through_the_run_within_it(tmp_path, physionet_files):
    """`--set privacy.max_epsilon=0.3` with the target epsilon 1: each hospital fits its
    noise to its budget at the preflight and trains every round, spending at most 0.3.
    (Before, no hospital trained a round, and the console said it had "reached its privacy
    budget (epsilon 0.000 of 0.300)".) Every console line about a budget is checked
    against the ledgers."""
    run_dir = tmp_path / "budget"
    proc = fedgru("simulate", "--out", str(run_dir), "--rounds", "6", "--set", "privacy.max_epsilon=0.3", *SMALL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    console = proc.stdout + proc.stderr
    privacy = json.loads((run_dir / "privacy.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == list(range(1, 7)) and not any(r["skipped"] for r in metrics["rounds"])
    for name, h in privacy["hospitals"].items():
        assert h["state"] == "active" and h["rounds_trained"] == 6 and h["budget"] == 0.3, name
        assert 0.29 <= h["epsilon"] <= 0.3 + 1e-9, (name, h["epsilon"])
        assert f"{name:20s} epsilon {h['epsilon']:.3f}" in console
    # one preflight line for all: what it says matches the ledgers
    said = re.search(r"4 of 4 hospitals accept the plan: noise multiplier [0-9.e+]+ to [0-9.e+]+ \(set by its remaining "
                     r"budget at 4 hospitals\), training epsilon after the run ([0-9.]+)(?: to ([0-9.]+))?", console)
    spent = [h["epsilon"] for h in privacy["hospitals"].values()]
    assert said, console[-3000:]
    assert float(said.group(1)) == pytest.approx(min(spent), abs=5e-4)
    assert float(said.group(2) or said.group(1)) == pytest.approx(max(spent), abs=5e-4)
    assert "stops training" not in console and "reached its privacy budget" not in console
    assert "test" in metrics and (run_dir / "model.pt").is_file()


def test_a_plan_no_hospital_accepts_stops_before_anything_is_spent(tmp_path, physionet_files):
    run_dir = tmp_path / "refused"
    proc = fedgru("simulate", "--out", str(run_dir), "--rounds", "3", "--set", "privacy.noise_multiplier=0.3",
                  "--set", "privacy.target_epsilon=0", *SMALL)
    console = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in console, console[-3000:]
    assert "fedgru simulate: error: the run did not start: 0 of 4 hospitals accepted its plan" in proc.stderr
    # once on each stream: the summary on stdout, the error on stderr (it was also a warning: three times)
    assert proc.stdout.count("the run did not start") == proc.stderr.count("the run did not start") == 1
    assert console.count("refused the plan: 'privacy.noise_multiplier' is 0.3; this hospital's floor is 0.5: use at least "
                         "0.5") == 4
    metrics = json.loads((run_dir / "metrics.json").read_text())
    privacy = json.loads((run_dir / "privacy.json").read_text())
    assert metrics["test"] is None and metrics["rounds"] == [] and len(metrics["preflight"]) == 4
    assert all(not h["groups"] and h["epsilon"] is None for h in privacy["hospitals"].values())  # nothing released
    assert not (run_dir / "model.pt").exists()


def test_simulation_runs_on_an_existing_ray_cluster(tmp_path, physionet_files):
    """`--ray-address` points the hospitals at a Ray cluster started apart from the run
    (here a head node on this machine, in its own temp folder; on several machines the
    other nodes join it with `ray start --address`). The cluster is stopped by its
    process group at the end."""
    import signal
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    import shutil
    import tempfile

    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    # A short folder of its own: Ray's socket paths must fit in 107 characters, and a
    # cluster file in /tmp/ray would make other ray.init() calls on this machine join it.
    ray_tmp = tempfile.mkdtemp(prefix="fgray", dir="/tmp")
    log = open(tmp_path / "ray-head.log", "wb")  # a file, not a pipe: a full pipe would stall the head
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
         f"--temp-dir={ray_tmp}", "--disable-usage-stats"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.5)
        run_dir = tmp_path / "run"
        proc = fedgru("simulate", "--out", str(run_dir), "--rounds", "1", "--ray-address", f"127.0.0.1:{port}", *SMALL,
                      timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert (run_dir / "model.pt").is_file()
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=10)
        log.close()
        _kill_processes_mentioning(ray_tmp)  # any Ray process that left the group (by pid)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _kill_processes_mentioning(text: str) -> None:
    import psutil

    for proc in psutil.process_iter(["pid", "cmdline"]):
        if any(text in part for part in proc.info["cmdline"] or []):
            try:
                proc.kill()
            except psutil.Error:
                pass


def test_five_hospitals_that_each_allow_one_colluder_survive_one_dropout_and_skip_a_round_at_two(
        tmp_path, physionet_files):
    """docs/deployment.md's worked case on the real Flower simulation: five hospitals whose
    policies allow one hospital on the coordinator's side (max_colluding 1). The
    coordinator learns it from their preflight answers and starts at threshold 4 of 5,
    naming them; hospital_0 dies mid-round from round 1 and hospital_1 from round 2.
    Round 1 completes from four; round 2 (three left, below 4) is skipped, the model keeps
    round 1's step, and the final test is read from the four that answer it."""
    run_dir = tmp_path / "five"
    proc = fedgru("simulate", "--config", "configs/secure.yaml", "--out", str(run_dir), "--rounds", "2",
                  "--set", "data.max_stays=500", "--set", "partition.scheme=iid", "--set", "partition.num_hospitals=5",
                  "--set", "privacy.max_colluding=1",
                  "--fault", "hospital_0=crash_mid_round", "--fault", "hospital_1=crash_mid_round@2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert ("secure aggregation: threshold 4 of 5, the least the policy of hospital_0, hospital_1, hospital_2, "
            "hospital_3, hospital_4 accepts") in proc.stderr and "a round survives 1 dropout(s)" in proc.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    first, second = metrics["rounds"]
    assert not first["skipped"] and {d["hospital"] for d in first["dropped"]} == {"hospital_0"}, first
    assert second["skipped"] and {d["hospital"] for d in second["dropped"]} == {"hospital_0", "hospital_1"}, second
    privacy = json.loads((run_dir / "privacy.json").read_text())
    for name in ("hospital_2", "hospital_3", "hospital_4"):  # both rounds' vectors left: both are charged
        h = privacy["hospitals"][name]
        assert h["rounds_trained"] == 1 and h["epsilon"] > privacy["hospitals"]["hospital_1"]["epsilon"] > 0, name
    test = metrics["test"]
    # hospital_1 answers the final test (its fault starts at training round 2 and spares evaluations)
    assert test["exact"]["n"] == 100 and test["pooled"]["n"] == 80, (test["pooled"], test["exact"])


def test_secure_aggregation_completes_rounds_when_a_hospital_dies_mid_round(tmp_path, physionet_files):
    """configs/secure.yaml on the real Flower simulation: medical shares its keys every round
    and every evaluation and dies before its masked vector leaves; the others' sums are
    unmasked all the same (its pair masks rebuilt from its key's shares), every round moves
    the model, the validations and the test are read from the others' secure sums (no
    per-hospital rows), and no file the coordinator writes holds one hospital's vector."""
    import torch

    run_dir = tmp_path / "secure"
    proc = fedgru("simulate", "--config", "configs/secure.yaml", "--out", str(run_dir), "--rounds", "3",
                  "--set", "data.max_stays=400", "--set", "evaluation.validate_every=1",
                  "--fault", "medical=crash_mid_round")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert len(metrics["rounds"]) == 3
    for r in metrics["rounds"]:
        assert not r["skipped"], r
        # medical drops out of the training (and, in rounds 2 and 3, out of the validation too)
        assert {d["hospital"] for d in r["dropped"]} == {"medical"}, r["dropped"]
        assert set(r["hospitals"]) >= {"coronary_care", "cardiac_surgery", "surgical"}
    privacy = json.loads((run_dir / "privacy.json").read_text())
    for name in ("coronary_care", "cardiac_surgery", "surgical"):
        h = privacy["hospitals"][name]
        assert h["epsilon_alone"] > h["epsilon"] > 0 and h["epsilon"] <= 1.0 + 1e-9
        assert {e["mechanism"] for e in h["ledger"]["entries"] if e["split"] == "train"} == {"skellam", "none"}
        for split in ("val", "test"):  # read from the sums: Skellam shares, within the run's epsilon
            assert {e["mechanism"] for e in h["ledger"]["entries"] if e["split"] == split} == {"skellam"}, split
    assert "its own noise alone" in proc.stdout + proc.stderr
    assert "secure aggregation keys and shares" in {r["field"] for r in privacy["non_dp_releases"]}
    validated = [r["round"] for r in metrics["rounds"] if r.get("pooled_val")]
    # during rounds 2 and 3; the final model's validation is made too (its thresholds read it) but filed under no
    # round: the released model is the rounds' average (server.averaging), no round's own
    assert validated == [1, 2], metrics["rounds"]
    test = metrics["test"]
    # the others' test patients (medical died before its share left), of all the exact test patients
    assert 0 < test["pooled"]["n"] < test["exact"]["n"], (test["pooled"], test["exact"])
    assert test["hospitals"] == {}, "a secure sum has no per-hospital rows"
    bundle = torch.load(run_dir / "model.pt", weights_only=True)
    assert all(torch.isfinite(w).all() for w in bundle["weights"].values())
    assert bundle["weights"]["head.0.weight"].abs().sum() > 0  # the zero-initialised head moved
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert b"secagg-masked" not in path.read_bytes(), f"{path} holds a hospital's masked vector"


def test_the_summary_and_report_say_the_monitors_readings_with_their_intervals(small_run, tmp_path):
    """The wiring from metrics.json to the summary and the report (the small run's hourly
    releases are drowned, so it read none: they are written in as a larger run reads
    them). Its settings are not the default's, so its coverage is said to be unmeasured."""
    import shutil

    run_dir, _ = small_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    metrics = json.loads((copy / "metrics.json").read_text())
    metrics["test"].update({"checkpoint_thresholds": {"1": 0.332, "6": 0.206},
                            "checkpoint_intervals": {"1": [0.242, 0.438], "6": [0.15, 0.29]},
                            "onset_margin": 0.886, "onset_margin_interval": [0.73, 1.03], "monitor_rate": 0.3,
                            "flag_level_intervals": {"1": [0.45, 0.66]},
                            "hour_thresholds": [0.332] * 47 + [metrics["test"]["threshold"]]})
    (copy / "metrics.json").write_text(json.dumps(metrics))
    proc = fedgru("report", str(copy))
    assert proc.returncode == 0, proc.stderr
    assert "after hour 1 0.332 (0.242-0.438), after hour 6 0.206 (0.150-0.290)" in proc.stdout
    assert "by 0.89 (0.73 to 1.03) in log-odds: a risk of 0.547 (0.450-0.660) after hour 1, " in proc.stdout
    line = next(x for x in proc.stdout.splitlines() if x.startswith("  intervals: nominal 99% for the DP noise and the "
                                                                     "reading (not a range of patients' risks)"))
    assert "their coverage was not measured at this run's settings" in line  # 400 stays, not set A whole
    report = (copy / "report.md").read_text()
    paragraph = next(p for p in report.split("\n\n") if p.startswith("The hourly monitor judges"))
    assert "after hour 1 0.332 (0.242-0.438)" in paragraph and "not measured at this run's settings" in paragraph
    assert "a risk of 0.547 (0.450-0.660) after hour 1" in report  # the flag item, beside the decision
