"""Run reports a clinical researcher and a privacy officer can read.

``write_report(run_dir)`` reads a run folder's records (``server.records``) and writes
``report.md`` (with PNG plots beside it) and ``report.html`` (one self-contained file,
plots embedded), and returns a short text summary. The privacy part states, per
hospital: epsilon under both RDP and PRV accounting at the hospital's delta, budget and
what remains, rounds, steps, noise multiplier, clipping norm and sample rate; which
releases are not covered by DP; and a plain-language statement that the hospital's
privacy officer can sign.

- :mod:`.run_folder`: the run folder as records;
- :mod:`.sections`: one function per section;
- :mod:`.plots`: the figures;
- here: the report's order, the text summary, and writing both files.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from common.document import Image, Section, Table, markdown, to_html
from common.intervals import INTERVAL_LEVEL
from common.messages import Split
from common.metrics import format_metrics, format_number

from ..records import RunPrivacy
from .bedside import bedside_section, decision_lines
from .groups import importance_section, subgroup_section
from .plots import MAX_LISTED, plot_auroc
from .privacy_text import GROUP_WORDS, audit_section, officer_statement, preflight_section, privacy_sections
from .run_folder import RunFolder
from .sections import (
    PHYSIONET_CITATION,
    baseline_section,
    coverage_words,
    data_section,
    evaluation_dp,
    not_evaluated_section,
    settings_section,
    test_results_section,
    threshold_coverage_words,
)

__all__ = ["RunFolder", "build", "officer_statement", "summary_text", "write_report"]


def build(run: RunFolder) -> tuple[str, list[Section]]:
    cfg, metrics = run.config, run.metrics
    title = f"fedgru run report: {cfg.run.name if cfg else run.path.name}"
    intro = Section("Run", [f"Run `{metrics.run_id}`, folder `{run.path}`."])
    if metrics.wall_seconds is not None:
        intro.blocks.append(f"Wall time: {metrics.wall_seconds:.1f} s for {len(metrics.rounds)} rounds, from the "
                            "coordinator's start to its results (starting the federation itself is not counted: "
                            + ("Ray and Flower in a simulation)." if run.partition is not None else
                               "the SuperLink and the hospitals' SuperNodes)."))
    sections = [intro]
    if cfg is not None:
        averaged = run.metrics.test.averaged_rounds if run.metrics.test is not None else []
        sections.append(settings_section(cfg, run.privacy, run.metrics.start, simulated=run.partition is not None,
                                         averaged_rounds=averaged, released=not run.metrics.not_evaluated))
    if run.partition and run.partition.hospitals:
        rows = run.partition.hospitals
        header = ["hospital", "stays", *rows[0].classes, "train", "val", "test"]
        sections.append(Section("Hospitals", [Table(header, [r.cells() for r in rows])]))
    sections += [s for s in (preflight_section(run), not_evaluated_section(run), test_results_section(run),
                             bedside_section(run), baseline_section(run)) if s is not None]
    if plot_auroc(metrics, run.path / "auroc.png"):
        sections.append(Section("Utility per round", [
            Image(run.path / "auroc.png", "Validation AUROC of the model after each validated round"),
            "Each point reads a validation release made during training, with a small share of the validation "
            "budget and so the most noise, from its counts clipped at zero (biased towards 0.5); the bars are its "
            "rough interval: where they span most of 0-1 the release says little. The final model's numbers above "
            "are read with the run's estimator.",
        ]))
    elif metrics.rounds:
        sections.append(Section("Utility per round", [
            "No validation release was made during training (evaluation.validate_every is 0, the default, which "
            "keeps the validation budget for the final model, or the run was too short), so there is no curve to "
            "show. The final model's validation releases were read once, for the monitor's hour thresholds and margin "
            "(with their intervals, above; under evaluation.threshold auto, the decision threshold too), and its "
            "test results are above."]))
    sections += [s for s in (subgroup_section(run), importance_section(run)) if s is not None]
    sections += privacy_sections(run)
    audit = audit_section(run.audit)
    if audit is not None:
        sections.append(audit)
    data = data_section(run.partition)
    if data is not None:
        sections.append(data)
    if cfg is not None and cfg.data.format == "physionet2012":
        sections.append(Section("Data source", [PHYSIONET_CITATION]))
    return title, sections


FIT_WORDS = {"skewnormal": "a skew-normal fit", "binormal": "a normal fit", "binned": "their clipped counts"}


def summary_text(run: RunFolder) -> str:
    lines = [f"Run folder: {run.path}"]
    refused = [a for a in run.metrics.preflight if not a.accepted]
    for a in refused[:MAX_LISTED]:
        lines.append(f"{a.hospital} refused the plan: {a.reason}")
    if len(refused) > MAX_LISTED:
        lines.append(f"... and {len(refused) - MAX_LISTED} more hospitals refused it (each in the report)")
    if run.metrics.not_evaluated:
        lines.append(f"No evaluation: {run.metrics.not_evaluated}")
    test = run.metrics.test
    dp = evaluation_dp(run)
    lines += decision_lines(test, run.config.is_binary if run.config is not None else bool(test and test.hour_thresholds),
                            run.config.evaluation.level if run.config is not None else None, dp,
                            threshold_coverage_words(run.config, len(test.hospitals) if test else 0))
    if test is not None and test.pooled is not None:
        fit = FIT_WORDS.get(run.metrics.estimator, f"the {run.metrics.estimator} reading")
        read = f"read from the DP releases with {fit}" if dp else "exact histograms"
        lines.append(f"Pooled test ({read}; flagged at risk >= {test.threshold:.3f}): "
                     f"{format_metrics(test.pooled, test.intervals.get('pooled'), dp)}")
        if dp and test.intervals.get("pooled"):
            lines.append(f"  intervals: nominal {INTERVAL_LEVEL:.0%} for the DP noise and the reading; "
                         f"{coverage_words(run)}")
    elif test is not None:
        lines.append("Pooled test: no hospital's test release could be read (each hospital's state is in the report)")
    if test is not None and test.exact is not None:
        lines.append(f"Pooled test, exact (a simulation holds every patient; a real federation never sees this): "
                     f"{format_metrics(test.exact)}")
    privacy = run.privacy
    if privacy is not None and privacy.dp_enabled:
        lines.append("Privacy spent (example-level DP, everything in each hospital's ledger; training patients, "
                     "then validation and test patients; the report says what the two accountants are):")
        if len(privacy.hospitals) > MAX_LISTED:
            lines += _privacy_digest(privacy)
        for name, h in sorted(privacy.hospitals.items()) if len(privacy.hospitals) <= MAX_LISTED else []:
            if h.epsilon is None or h.delta is None:
                said = h.reason.startswith("refused the plan") and any(a.hospital == name for a in refused)
                lines.append(f"  {name:20s} " + ("refused the plan (above): nothing released" if said else
                                                  f"{h.state.words}: {h.reason or 'no ledger reported'}"))
                continue
            others = ", ".join(
                f"{GROUP_WORDS[split][0]} {g.epsilon:.3f}" for split, g in h.groups.items() if split != Split.TRAIN.value
            )
            second = (f"its own noise alone: {format_number(h.epsilon_alone)}" if h.epsilon_alone is not None else
                      "the RDP accountant reads " + format_number(h.epsilon_rdp) if h.accountant == "prv" else
                      "the PRV accountant reads " + format_number(h.epsilon_prv))
            lines.append(
                f"  {name:20s} epsilon {h.epsilon:.3f} at delta {h.delta:.2g} ({second}), budget "
                f"{format_number(h.budget)}, {h.rounds_trained} round{'' if h.rounds_trained == 1 else 's'} trained, "
                f"{h.state.words}" + (f"; {others}" if others else "")
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
        states[h.state.words] = states.get(h.state.words, 0) + 1
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
