"""The report's general sections, each from the run folder's records: settings, test
results, what federation buys, data. The privacy parts are in ``privacy_text``, the
groups of patients and the inputs' importance in ``groups``."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from common.bundle import checkpoint_words
from common.config import ExperimentConfig
from common.document import Bullets, Section, Table
from common.estimates import MAX_PAIRS_IN_ONE_BIN
from common.intervals import (
    HOSPITAL_INTERVAL_COVERAGE,
    INTERVAL_LEVEL,
    THRESHOLD_COVERAGE_HELD,
    THRESHOLD_COVERAGE_SETTING,
    THRESHOLD_INTERVAL_COVERAGE,
    interval_coverage,
)
from common.metrics import METRIC_NAMES, Metrics, with_interval
from common.onset import raising_levels

from ..records import Partition, RunPrivacy, StartRecord
from .run_folder import RunFolder

PHYSIONET_CITATION = (
    "Data: PhysioNet/Computing in Cardiology Challenge 2012 (Open Data Commons Attribution 1.0). "
    "Silva I, Moody G, Scott DJ, Celi LA, Mark RG. Predicting In-Hospital Mortality of ICU Patients: "
    "The PhysioNet/Computing in Cardiology Challenge 2012. Comput Cardiol 2012;39:245-248."
)

ESTIMATOR_WORDS = {  # metrics.json's estimator -> how the report says the metrics were read
    "skewnormal": "They are read from a skew-normal distribution of logits fitted to each class's noisy histogram "
                  "(evaluation.estimator: skewnormal), not from its counts clipped at zero, which pull the AUROC "
                  "towards 0.5; AUROC and AUPRC read the fitted distributions on a grid finer than the bins.",
    "binormal": "They are read from a normal distribution of logits fitted to each class's noisy histogram "
                "(evaluation.estimator: binormal), not from its counts clipped at zero, which pull the AUROC towards "
                "0.5; AUROC reads the fitted distributions on a grid finer than the bins, AUPRC the fitted counts "
                "in the bins.",
    "binned": "They are read from the counts in the bins (exact histograms, or evaluation.estimator: binned): "
              "noisy counts are clipped at zero, which pulls the AUROC towards 0.5, and AUROC and AUPRC lose the "
              "order of patients whose scores share a bin.",
    "": "AUROC and AUPRC lose the order of patients whose scores share a bin.",
}


def settings_section(cfg: ExperimentConfig, privacy: RunPrivacy | None, start: StartRecord | None,
                     simulated: bool = True, averaged_rounds: list[int] | None = None,
                     released: bool = True) -> Section:
    """The run's settings. ``simulated``: the run partitioned the config's data itself; a
    deployed run's hospitals read their own data by their own definitions and budgets."""
    task, tr, pr, md = cfg.task, cfg.training, cfg.privacy, cfg.model
    sigma = (
        f"noise multiplier {pr.noise_multiplier}" if pr.noise_multiplier > 0
        else f"target epsilon {pr.target_epsilon} for the planned run (sigma calibrated once)"
    )
    dp = (
        f"on; clipping norm {pr.max_grad_norm}, {sigma}, delta "
        + ("auto (below 1/n of each hospital's stays), " if pr.delta == "auto" else f"{pr.delta}, ")
        + (f"budget {pr.max_epsilon} per hospital, " if simulated else
           f"budget at most {pr.max_epsilon} per hospital (each hospital's own policy sets its own, and its delta), ")
        + f"{pr.accountant.upper()} accountant drives decisions" if pr.enabled else "off"
    )
    return Section("Settings", [Bullets([
        f"Task: `{task.label_column}`, classes {', '.join(task.classes)}",
        (f"Data: `{cfg.data.path}` ({cfg.data.format}"
         + ("" if Path(cfg.data.path).is_absolute() else "; the path is relative to the project folder")
         + f"); partition `{cfg.partition.scheme}`" if simulated else
         "Data: each hospital's own export, read by its own data definition (`fedgru hospital data`); the "
         "coordinator never sees it, and the config's data path and partition are not used"),
        "Model: " + (f"one GRU per variable ({md.architecture}), hidden size "
                      if md.architecture == "per_variable" else f"{md.architecture} GRU, hidden size ")
        + " then ".join(str(h) for h in md.gru_hidden) + ", "
        + (f"a head with a hidden layer of {md.head_hidden}" if md.head_hidden else "a linear head")
        + f", dropout {md.dropout} ({md.gru_impl} GRU implementation)",
        "Start: " + (
            f"the weights of `{start.path}` (sha256 {start.sha256[:16]}..."
            + (f", the model of run `{start.source_run}`" if start.source_run else "")
            + "), chosen by the coordinator; how that model was trained, and what it cost in privacy, is outside this run"
            if start else f"`{md.init}` initialisation" + (", output layer at zero" if md.zero_init_head else "")
        ),
        *([f"Training: each round one step of DP gradient descent on every training patient "
           f"(sample rate {tr.sample_rate or 1.0:g}), the coordinator's step lr {tr.lr} ({tr.lr_schedule}), momentum "
           f"{tr.momentum:g}",
           f"Aggregation: secure (SecAgg+ with distributed Skellam noise; the coordinator sees only the sums of "
           f"gradients and of evaluation histograms); {cfg.run.rounds} rounds planned",
           f"Distributed DP: {dp}"] if pr.enabled and pr.aggregation == "secure" else
          [f"Local training: {tr.local_epochs} epoch(s) per round, expected batch {tr.batch_size}, "
           f"{tr.optimizer} lr {tr.lr} ({tr.lr_schedule})",
           f"Aggregation: {cfg.strategy.name}; {cfg.run.rounds} rounds planned",
           f"DP-SGD: {dp}"]),
        released_model_words(cfg.strategy.average_decay, averaged_rounds or []) if released else
        "Released model: none (no round trained, so the run released no model and made no evaluation release)",
    ])])


def released_model_words(decay: float, averaged_rounds: list[int]) -> str:
    """Which model the run evaluated, released and saved (server.averaging), with the
    rounds it averages when the run kept them (a run resumed from a checkpoint that held
    no average averages only the rounds after its resume, and says so here)."""
    if decay == 0:
        return "Released model: the last round's global model"
    first, last = averaged_rounds if len(averaged_rounds) == 2 else (None, None)
    which = ("the rounds' global models" if first is None else
             f"the global models of round {first}" if first == last else
             f"the global models of the rounds that trained from {first} to {last}")
    return (f"Released model: an exponential average of {which} (decay {decay:g}, warming up "
            "over the first rounds), post-processing of what the coordinator held, free under DP; every final "
            "release, `model.pt` and the exact metrics are of it")


def is_secure(run: RunFolder) -> bool:
    """The run used secure aggregation: its evaluation releases are sums over hospitals."""
    return run.config is not None and run.config.privacy.enabled and run.config.privacy.aggregation == "secure"


def coverage_words(run: RunFolder, coverage=interval_coverage) -> str:
    """The intervals' measured coverage for this run's mode, and whether this run is the
    setting it was measured at (its test patients, hospitals that released a test histogram,
    test epsilon). ``coverage``: whose (common.intervals.band_coverage: the reliability bars')."""
    cfg, test, privacy = run.config, run.metrics.test, run.privacy
    aggregation = cfg.privacy.aggregation if cfg is not None else ""
    if cfg is None or test is None or test.pooled is None or privacy is None:
        return coverage(aggregation)
    hospitals = sum(1 for h in privacy.hospitals.values() if (g := h.groups.get("test")) is not None and g.this_run)
    return coverage(aggregation, test.pooled.n, hospitals, cfg.evaluation.test_epsilon)


def evaluation_dp(run: RunFolder) -> bool:
    """Whether the run's score histograms carried DP noise (always, outside comparison
    simulations); a folder without privacy.json tells by the estimator it read them with."""
    return bool(run.privacy.evaluation_dp) if run.privacy else run.metrics.estimator != "binned"


def test_results_section(run: RunFolder) -> Section | None:
    test = run.metrics.test
    if test is None:
        return None
    dp = evaluation_dp(run)
    secure = is_secure(run)
    header = ["hospital", *METRIC_NAMES.values(), "n"]

    old = dp and not test.intervals and test.auroc_interval is not None  # a run folder from before intervals

    def row(label: str, m: Metrics, intervals: dict | None, exact: bool = False) -> list:
        if exact or not dp or old:
            return [label] + [getattr(m, k) for k in METRIC_NAMES] + [m.n]
        if not intervals:
            return [label, "cannot be estimated: the DP noise drowns these counts"] + [""] * (len(METRIC_NAMES) - 1) + [m.n]
        return [label] + [with_interval(getattr(m, k), intervals.get(k)) for k in METRIC_NAMES] + [m.n]

    rows = [row("pooled", test.pooled, test.intervals.get("pooled"))] if test.pooled else []
    rows += [row(n, test.hospitals[n], test.intervals.get(n)) for n in sorted(test.hospitals)]
    if test.exact is not None:
        rows.append(row("pooled, exact (simulation only)", test.exact, None, exact=True))
        rows += [row(f"{n}, exact (simulation only)", test.exact_hospitals[n], None, exact=True)
                 for n in sorted(test.exact_hospitals)]
    calibration = (
        f"The risks were recalibrated on the pooled validation histograms (Platt scaling: logit -> "
        f"{test.calibration.scale:.3f} x logit {test.calibration.shift:+.3f}), which keeps every patient's rank. "
        if test.calibration else ""
    )
    intervals = (
        f"Each value read from the DP releases is followed by its rough interval (nominal {INTERVAL_LEVEL:.0%}): how "
        "far it may be from what these test patients' exact scores give, for the DP noise and the reading (a "
        f"parametric bootstrap of the release; {coverage_words(run)}). A value on other patients differs by their own "
        "sampling error on top. A row the noise drowns shows no number. " if dp else ""
    )
    if dp and not secure and any(test.intervals.get(n) for n in test.hospitals):
        intervals += f"For one hospital's row: {HOSPITAL_INTERVAL_COVERAGE}. "
    chance = [n for n, found in sorted(test.intervals.items())  # (an interval of all of 0-1 prints no number)
              if dp and found and found.get("auroc") and found["auroc"][0] < 0.5
              and "cannot" not in with_interval(0.5, found["auroc"])]
    if chance:
        # an interval reaching below 0.5 cannot tell the row's ranking from a coin's: say so beside the number
        rows_named = ", ".join("the pooled row" if n == "pooled" else n for n in chance)
        intervals += (f"The AUROC interval of {rows_named} reaches below 0.5, a coin's: at that end the "
                      "releases cannot tell the ranking from chance (for AUPRC chance is the share of patients with "
                      "the outcome). ")
    if dp and any(found and "auroc" not in found for found in test.intervals.values()):
        intervals += (f"AUROC and AUPRC cannot be estimated in a row where {MAX_PAIRS_IN_ONE_BIN:.0%} or more of the "
                      "pairs of a patient with the outcome and one without fall into the same bin of its histogram, "
                      "or where both outcomes' fitted scores spread over less than half a bin: the bins cannot say "
                      "which of a pair scores higher (the model's scores spread less than a bin of "
                      "evaluation.logit_range, as a barely trained model's do). ")
    exact = ("The rows marked exact score the same model on the same test patients without noise: a simulation "
             "holds every patient; a real federation never sees them. " if test.exact is not None else "")
    rule = {"auto": "'auto': the risk at which the pooled validation releases flag evaluation.flag_rate of the patients",
            "event1": "'event1': the bin edge with the best min(Se,PPV) on the pooled validation releases"}
    cfg = run.config
    level = ("a clinical level set in the config, evaluation.threshold, which no DP noise moves"
             + ("; it applies to the risk after recalibration, a fit to the DP validation release"
                if test.calibration else ""))
    chosen = rule.get(cfg.evaluation.threshold, level) if cfg is not None else "the run's rule"
    return Section("Test results (final model)", [
        Table(header, rows, empty="No hospital's test release could be read, so there are no test results: each "
                                  "hospital's state (refused, dropped, out of budget) is in the privacy section."),
        (("Every metric here comes from the sum of the hospitals' score histograms under secure aggregation, with "
          "the Skellam noise of their shares: the coordinator never sees one hospital's histogram, so there are no "
          "per-hospital rows from the releases. " if secure else
          "Every metric here comes from the score histograms the hospitals released, with DP noise: a hospital's own "
          "row is noisier than the pooled one. ") + ESTIMATOR_WORDS.get(run.metrics.estimator, ESTIMATOR_WORDS[""])
         + " The Brier score reads risks at the bin centres. " if dp else
         "The histograms were exact (a comparison simulation without DP). ")
        + f"Accuracy, sensitivity, specificity, F1 and min(Se,PPV) flag a patient at a risk of {test.threshold:.3f} "
        f"or more ({chosen}); min(Se,PPV) is the lower of the sensitivity and the positive predictive value (the "
        "PhysioNet/CinC 2012 challenge's event-1 score). " + calibration + intervals + exact,
        # the monitor in a paragraph of its own: appended to the metrics' one it made 3,000 characters (a new user's read)
        *[words for words in [monitor_words(test, threshold_coverage_words(cfg, len(test.hospitals))).strip()] if words],
    ])


# the settings the monitor's spread and its thresholds' intervals were measured at (20 protocol runs, 2026-12-07):
# monitor_rate, onset_share, hourly_share, onset_noise, val_epsilon, aggregation, hospitals, and the training's
# clipping norm and the decision level (the model's scale and the hour thresholds move both)
MONITOR_MEASURED_SETTING = (0.3, 0.5, 0.3, "laplace", 1.0, "per_hospital", 4, 6.0, 0.17)


def at_monitor_setting(cfg, hospitals: int) -> bool:
    """Whether a run's settings are those MONITOR_MEASURED_SETTING names (``hospitals``:
    those with a test row)."""
    ev = cfg.evaluation
    setting = (ev.monitor_rate, ev.onset_share, ev.hourly_share, ev.onset_noise, ev.val_epsilon,
               cfg.privacy.aggregation, hospitals, cfg.privacy.max_grad_norm,
               math.nan if isinstance(ev.threshold, str) else float(ev.threshold))
    return all(a == b if isinstance(b, str) else abs(a - b) < 1e-9 for a, b in zip(setting, MONITOR_MEASURED_SETTING))


def threshold_coverage_words(cfg, hospitals: int) -> str:
    """The hour thresholds' and the margin's intervals' measured coverage, where measured
    at this run's settings (the monitor's; the release's grid, checkpoints and reading; no
    recalibration, whose own noise the intervals do not redraw; the data, the outcome and
    the training budget); else that it was not, and what it was where it was."""
    ev = cfg.evaluation if cfg is not None else None
    measured = (ev is not None and at_monitor_setting(cfg, hospitals) and not ev.calibrate
                and cfg.checkpoint_hours == [1, 6, 12, 24] and ev.score_bins == 10 and list(ev.logit_range) == [-7, 3]
                and ev.estimator == "skewnormal" and not cfg.validation_rounds()
                # the data and the training the 20 models had: set A whole, the mortality outcome, epsilon 1
                and not cfg.data.max_stays and Path(cfg.data.path).name == "set-a.tar.gz"
                and cfg.task.label_column == "In-hospital_death" and cfg.privacy.target_epsilon == 1.0)
    if measured:
        return THRESHOLD_INTERVAL_COVERAGE
    return ("their coverage was not measured at this run's settings; on " + THRESHOLD_COVERAGE_SETTING + ", "
            + THRESHOLD_COVERAGE_HELD)


def hour_list(test) -> str:
    """The checkpoint thresholds, each with its interval where it has one (a DP reading
    printed bare read as a setting: issue 22 asks every DP number's uncertainty on its line)."""
    return checkpoint_words(test.checkpoint_thresholds or {}, getattr(test, "checkpoint_intervals", None))


def monitor_words(test, coverage: str) -> str:
    """What the hourly monitor (``fedgru monitor``, ``fedgru predict --hourly``) flags, in words."""
    hours = list(getattr(test, "hour_thresholds", None) or [])
    if not hours:
        return ""
    checkpoints = hour_list(test)
    listed = (f"{checkpoints}, after hour {len(hours)} {hours[-1]:.3f}" if checkpoints else
              f"{hours[0]:.3f} after hour 1, {hours[-1]:.3f} after hour {len(hours)}")
    text = (f"The hourly monitor judges the risk after each hour against that hour's threshold, read from the "
            f"validation releases so that each hour flags the same share of patients ({listed}: early risks run "
            "high; hours in between are interpolated). ")
    margin = getattr(test, "onset_margin", None)
    interval = getattr(test, "onset_margin_interval", None)
    if getattr(test, "checkpoint_intervals", None) or interval:
        which = {(True, True): "Each hour's threshold and the margin are", (True, False): "Each hour's threshold is",
                 (False, True): "The margin is"}[(bool(getattr(test, "checkpoint_intervals", None)), bool(interval))]
        text += (f"{which} followed, where it has one, by a rough interval (nominal {INTERVAL_LEVEL:.0%}): "
                 "how far the release's noise and its reading may have moved them from what these validation "
                 "patients' exact risks give, not a range of patients' risks; other patients would move them by "
                 f"their own sampling error on top. {coverage[0].upper() + coverage[1:]}. ")
    if margin is None:
        return text + "Each hour flags on its own, so a stay's flag can go on and off. "
    within = f" ({interval[0]:.2f} to {interval[1]:.2f})" if interval else ""
    return text + (f"A stay is flagged from the first hour its risk passes that hour's threshold by {margin:.2f}{within} "
                   f"in log-odds, and stays flagged: read from the validation patients' onset histogram (a DP release) "
                   f"so that {getattr(test, 'monitor_rate', 0) or 0:.0%} of them are flagged at some hour"
                   f"{': ' + levels if (levels := flag_levels_words(test)) else ''}. ")


def flag_levels_words(test) -> str:
    """The risks that raise the monitor's flag, after hour 1 and after the last hour, each
    with its interval where it has one (server.results.flag_level_intervals: DP readings,
    not settings), as predict --hourly's flag_level column prints them: a ward setting up
    an alert should not have to add a margin in log-odds itself. "" without a margin."""
    hours = list(getattr(test, "hour_thresholds", None) or [])
    margin = getattr(test, "onset_margin", None)
    if not hours or margin is None:
        return ""
    levels = raising_levels(np.asarray(hours, dtype=np.float64), margin)  # what the monitor flags at
    intervals = getattr(test, "flag_level_intervals", None) or {}

    def level(hour: int) -> str:
        bounds = intervals.get(str(hour))
        return f"{levels[hour - 1]:.3f}" + (f" ({bounds[0]:.3f}-{bounds[1]:.3f})" if bounds else "")

    return f"a risk of {level(1)} after hour 1, {level(len(hours))} after hour {len(hours)}"


def baseline_section(run: RunFolder) -> Section | None:
    if not run.baselines:
        return None
    rows = []
    test = run.metrics.test
    if test is not None and test.pooled is not None:
        eps = max((h.epsilon or 0 for h in run.privacy.hospitals.values()), default=None) if run.privacy else None
        if test.exact is not None:  # a simulation: scored exactly, as the baselines are
            rows.append(["federated (this run, exact: simulation only)", test.exact.auroc, test.exact.auprc, eps])
        else:  # the DP reading, a number only with its interval
            found = test.intervals.get("pooled", {})
            rows.append(["federated (this run, from the DP releases)", with_interval(test.pooled.auroc, found.get("auroc")),
                         with_interval(test.pooled.auprc, found.get("auprc")), eps])
    for kind, b in run.baselines.items():
        rows.append([kind, b.pooled.auroc, b.pooled.auprc, max(b.epsilon.values()) if b.epsilon else None])
    return Section("What federation buys (same splits)", [
        Table(["model", "pooled test AUROC", "pooled test AUPRC", "epsilon"], rows)
    ])


def data_section(partition: Partition | None) -> Section | None:
    s = partition.data_summary if partition else None
    if s is None:
        return None
    return Section("Data summary", [Bullets([
        f"Stays read: {s.stays_read}, used: {s.stays_used}, without outcome: {s.stays_without_outcome}, "
        f"with a missing label: {s.stays_with_missing_label}",
        f"Class counts: {_counts(s.class_counts)}",
        f"Stays with no observation in the window: {s.read.stays_without_observations}",
        f"Values set to missing (outside plausibility range): {_counts(s.preprocess.out_of_range)}",
        f"Values written as nan or inf (set aside): {_counts(s.read.non_finite)}",
        f"Observations after the window: {s.preprocess.after_window}",
        f"Unknown descriptors: {_counts(s.preprocess.static_unknown)}",
    ])])


def _counts(counts: dict) -> str:
    """``survived 3446, died 554``; "none" for nothing."""
    items = [(k, v) for k, v in counts.items() if v]
    return ", ".join(f"{k} {v}" for k, v in items) if items else "none"


def not_evaluated_section(run: RunFolder) -> Section | None:
    why = run.metrics.not_evaluated
    return Section("No evaluation", [why[0].upper() + why[1:] + "."]) if why else None
