"""Run reports a clinical researcher and a privacy officer can read.

``write_report(run_dir)`` reads a run folder's records (``server.records``) and writes
``report.md`` (with PNG plots beside it) and ``report.html`` (one self-contained file,
plots embedded), and returns a short text summary. The privacy part states, per
hospital: epsilon under both RDP and PRV accounting at the hospital's delta, budget and
what remains, rounds, steps, noise multiplier, clipping norm and sample rate; which
releases are not covered by DP; the data exports' keyed labels; and a plain-language statement
that the hospital's privacy officer can sign.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, fields
from pathlib import Path

import matplotlib
import yaml

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from common.config import ConfigError, ExperimentConfig  # noqa: E402
from common.document import Bullets, Image, Section, Statement, Table, markdown, to_html  # noqa: E402
from common.estimates import INTERVAL_COVERAGE, INTERVAL_LEVEL  # noqa: E402
from common.messages import Split  # noqa: E402
from common.metrics import Metrics, format_metrics, format_number  # noqa: E402
from common.subgroups import CalibrationPoint  # noqa: E402

from .records import (  # noqa: E402
    AuditResult,
    BaselineResult,
    HospitalPrivacy,
    Partition,
    RunMetrics,
    RunPrivacy,
    StartRecord,
    load_record,
    load_records,
)

METRIC_LABELS = {
    "auroc": "AUROC", "auprc": "AUPRC", "accuracy": "accuracy", "sensitivity": "sensitivity",
    "specificity": "specificity", "f1": "F1", "brier": "Brier", "event1_score": "event-1", "n": "n",
}

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



MAX_LISTED = 12  # more hospitals than this: summaries instead of one line (or plot line) each

# ----------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------


def _finish(fig, ax, path: Path, ylabel: str, title: str) -> None:
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _nan(value: float | None) -> float:
    return math.nan if value is None else float(value)


def plot_auroc(metrics: RunMetrics, path: Path) -> bool:
    rounds = metrics.rounds
    if not rounds:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [r.round for r in rounds]
    ax.plot(xs, [r.pooled_val.auroc if r.pooled_val else math.nan for r in rounds], "k-o", lw=2, label="pooled")
    names = sorted({n for r in rounds for n in r.hospitals})
    for i, name in enumerate(names):
        ys = [_nan(getattr(r.hospitals[name].val, "auroc", None)) if name in r.hospitals else math.nan for r in rounds]
        if len(names) > MAX_LISTED:  # too many to tell apart: one grey line each, one legend entry
            ax.plot(xs, ys, "-", color="grey", lw=0.6, alpha=0.3, label="each hospital" if i == 0 else None)
        else:
            ax.plot(xs, ys, "--", alpha=0.7, label=name)
    _finish(fig, ax, path, "validation AUROC", "Utility: validation AUROC per round")
    return True


def plot_epsilon(metrics: RunMetrics, privacy: RunPrivacy, path: Path) -> bool:
    if not metrics.rounds or not privacy.dp_enabled:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [r.round for r in metrics.rounds]
    many = len(privacy.hospitals) > MAX_LISTED
    for i, (name, h) in enumerate(sorted(privacy.hospitals.items())):
        ys = [_nan(r.hospitals[name].epsilon) if name in r.hospitals else math.nan for r in metrics.rounds]
        if many:  # too many to tell apart: one grey line each, budgets once
            ax.plot(xs, ys, "-", color="grey", lw=0.6, alpha=0.3, label="each hospital" if i == 0 else None)
            continue
        line = ax.plot(xs, ys, "-o", ms=3, label=name)[0]
        if h.budget:
            ax.axhline(h.budget, color=line.get_color(), ls=":", lw=1)
    if many:
        for budget in sorted({h.budget for h in privacy.hospitals.values() if h.budget}):
            ax.axhline(budget, color="k", ls=":", lw=1)
    _finish(fig, ax, path, "cumulative epsilon (dotted: budget)", "Privacy spent per hospital")
    return True


# ----------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------


@dataclass
class RunFolder:
    """Everything a run folder holds, as records (None where the run did not write it)."""

    path: Path
    config: ExperimentConfig | None
    metrics: RunMetrics
    privacy: RunPrivacy | None
    partition: Partition | None
    baselines: dict[str, BaselineResult] | None
    audit: AuditResult | None

    @classmethod
    def load(cls, run_dir: Path) -> RunFolder:
        return cls(
            path=run_dir,
            config=_load_config(run_dir / "config.yaml"),
            metrics=load_record(run_dir / "metrics.json", RunMetrics) or RunMetrics(run_id="?"),
            privacy=load_record(run_dir / "privacy.json", RunPrivacy),
            partition=load_record(run_dir / "partition.json", Partition),
            baselines=load_records(run_dir / "baselines.json", BaselineResult),
            audit=load_record(run_dir / "audit.json", AuditResult),
        )


def _load_config(path: Path) -> ExperimentConfig | None:
    if not path.is_file():
        return None
    try:
        return ExperimentConfig.from_dict(yaml.safe_load(path.read_text()), origin=str(path), fill_defaults=True)
    except ConfigError:
        return None  # a config of another version: the report goes on without the settings


ESTIMATOR_WORDS = {  # metrics.json's estimator -> how the report says the metrics were read
    "binormal": "They are read from a normal distribution of logits fitted to each class's noisy histogram "
                "(evaluation.estimator: binormal), not from its counts clipped at zero, which pull the AUROC towards "
                "0.5; AUROC reads the fitted distributions on a grid finer than the bins, AUPRC the fitted counts "
                "in the bins.",
    "binned": "They are read from the counts in the bins (exact histograms, or evaluation.estimator: binned): "
              "noisy counts are clipped at zero, which pulls the AUROC towards 0.5, and AUROC and AUPRC lose the "
              "order of patients whose scores share a bin.",
    "": "AUROC and AUPRC lose the order of patients whose scores share a bin.",
}


def _metric_row(label: str, m: Metrics) -> list:
    return [label] + [getattr(m, f.name) for f in fields(Metrics)]


GROUP_WORDS = {
    "train": ("training", "the model weights of every round"),
    "val": ("validation", "noisy score histograms"),
    "test": ("test", "noisy score histograms"),
}


def officer_statement(name: str, h: HospitalPrivacy, privacy: RunPrivacy) -> str:
    """The plain-language paragraph a hospital's privacy officer can sign."""
    if not privacy.dp_enabled or h.delta is None or h.accountant is None or not h.groups:
        return (
            f"For the patients of hospital {name}: this run trained without differential privacy, so the "
            "model weights it released carry no formal privacy guarantee."
        )
    delta, other = h.delta, "PRV" if h.accountant == "rdp" else "RDP"
    scope = "during this run" + (f" and the {len(h.earlier_runs)} earlier run(s) in its ledger" if h.earlier_runs else "")
    groups = []
    for split, g in h.groups.items():
        label, what = GROUP_WORDS[split]
        other_eps = g.epsilon_prv if other == "PRV" else g.epsilon_rdp
        groups.append(
            f"its {label} patients ({what}, {g.releases} release(s)): ({format_number(g.epsilon)}, {delta:.0e})-DP "
            f"({other} accounting: epsilon {format_number(other_eps)})"
        )
    worst = max(g.epsilon for g in h.groups.values())
    exact = "" if privacy.evaluation_dp else (
        " In this run the score histograms were exact (a comparison simulation): they carry no DP guarantee."
    )
    budget_text = (
        f" The training patients' budget is epsilon = {format_number(h.budget)}; {format_number(h.remaining)} remains."
        if h.budget else ""
    )
    return (
        f"For every patient of hospital {name}, everything {name} released about that patient {scope} satisfies "
        f"differential privacy ({h.accountant.upper()} accounting), group by group: " + "; ".join(groups) + ". "
        f"In plain words: whether or not any one patient's record was used, the probability of anything an "
        f"outsider can observe changes by at most a factor of {math.exp(worst):.2f} (e to the power epsilon), "
        f"except with probability {delta:.0e}. Released without DP, and about no single patient: the hospital's "
        "name, the number of stays in each split, and the settings and list of its releases (its ledger)."
        + exact + budget_text
    )


def _settings(cfg: ExperimentConfig, privacy: RunPrivacy | None, start: StartRecord | None) -> Section:
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
        f"Data: `{cfg.data.path}` ({cfg.data.format}); partition `{cfg.partition.scheme}`",
        f"Model: {md.architecture} GRU layers {md.gru_hidden}, head {md.head_hidden}, dropout {md.dropout} ({md.gru_impl} GRU)",
        "Start: " + (
            f"the weights of `{start.path}` (sha256 {start.sha256[:16]}..."
            + (f", the model of run `{start.source_run}`" if start.source_run else "")
            + "), chosen by the coordinator; how that model was trained, and what it cost in privacy, is outside this run"
            if start else f"`{md.init}` initialisation" + (", output layer at zero" if md.zero_init_head else "")
        ),
        f"Local training: {tr.local_epochs} epoch(s) per round, expected batch {tr.batch_size}, "
        f"{tr.optimizer} lr {tr.lr} ({tr.lr_schedule})",
        f"Aggregation: {cfg.strategy.name}; {cfg.run.rounds} rounds planned",
        f"DP-SGD: {dp}",
    ])])


def _test_section(run: RunFolder) -> Section | None:
    test = run.metrics.test
    if test is None:
        return None
    header = ["hospital"] + list(METRIC_LABELS.values())
    rows = [_metric_row("pooled", test.pooled)] if test.pooled else []
    rows += [_metric_row(n, test.hospitals[n]) for n in sorted(test.hospitals)]
    calibration = (
        f"The risks were recalibrated on the pooled validation histograms (Platt scaling: logit -> "
        f"{test.calibration.scale:.3f} x logit {test.calibration.shift:+.3f}), which keeps every patient's rank."
        if test.calibration else ""
    )
    interval = (
        f" How far the pooled AUROC may be from what the test patients' exact scores would give, for the DP noise "
        f"and the fit (a parametric bootstrap of the release, nominal {INTERVAL_LEVEL:.0%}): "
        f"{test.auroc_interval[0]:.3f} to {test.auroc_interval[1]:.3f}. A rough interval: {INTERVAL_COVERAGE}. "
        "The AUROC on other patients differs by their own sampling error on top."
        if test.auroc_interval else ""
    )
    return Section("Test results (final model)", [
        Table(header, rows),
        "Every metric here comes from the score histograms the hospitals released, with DP noise (unless the "
        "run turned it off): a hospital's own row is noisier than the pooled one, and small hospitals' rows can be "
        "far off. " + ESTIMATOR_WORDS.get(run.metrics.estimator, ESTIMATOR_WORDS[""]) + " The Brier score reads "
        "risks at the bin centres. "
        f"Accuracy, sensitivity, specificity, F1 and event-1 flag a patient at a risk of {test.threshold:.3f} or "
        "more (evaluation.threshold; 'auto' picks the best event-1 score on the pooled validation histograms). "
        + calibration + interval,
    ])


def _baseline_section(run: RunFolder) -> Section | None:
    if not run.baselines:
        return None
    rows = []
    test = run.metrics.test
    if test is not None and test.pooled is not None:
        eps = max((h.epsilon or 0 for h in run.privacy.hospitals.values()), default=None) if run.privacy else None
        rows.append(["federated (this run)", test.pooled.auroc, test.pooled.auprc, eps])
    for kind, b in run.baselines.items():
        rows.append([kind, b.pooled.auroc, b.pooled.auprc, max(b.epsilon.values()) if b.epsilon else None])
    return Section("What federation buys (same splits)", [
        Table(["model", "pooled test AUROC", "pooled test AUPRC", "epsilon"], rows)
    ])


def _privacy_sections(run: RunFolder) -> list[Section]:
    privacy = run.privacy
    if privacy is None:
        return []
    sec = Section("Privacy", [f"Guarantee: {privacy.guarantee}."])
    if privacy.dp_enabled:
        header = ["hospital", "epsilon (RDP)", "epsilon (PRV)", "delta", "budget", "remaining", "rounds",
                  "steps", "noise multiplier", "clipping norm", "sample rate", "state"]
        rows = [
            [name, h.epsilon_rdp, h.epsilon_prv, format_number(h.delta), h.budget, h.remaining, h.rounds_trained,
             sum(e.steps for e in h.history), h.noise_multiplier, h.max_grad_norm,
             h.history[-1].sample_rate if h.history else None, h.state.value]
            for name, h in sorted(privacy.hospitals.items())
        ]
        sec.blocks.append("Training patients (DP-SGD):")
        sec.blocks.append(Table(header, rows))
        group_rows = [
            [name, GROUP_WORDS[split][0], g.epsilon_rdp, g.epsilon_prv, format_number(h.delta), g.releases, g.this_run]
            for name, h in sorted(privacy.hospitals.items()) for split, g in h.groups.items()
        ]
        sec.blocks.append("Every group of patients, over each hospital's whole ledger:")
        sec.blocks.append(Table(["hospital", "patients", "epsilon (RDP)", "epsilon (PRV)", "delta", "releases",
                                 "in this run"], group_rows))
        if plot_epsilon(run.metrics, privacy, run.path / "epsilon.png"):
            sec.blocks.append(Image(run.path / "epsilon.png", "Cumulative epsilon per round (dotted: budgets)"))
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


def plot_reliability(curves: dict[str, list[CalibrationPoint]], path: Path) -> bool:
    """Observed against predicted risk by risk decile (a reliability diagram)."""
    curves = {name: points for name, points in curves.items() if points}
    if not curves:
        return False
    fig, ax = plt.subplots(figsize=(5.2, 5))
    ax.plot([0, 1], [0, 1], ":", color="grey", lw=1, label="perfect calibration")
    top = 0.05
    for name, points in curves.items():
        xs, ys = [p.predicted for p in points], [p.observed for p in points]
        top = max(top, *xs, *ys)
        ax.plot(xs, ys, "-o", ms=4, label=name)
    ax.set_xlim(0, min(1, top * 1.1))
    ax.set_ylim(0, min(1, top * 1.1))
    ax.set_xlabel("predicted risk (mean in each decile)")
    ax.set_ylabel("observed rate of the outcome")
    ax.set_title("Calibration of the final model (test patients)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _subgroup_section(run: RunFolder) -> Section | None:
    test = run.metrics.test
    if test is None or not test.subgroups:
        return None
    central = run.baselines.get("central") if run.baselines else None
    exact = {(g.grouping, g.group): g for g in central.subgroups} if central else {}
    header = ["grouping", "group", "patients", "deaths", "AUROC", f"sensitivity at {test.threshold:.2f}",
              "calibration: observed / predicted"]
    if exact:
        header.append("central no-DP AUROC (exact)")
    rows = []
    for g in test.subgroups:
        m = g.metrics
        if m is None:
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
        "patients and deaths are noisy counts, and a group whose counts are too small for the noise says so "
        "instead of showing noise as a number (each hospital can see its own groups exactly, and release nothing, "
        "with `fedgru evaluate --subgroups`). Calibration is the observed death rate over the mean predicted "
        "risk (1: calibrated; below 1: risks too high for the group)."
        + (" The last column is the same model trained centrally without DP, scored exactly on the same "
           "patients: where it differs much more than elsewhere, DP or federation hurts that group more." if exact else ""),
    ]
    curves = {"all test patients": test.calibration_curve}
    by_group = [g for g in test.subgroups if g.metrics is not None and g.grouping == test.subgroups[0].grouping]
    curves.update({g.group: g.calibration for g in by_group})
    if plot_reliability(curves, run.path / "calibration.png"):
        blocks.append(Image(run.path / "calibration.png", "Reliability diagram: observed against predicted risk by risk decile"))
    return Section("Whom the model fails: test patients by group", blocks)


def _importance_section(run: RunFolder) -> Section | None:
    test = run.metrics.test
    if test is None or not test.importance:
        return None
    rows = [[name, value] for name, value in list(test.importance.items())[:15]]
    return Section("What the model leans on (test patients, DP)", [
        Table(["input", "mean |contribution| to the log-odds"], rows),
        "For each test patient, the size of each variable's and descriptor's contribution to the log-odds of "
        "the risk (exact for the per-variable model, integrated gradients otherwise), clipped per patient and "
        "summed at each hospital with Gaussian noise, then pooled: a DP release about the test patients. "
        + (f"The noise on each mean has a standard deviation of {test.importance_noise:.3f}: differences smaller "
           "than about twice that are not meaningful." if test.importance_noise else ""),
    ])


def _audit_section(audit: AuditResult | None) -> Section | None:
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


def _data_section(partition: Partition | None) -> Section | None:
    s = partition.data_summary if partition else None
    if s is None:
        return None
    return Section("Data summary", [Bullets([
        f"Stays read: {s.stays_read}, used: {s.stays_used}, without outcome: {s.stays_without_outcome}, "
        f"with a missing label: {s.stays_with_missing_label}",
        f"Class counts: {s.class_counts}",
        f"Stays with no observation in the window: {s.read.stays_without_observations}",
        f"Values set to missing (outside plausibility range): {dict(sorted(s.preprocess.out_of_range.items()))}",
        f"Values written as nan or inf (set aside): {dict(sorted(s.read.non_finite.items()))}",
        f"Observations after the window: {s.preprocess.after_window}",
        f"Unknown descriptors: {dict(sorted(s.preprocess.static_unknown.items()))}",
    ])])


def build(run: RunFolder) -> tuple[str, list[Section]]:
    cfg, metrics = run.config, run.metrics
    title = f"fedgru run report: {cfg.run.name if cfg else run.path.name}"
    intro = Section("Run", [f"Run `{metrics.run_id}`, folder `{run.path}`."])
    if metrics.wall_seconds is not None:
        intro.blocks.append(f"Wall time: {metrics.wall_seconds:.1f} s for {len(metrics.rounds)} rounds.")
    sections = [intro]
    if cfg is not None:
        sections.append(_settings(cfg, run.privacy, run.metrics.start))
    if run.partition and run.partition.hospitals:
        rows = run.partition.hospitals
        header = ["hospital", "stays", *rows[0].classes, "train", "val", "test"]
        sections.append(Section("Hospitals", [Table(header, [r.cells() for r in rows])]))
    sections += [s for s in (_test_section(run), _baseline_section(run)) if s is not None]
    if plot_auroc(metrics, run.path / "auroc.png"):
        sections.append(Section("Utility per round", [
            Image(run.path / "auroc.png", "Validation AUROC per round"),
            "Each point reads a validation release made during training, with a small share of the validation "
            "budget and so the most noise; it is read from the counts clipped at zero (biased towards 0.5): a trend "
            "at best. The final model's numbers above are read with the run's estimator.",
        ]))
    sections += [s for s in (_subgroup_section(run), _importance_section(run)) if s is not None]
    sections += _privacy_sections(run)
    audit = _audit_section(run.audit)
    if audit is not None:
        sections.append(audit)
    data = _data_section(run.partition)
    if data is not None:
        sections.append(data)
    if cfg is not None and cfg.data.format == "physionet2012":
        sections.append(Section("Data source", [PHYSIONET_CITATION]))
    return title, sections


def summary_text(run: RunFolder) -> str:
    lines = [f"Run folder: {run.path}"]
    test = run.metrics.test
    if test is not None and test.pooled is not None:
        read = f"; {run.metrics.estimator} estimate" if run.metrics.estimator else ""
        lines.append(f"Pooled test: {format_metrics(test.pooled)}  (flagged at risk >= {test.threshold:.3f}{read})")
        if test.auroc_interval:
            low, high = test.auroc_interval
            lines.append(f"  AUROC rough interval for the DP noise: {low:.3f} to {high:.3f} (nominal "
                         f"{INTERVAL_LEVEL:.0%}; {INTERVAL_COVERAGE})")
    privacy = run.privacy
    if privacy is not None and privacy.dp_enabled:
        lines.append("Privacy spent (example-level DP, everything in each hospital's ledger; training patients, "
                     "then validation and test patients):")
        if len(privacy.hospitals) > MAX_LISTED:
            lines += _privacy_digest(privacy)
        for name, h in sorted(privacy.hospitals.items()) if len(privacy.hospitals) <= MAX_LISTED else []:
            if h.epsilon is None or h.delta is None:
                lines.append(f"  {name:20s} {h.state.value}: {h.reason or 'no ledger reported'}")
                continue
            others = ", ".join(
                f"{GROUP_WORDS[split][0]} {g.epsilon:.3f}" for split, g in h.groups.items() if split != Split.TRAIN.value
            )
            lines.append(
                f"  {name:20s} epsilon {h.epsilon:.3f} (RDP {format_number(h.epsilon_rdp)}, PRV "
                f"{format_number(h.epsilon_prv)}) at delta {h.delta:.0e}, budget {format_number(h.budget)}, "
                f"{h.rounds_trained} rounds, {h.state.value}" + (f"; {others}" if others else "")
            )
    elif privacy is not None:
        lines.append("Privacy: DP was off for this run; no epsilon applies.")
    lines.append(f"Report: {run.path / 'report.md'} and {run.path / 'report.html'}")
    return "\n".join(lines)


def _privacy_digest(privacy: RunPrivacy) -> list[str]:
    """Many hospitals: the range of their epsilons and how many are in each state."""
    spent = [h.epsilon for h in privacy.hospitals.values() if h.epsilon is not None]
    states: dict[str, int] = {}
    for h in privacy.hospitals.values():
        states[h.state.value] = states.get(h.state.value, 0) + 1
    lines = [f"  {len(privacy.hospitals)} hospitals: " + ", ".join(f"{n} {s}" for s, n in sorted(states.items()))]
    if spent:
        lines.append(f"  training patients' epsilon: largest {max(spent):.3f}, median {statistics.median(spent):.3f}, "
                     f"smallest {min(spent):.3f} (each hospital's in privacy.json and the report)")
    return lines


def write_report(run_dir: str | Path) -> str:
    """Write report.md and report.html; return the text summary."""
    run = RunFolder.load(Path(run_dir))
    title, sections = build(run)
    (run.path / "report.md").write_text(markdown(title, sections))
    (run.path / "report.html").write_text(to_html(title, sections))
    return summary_text(run)
