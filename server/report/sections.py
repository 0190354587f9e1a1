"""The report's sections, each from the run folder's records: settings, test results,
what federation buys, privacy (and each hospital's officer statement), groups of
patients, importance, audit, data."""

from __future__ import annotations

import math
from pathlib import Path

from common.config import ExperimentConfig
from common.document import Bullets, Image, Section, Statement, Table
from common.estimates import (
    CALIBRATION_INTERVAL_COVERAGE,
    HOSPITAL_INTERVAL_COVERAGE,
    INTERVAL_LEVEL,
    MAX_PAIRS_IN_ONE_BIN,
    MIN_SIGNAL,
    interval_coverage,
)
from common.metrics import METRIC_NAMES, Metrics, format_number, with_interval

from ..records import AuditResult, HospitalPrivacy, Partition, RunPrivacy, StartRecord
from .plots import plot_epsilon, plot_reliability
from .run_folder import RunFolder

PHYSIONET_CITATION = (
    "Data: PhysioNet/Computing in Cardiology Challenge 2012 (Open Data Commons Attribution 1.0). "
    "Silva I, Moody G, Scott DJ, Celi LA, Mark RG. Predicting In-Hospital Mortality of ICU Patients: "
    "The PhysioNet/Computing in Cardiology Challenge 2012. Comput Cardiol 2012;39:245-248."
)

RNG_NOTE = (
    "DP noise and Poisson sampling use torch's generator seeded from the operating system's entropy at "
    "each hospital. It is not a cryptographically secure generator: Opacus's secure mode needs torchcsprng, "
    "which does not install with current torch. Floating-point Gaussian sampling is also known to leak "
    "slightly more than the idealised mechanism; the epsilons above are those of the idealised mechanism."
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


GROUP_WORDS = {
    "train": ("training", "the model updates of every round"),
    "val": ("validation", "noisy score histograms"),
    "test": ("test", "noisy score histograms"),
}


def officer_statement(name: str, h: HospitalPrivacy, privacy: RunPrivacy) -> str:
    """The plain-language paragraph a hospital's privacy officer can sign."""
    if not privacy.dp_enabled:
        return (
            f"For the patients of hospital {name}: this run trained without differential privacy, so the "
            "model weights it released carry no formal privacy guarantee."
        )
    if h.delta is None or h.accountant is None or not h.groups:
        why = f" ({h.reason})" if h.reason else ""
        return (
            f"For the patients of hospital {name}: this run holds no record of any release about them: the hospital "
            f"{h.state.words}{why}. What it released in other runs is in its own ledger (`fedgru hospital show`)."
        )
    delta, other = h.delta, "PRV" if h.accountant == "rdp" else "RDP"
    scope = "during this run" + (f" and the {len(h.earlier_runs)} earlier run(s) in its ledger" if h.earlier_runs else "")
    groups = []
    for split, g in h.groups.items():
        label, what = GROUP_WORDS[split]
        other_eps = g.epsilon_prv if other == "PRV" else g.epsilon_rdp
        second = (f"with its own share of secure aggregation's noise alone, if every other hospital colluded with "
                  f"the coordinator: epsilon {format_number(g.epsilon_alone)}" if g.epsilon_alone is not None
                  else f"{other} accounting: epsilon {format_number(other_eps)}")
        groups.append(
            f"its {label} patients ({what}, {g.releases} {'release' if g.releases == 1 else 'releases'}): "
            f"({format_number(g.epsilon)}, {delta:.0e})-DP "
            f"({second})"
        )
    worst = max(g.epsilon for g in h.groups.values())
    exact = "" if privacy.evaluation_dp else (
        " In this run the score histograms were exact (a comparison simulation): they carry no DP guarantee."
    )
    left = (f"{format_number(h.remaining)} remains" if h.remaining is None or h.remaining >= 0.0005
            else "it is spent (less than 0.001 remains)")
    budget_text = f" The training patients' budget is epsilon = {format_number(h.budget)}; {left}." if h.budget else ""
    return (
        f"For every patient of hospital {name}, everything {name} released about that patient {scope} satisfies "
        f"differential privacy ({h.accountant.upper()} accounting), group by group: " + "; ".join(groups) + ". "
        + ("Each stay is in one of these groups only (its split is fixed by a keyed hash of its id), so a stay's "
           "epsilon is that of its group and the groups' epsilons do not add up for it, as long as the hospital's "
           "split settings (policy.split) stay as they were; a patient with several stays in different groups "
           "carries the sum of those groups' epsilons. " if len(groups) > 1 else "")
        + f"In plain words: whether or not any one patient's record was used, the probability of anything an "
        f"outsider can observe changes by at most a factor of {math.exp(worst):.2f} (e to the power epsilon), "
        f"except with probability {delta:.0e}. Released without DP, and about no single patient: the hospital's "
        "name, the number of stays in each split, and the settings and list of its releases (its ledger)."
        + exact + budget_text
    )


def settings_section(cfg: ExperimentConfig, privacy: RunPrivacy | None, start: StartRecord | None) -> Section:
    task, tr, pr, md = cfg.task, cfg.training, cfg.privacy, cfg.model
    sigma = (
        f"noise multiplier {pr.noise_multiplier}" if pr.noise_multiplier > 0
        else f"target epsilon {pr.target_epsilon} for the planned run (sigma calibrated once)"
    )
    dp = (
        f"on; clipping norm {pr.max_grad_norm}, {sigma}, delta {pr.delta}, budget {pr.max_epsilon} per hospital, "
        f"{pr.accountant.upper()} accountant drives decisions" if pr.enabled else "off"
    )
    return Section("Settings", [Bullets([
        f"Task: `{task.label_column}`, classes {', '.join(task.classes)}",
        f"Data: `{cfg.data.path}` ({cfg.data.format}"
        + ("" if Path(cfg.data.path).is_absolute() else "; the path is relative to the project folder")
        + f"); partition `{cfg.partition.scheme}`",
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
    ])])


def is_secure(run: RunFolder) -> bool:
    """The run used secure aggregation: its evaluation releases are sums over hospitals."""
    return run.config is not None and run.config.privacy.enabled and run.config.privacy.aggregation == "secure"


def test_results_section(run: RunFolder) -> Section | None:
    test = run.metrics.test
    if test is None:
        return None
    dp = bool(run.privacy.evaluation_dp) if run.privacy else run.metrics.estimator != "binned"
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
        f"parametric bootstrap of the release; {interval_coverage('secure' if secure else 'per_hospital')}). A value on other patients differs by their own "
        "sampling error on top. A row the noise drowns shows no number. " if dp else ""
    )
    if dp and not secure and any(test.intervals.get(n) for n in test.hospitals):
        intervals += f"For one hospital's row: {HOSPITAL_INTERVAL_COVERAGE}. "
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
        "PhysioNet/CinC 2012 challenge's event-1 score). " + calibration + intervals + exact + monitor_words(test),
    ])


def monitor_words(test) -> str:
    """What the hourly monitor (``fedgru monitor``, ``fedgru predict --hourly``) flags, in words."""
    hours = list(getattr(test, "hour_thresholds", None) or [])
    if not hours:
        return ""
    text = (f"The hourly monitor judges the risk after each hour against that hour's threshold, read from the "
            f"validation releases so that each hour flags the same share of patients ({hours[0]:.3f} after hour 1, "
            f"{hours[-1]:.3f} after hour {len(hours)}: early risks run high). ")
    margin = getattr(test, "onset_margin", None)
    if margin is None:
        return text + "Each hour flags on its own, so a stay's flag can go on and off. "
    return text + (f"A stay is flagged from the first hour its risk passes that hour's threshold by {margin:.2f} in "
                   f"log-odds, and stays flagged: read from the validation patients' onset histogram (a DP release) so "
                   f"that {getattr(test, 'monitor_rate', 0) or 0:.0%} of them are flagged at some hour. ")


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


# What "RDP" and "PRV" in the tables mean, for a reader who has not met the accountants.
ACCOUNTANTS_WORDS = (
    "Two accountants read the same ledger: RDP (Renyi differential privacy; Mironov, CSF 2017; Mironov, Talwar & "
    "Zhang 2019 for the subsampled Gaussian), the familiar, more conservative bound, and PRV (privacy loss random "
    "variables; Gopi, Lee & Wutschitz, NeurIPS 2021), a tighter numerical bound. They are two readings of one set of "
    "releases, not two releases; `privacy.accountant` names the one that budgets are checked against."
)


def privacy_sections(run: RunFolder) -> list[Section]:
    privacy = run.privacy
    if privacy is None:
        return []
    sec = Section("Privacy", [f"Guarantee: {privacy.guarantee}."])
    if privacy.dp_enabled:
        secure = any(h.epsilon_alone is not None for h in privacy.hospitals.values())
        # secure aggregation: the second epsilon is the hospital's own noise alone (PRV has no Skellam analysis)
        header = ["hospital", "epsilon (RDP)", "epsilon, own noise alone" if secure else "epsilon (PRV)", "delta",
                  "budget", "remaining", "rounds", "steps", "noise multiplier", "clipping norm", "sample rate", "state"]
        rows = [
            [name, h.epsilon_rdp, h.epsilon_alone if secure else h.epsilon_prv, format_number(h.delta), h.budget, h.remaining, h.rounds_trained,
             sum(e.steps for e in h.history), h.noise_multiplier, h.max_grad_norm,
             h.history[-1].sample_rate if h.history else None, h.state.words]
            for name, h in sorted(privacy.hospitals.items())
        ]
        sec.blocks.append("Training patients (secure aggregation with distributed Skellam noise; the noise multiplier "
                          "counts the min_honest hospitals each hospital's policy counts on):" if secure
                          else "Training patients (DP-SGD):")
        sec.blocks.append(Table(header, rows))
        sec.blocks.append(ACCOUNTANTS_WORDS)
        group_rows = [
            [name, GROUP_WORDS[split][0], g.epsilon_rdp, g.epsilon_alone if secure else g.epsilon_prv,
             format_number(h.delta), g.releases, g.this_run]
            for name, h in sorted(privacy.hospitals.items()) for split, g in h.groups.items()
        ]
        sec.blocks.append("Every group of patients, over each hospital's whole ledger:")
        sec.blocks.append(Table(["hospital", "patients", "epsilon (RDP)",
                                 "epsilon, own noise alone" if secure else "epsilon (PRV)", "delta", "releases",
                                 "in this run"], group_rows))
        if plot_epsilon(run.metrics, privacy, run.path / "epsilon.png"):
            sec.blocks.append(Image(run.path / "epsilon.png", "Cumulative epsilon per round (dotted: budgets; hospitals "
                                                              "that spent alike draw one line over another)"))
    sections = [sec]
    level = privacy.hospital_level
    if level is not None:
        sections.append(Section("Second guarantee: hospital-level DP", [
            f"Each hospital's update was clipped to L2 norm {level.clipping_norm} and the aggregate noised "
            f"(noise multiplier {level.noise_multiplier}); over {level.releases} releases this gives "
            f"epsilon = {format_number(level.epsilon)} at delta = {format_number(level.delta)} ({level.accountant}).",
            level.guarantee,
        ]))
    sections.append(Section("Releases not covered by DP", [
        Bullets([f"{r.field} ({r.when}): {r.reveals}" for r in privacy.non_dp_releases])
    ]))
    statements = Section("Statements for each hospital's privacy officer")
    for name, h in sorted(privacy.hospitals.items()):
        statements.blocks.append(Statement(officer_statement(name, h, privacy)))
    statements.blocks.append(RNG_NOTE)
    sections.append(statements)
    return sections


def subgroup_section(run: RunFolder) -> Section | None:
    test = run.metrics.test
    if test is None or not test.subgroups:
        return None
    central = run.baselines.get("central") if run.baselines else None
    exact = {(g.grouping, g.group): g for g in central.subgroups} if central else {}
    header = ["grouping", "group", "patients", "deaths", "AUROC", f"sensitivity at {test.threshold:.3f}",
              "calibration: observed / predicted"]
    if exact:
        header.append("central no-DP AUROC (exact)")
    least = getattr(test, "subgroup_least", None)
    # The DP noise's sd on one class's count in a group (the read rule asks MIN_SIGNAL of them):
    # an unread row shows the 95% range its noisy counts give, so a reader can tell a group that
    # is small from one that may be empty (a data set may leave "unknown" empty; the coordinator
    # cannot know that, and must not be told). A range, not the noisy count: a count below 0 is
    # an impossible number to show a clinician.
    count_sd = least / MIN_SIGNAL if least else None
    rows = []
    for g in test.subgroups:
        m = g.metrics
        if m is None and count_sd is not None:
            cells = [g.grouping, g.group, _count_range(g.patients, 1.96 * math.sqrt(2) * count_sd),  # two noisy sums
                     _count_range(g.deaths, 1.96 * count_sd), g.note, "", ""]
        elif m is None:
            cells = [g.grouping, g.group, "", "", g.note, "", ""]
        else:
            observed = sum(p.observed * p.patients for p in g.calibration)
            predicted = sum(p.predicted * p.patients for p in g.calibration)
            ratio = f"{observed / predicted:.2f}" if predicted > 0 else "n/a"
            cells = [g.grouping, g.group, round(g.patients), round(g.deaths), m.auroc, m.sensitivity, ratio]
        if exact:
            ref = exact.get((g.grouping, g.group))
            cells.append(ref.metrics.auroc if ref is not None and ref.metrics is not None else None)
        rows.append(cells)
    blocks: list = [
        Table(header, rows),
        "Pooled over hospitals from their test patients' score histograms per group, released with DP noise: "
        "patients and deaths are noisy counts (where a row is not read, the 95% range they give: a range that starts "
        "at 0 cannot tell a small group from an empty one), and a group whose counts are too small for the noise says "
        "so instead of showing noise as a metric (each hospital can see its own groups exactly, and release nothing, "
        "with `fedgru evaluate --model model.pt --data EXPORT --outcomes OUTCOMES --subgroups`). Calibration is the observed death rate over the mean predicted "
        "risk (1: calibrated; below 1: risks too high for the group)."
        + (" The last column is the same model trained centrally without DP, scored exactly on the same "
           "patients: where it differs much more than elsewhere, DP or federation hurts that group more." if exact else ""),
    ]
    unread = [g for g in test.subgroups if g.metrics is None and g.note.startswith("too few")]
    if unread and least:
        blocks.append(group_size_words(run, least, len(unread) == len(test.subgroups)))
    overall = calibration_words(test.calibration_curve, bool(test.calibration), getattr(test, "calibration_ratio", None))
    if overall:
        blocks.append(overall)
    curves = {"all test patients": test.calibration_curve}
    by_group = [g for g in test.subgroups if g.metrics is not None and g.grouping == test.subgroups[0].grouping]
    curves.update({g.group: g.calibration for g in by_group})
    if plot_reliability(curves, run.path / "calibration.png"):
        blocks.append(Image(run.path / "calibration.png", "Reliability diagram: observed rate against mean predicted risk in "
                                                          "tenths of the test patients by risk, both read from the DP "
                                                          "test releases (the run's estimator), not from exact counts"))
    return Section("Whom the model fails: test patients by group", blocks)


def _count_range(noisy: float, spread: float) -> str:
    """The range of true counts a noisy count leaves (noisy ± spread, never below 0)."""
    return f"{max(0.0, noisy - spread):.0f}-{max(0.0, noisy + spread):.0f}"


# An observed/predicted interval entirely inside this band is a real but small difference
# (risks within a fifth of the rate): the report names its size instead of warning.
SLIGHT_MISCALIBRATION = (0.8, 1.25)


def calibration_words(curve, recalibrated: bool, with_interval: list[float] | None = None) -> str:
    """One sentence on whether the final model's risks run high or low over all test
    patients (observed rate over mean predicted risk, both read from the DP releases),
    with the reading's interval (``with_interval``: [reading, low, high], from the same
    bootstrap as the metrics'); a run folder from before it has the noise band instead."""
    observed = sum(p.observed * p.patients for p in curve)
    predicted = sum(p.predicted * p.patients for p in curve)
    if not curve or not predicted > 0:
        return ""
    ratio = observed / predicted
    if with_interval is not None:
        ratio, low, high = with_interval
        read = (f"Over all test patients the observed rate is {ratio:.2f} ({low:.2f}-{high:.2f}) times the mean "
                f"predicted risk, as read from the DP releases (the interval as the metrics', nominal "
                f"{INTERVAL_LEVEL:.0%}; {CALIBRATION_INTERVAL_COVERAGE})")
        if low <= 1 <= high:
            return read + ": its interval holds 1, so no clear sign either way."
        if SLIGHT_MISCALIBRATION[0] <= low and high <= SLIGHT_MISCALIBRATION[1]:
            # a difference the interval proves but a clinician would not act on: say its size, not an alarm
            return (read + f": the model's risks run slightly {'low' if ratio > 1 else 'high'}, by about "
                    f"{abs(ratio - 1):.0%}, too little to change how they are read.")
    else:
        # The DP noise alone moves this reading: a model calibrated by construction read 0.83-1.30 (5-95%) over 40
        # default-sized releases (a review, 2026-12-06), so only a reading beyond that says anything.
        read = (f"Over all test patients the observed rate is {ratio:.2f} times the mean predicted risk, as read from "
                "the DP releases")
        if 0.75 <= ratio <= 1.33:
            return (read + ": within what their noise alone gives a calibrated model at the default's size "
                    "(about 0.83-1.30), so no clear sign either way.")
    way = "low (a risk understates" if ratio > 1 else "high (a risk overstates"
    return (read + f": the model's risks run {way} the chance of the outcome), so read them as a ranking and "
            "against the run's thresholds, not as probabilities"
            + (" (even after the recalibration above)." if recalibrated else
               " (evaluation.calibrate: true refits the risk scale on the pooled DP validation releases)."))


def group_size_words(run: RunFolder, least: float, none_read: bool) -> str:
    """What size of federation a group needs before its row is read: the least pooled
    count of deaths and of survivors in the group's test patients, and what that is in
    the whole federation at the config's test split."""
    cfg = run.config
    split = (1 / cfg.split.folds if cfg.split.folds else cfg.split.test) if cfg else None
    text = (("No group could be read at this run's size. " if none_read else "")
            + f"A group's row is read when its pooled test patients hold at least {least:.0f} deaths and "
            f"{least:.0f} survivors, as noisy counts (2 sds of the DP noise on a group's count, at this run's noise "
            "and number of hospitals; the noise on a pooled count grows with the square root of the number of "
            "hospitals, and falls as evaluation.test_epsilon or evaluation.subgroup_share rise).")
    if split:
        text += (f" With {split:.0%} of each hospital's stays in its test split (the run's config; a deployed hospital's "
                 f"own policy.split decides its own), that is about {least / split:,.0f} deaths and as many survivors "
                 "of the group across the federation.")
    return text


MAX_IMPORTANCE_ROWS = 50  # every input of the default model (20) and of the 37-variable one (41)


def importance_section(run: RunFolder) -> Section | None:
    test = run.metrics.test
    if test is None or not test.importance:
        return None
    sd = test.importance_noise or 0.0

    def size(value: float) -> str | float:
        """A mean size is never below 0: the noise can take it there. With the noise's 95% interval (the
        release is the exact mean plus Gaussian noise of a known sd, so value +- 1.96 sd holds it 95% of the time)."""
        if not sd:
            return value
        return f"{max(0.0, value):.3f} ({max(0.0, value - 1.96 * sd):.3f}-{max(0.0, value + 1.96 * sd):.3f})"

    rows = [[name, size(value)] for name, value in list(test.importance.items())[:MAX_IMPORTANCE_ROWS]]
    shown = (f"The {len(rows)} largest of the model's {len(test.importance)} inputs (all are in metrics.json). "
             if len(rows) < len(test.importance) else "")
    return Section("What the model leans on (test patients, DP)", [
        Table(["input", "mean |contribution| to the log-odds" + (" (95% interval for the DP noise)" if sd else "")], rows),
        shown +
        "For each test patient, the size of each variable's and descriptor's contribution to the log-odds of "
        "the risk (exact for the per-variable model, integrated gradients otherwise), clipped per patient and "
        + ("summed over the hospitals under secure aggregation, each adding its share of Skellam noise: a DP release "
           "about the test patients. " if is_secure(run) else
           "summed at each hospital with Gaussian noise, then pooled: a DP release about the test patients. ")
        + (f"The noise on each mean has a standard deviation of {test.importance_noise:.3f}: differences smaller "
           "than about twice that are not meaningful, and a mean the noise took below 0 shows as 0. "
           if test.importance_noise else "")
        + "Each contribution is measured against a normal patient in whom every input is recorded, so an input's "
          "size here includes what its absence tells the model: one often not recorded (a patient's height, say) "
          "can rank high for that alone. `fedgru explain` shows a stay's "
          "input as 'not observed' with its own contribution.",
    ])


def audit_section(audit: AuditResult | None) -> Section | None:
    if audit is None:
        return None
    claimed = audit.epsilon_claimed
    verdict = ("no claim to check (DP off)" if not math.isfinite(claimed) else
               "consistent" if audit.epsilon_lower_bound <= claimed else "ABOVE the claim: a leak")
    return Section("Privacy audit (one training run)", [
        Table(["hospital", "canaries", "guesses", "right", "epsilon lower bound (95%)", "claimed epsilon", "verdict"],
              [[audit.hospital, audit.canaries, audit.guesses, audit.correct, audit.epsilon_lower_bound, claimed, verdict]]),
        f"An empirical check of the DP mechanism (Steinke, Nasr & Jagielski, NeurIPS 2023): {audit.canaries} "
        f"{audit.canary_kind} were each put into {audit.hospital}'s training with probability 1/2; from what "
        f"{audit.hospital} released, the auditor guessed which; this many right guesses rule out, at "
        f"{audit.confidence:.0%} confidence, any epsilon below the bound. A bound above the claimed epsilon would "
        "mean the implementation leaks more than its accounting says.",
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


def preflight_section(run: RunFolder) -> Section | None:
    """Each hospital's answer to the run's plan: the noise it accepted to train with and
    why, each group's epsilon after the planned releases and its budget left before;
    or why it refused and the change that would fit."""
    answers = run.metrics.preflight
    if not answers:
        return None
    rows = []
    for a in sorted(answers, key=lambda a: a.hospital):
        left = " / ".join(format_number(a.remaining.get(g), 3) for g in ("train", "val", "test")) if a.remaining else ""
        if a.accepted:
            after = " / ".join(format_number(a.planned.get(g), 3) for g in ("train", "val", "test"))
            rows.append([a.hospital, "accepts", f"{a.noise_multiplier:.3g} ({a.noise_set_by})", after, left])
        else:
            rows.append([a.hospital, f"refuses: {a.reason}", "", "", left])
    accepted = sum(a.accepted for a in answers)
    return Section("Preflight: the plan each hospital agreed to", [
        Table(["hospital", "answer", "noise multiplier (set by)", "epsilon after the run: train / val / test",
               "budget left before: train / val / test"], rows),
        f"{accepted} of {len(answers)} hospitals accepted the run's whole plan before anything was spent; a hospital "
        "that refused was asked nothing further. Each fits its own noise: the run's target or setting, raised where "
        "its per-round ceiling, its remaining budget or its noise floor needs more.",
    ])


def not_evaluated_section(run: RunFolder) -> Section | None:
    why = run.metrics.not_evaluated
    return Section("No evaluation", [why[0].upper() + why[1:] + "."]) if why else None
