"""How well a DP subgroup row reads its group's metrics, on real models.

    python -m simulations.subgroup_study RUNS_DIR [RUNS_DIR ...] [--draws 5] [--intervals 1]
                                         [--noise-scales 1,0.3,0.1] [--readings binned,skewnormal]

``RUNS_DIR`` is a ``simulations.utility`` output folder (per-hospital DP runs): every
``fold*/model.pt`` in it is scored exactly on its own fold's test stays, grouped as its
``evaluation.subgroups`` says (a simulation holds every patient; nothing here is a DP
release). Each run's pooled subgroup release (``subgroup_bins`` bins a class and group) is
then released again, ``--draws`` times per noise scale, with fresh Gaussian noise of the
sd its own release carried times the scale. A scale below 1 stands for a larger
federation: at 0.1 the counts stand against the noise as ten times as many stays of the
same kind would (set A's groups are read at the default's noise only in a federation of
20,000 stays or more; README "Whom the model fails, under DP").

Each row the run would read (``common.subgroups.results``' rule) is read by each of
``--readings``: ``binned`` (the counts in the bins) or a fit of ``common.estimates``
(``common.subgroups.read_group``). Printed per scale and reading: the rows read, and for
AUROC, sensitivity and specificity the bias, sd and root mean square error against the
group's exact value: its AUROC from the patients' scores, its sensitivity and specificity
at the run's decision threshold, the risk the report's header names. With
``--intervals`` the first draws of each row also get the interval the report would print
(``common.intervals.metric_intervals`` of the reading) and the share that held the exact
value at the threshold the reading decides at. A row's AUROC counts only where the report
prints it (``common.estimates.ranks_patients``: its bins can rank its patients).

Beside them, each read row's calibration in the large (observed rate over mean
predicted risk) against the group's exact one, and with ``--intervals`` whether its
interval held it; and a second table: each fitted row's AUROC by what the ranking rule
sees in it (pairs in one bin; its wider class's spread against half a pooled bin and
half a coarse one), so that a change of the rule can be judged on the rows it moves.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from common.estimates import (
    GROUP_READ_MARGIN,
    MAX_PAIRS_IN_ONE_BIN,
    MIN_RANKING_SD,
    MIN_SIGNAL,
    class_fits,
    observed_over_predicted,
    pairs_in_one_bin,
    ranks_patients,
)
from common.intervals import INTERVAL_LEVEL, OBSERVED_OVER_PREDICTED, metric_intervals
from common.metrics import ScoreGrid, exact_metrics
from common.subgroups import SubgroupSummary, decision_edge, exact_results, read_group
from simulations.estimator_study import HeldOutScores, test_scores

METRICS = ("auroc", "sensitivity", "specificity")
RATIO = OBSERVED_OVER_PREDICTED  # each row's calibration in the large, beside METRICS in the table


def study(runs: list[HeldOutScores], readings: list[str], scales: list[float], draws: int, intervals: int,
          seed: int = 0, interval_draws: int = 200) -> dict[tuple[float, str], dict]:
    """Per (scale, reading): the errors of every row read, the rows offered and read, and
    the intervals' hits."""
    rng = np.random.default_rng(seed)
    out: dict[tuple[float, str], dict] = defaultdict(lambda: {"errors": defaultdict(list), "held": defaultdict(list),
                                                               "offered": 0, "read": 0, "ranked": 0,
                                                               "why": defaultdict(list), "why_held": defaultdict(list)})
    for index, run in enumerate(runs):
        cfg = run.cfg
        # anchored at the threshold, as the hospitals bin their test release (server.validation.grids)
        coarse = ScoreGrid(*cfg.evaluation.logit_range, cfg.evaluation.subgroup_bins).anchored(run.threshold)
        unit = ScoreGrid(*cfg.evaluation.logit_range, cfg.evaluation.score_bins).width  # the pooled release's bin
        risk = 1 / (1 + np.exp(-run.logits))
        probs = np.stack([1 - risk, risk], axis=1)
        total = SubgroupSummary.from_predictions(cfg, run.y, probs, run.groups, coarse)
        truths = exact_results(cfg, run.y, probs, run.groups, run.threshold)
        members = [_members(cfg, run, truth) for truth in truths]
        # each group's calibration in the large: its observed rate over its mean predicted risk
        ratios = [run.y[m].mean() / risk[m].mean() if m.any() else math.nan for m in members]
        for scale in scales:
            sd = run.subgroup_noise_sd * scale
            least = (MIN_SIGNAL + GROUP_READ_MARGIN) * sd * math.sqrt(coarse.bins)
            for k in range(draws):
                noisy = SubgroupSummary(total.histogram + rng.normal(0.0, sd, total.histogram.shape), coarse,
                                        total.n_groupings)
                for row, truth in enumerate(truths):
                    summary = noisy.group(row)
                    deaths, survivors = float(summary.histogram[1].sum()), float(summary.histogram[0].sum())
                    for reading in readings:
                        cell = out[(scale, reading)]
                        cell["offered"] += 1
                        if truth.metrics is None or min(deaths, survivors) < least:
                            continue
                        cell["read"] += 1
                        read = read_group(summary, reading, sd, run.threshold)
                        # else its AUROC is not printed (a fit counts the spread in the pooled release's bins)
                        ranked = ranks_patients(summary, estimator=reading,
                                                spread_unit=unit if reading != "binned" else None)
                        why = _ranking_rule(summary, reading, unit) if reading != "binned" else ""
                        if reading != "binned":
                            cell["why"][why].append(read.metrics.auroc - truth.metrics.auroc)
                        cell["ranked"] += ranked
                        for m in METRICS:
                            if m != "auroc" or ranked:
                                cell["errors"][m].append(getattr(read.metrics, m) - getattr(truth.metrics, m))
                        cell["errors"][RATIO].append(observed_over_predicted(read.counts) - ratios[row])
                        if k < intervals:
                            edge, grid_of = decision_edge(summary, reading, run.threshold)
                            # as the report draws them (server.results: the spread counted in the pooled bins)
                            found = metric_intervals(summary, sd, edge, INTERVAL_LEVEL, interval_draws,
                                                     np.random.default_rng([seed, index, row, k]), reading,
                                                     decide_on_fine=reading != "binned", fitted=read.counts,
                                                     spread_unit=unit if reading != "binned" else None,
                                                     with_calibration=True, counted_by_noisy_total=True) or {}
                            member = members[row]
                            at_edge = exact_metrics(run.y[member], probs[member], grid_of.edge_risk(edge))
                            if RATIO in found:
                                low, high = found[RATIO]
                                cell["held"][RATIO].append(bool(low - 1e-9 <= ratios[row] <= high + 1e-9))
                            for m, (low, high) in found.items():
                                if m in METRICS:
                                    hit = bool(low - 1e-9 <= getattr(at_edge, m) <= high + 1e-9)
                                    if m != "auroc" or ranked:
                                        cell["held"][m].append(hit)
                                    if m == "auroc":
                                        cell["why_held"][why].append(hit)
    return out


def _ranking_rule(summary, reading: str, unit: float) -> str:
    """What ``common.estimates.ranks_patients`` sees in a row: too many pairs in one bin
    (withheld), or the wider class's fitted spread against MIN_RANKING_SD of ``unit`` (the
    pooled release's bin: under it withheld) and of the row's own coarse bin (the rule
    counted it there before 2026-12-06: the rows between were withheld then)."""
    share = pairs_in_one_bin(summary)
    if share is None or share >= MAX_PAIRS_IN_ONE_BIN:
        return "withheld: pairs in one bin"
    spread = [f.sd for f in class_fits(summary, reading) if f is not None]
    widest = max(spread) if spread else math.inf
    low, high = MIN_RANKING_SD * unit, MIN_RANKING_SD * summary.grid.width
    if widest <= low:
        return f"withheld: spread under {low:g} log-odds"
    return f"spread {low:g}-{high:g} log-odds (withheld before)" if widest <= high else f"spread over {high:g} log-odds"


def _members(cfg, run: HeldOutScores, truth) -> np.ndarray:
    from common.subgroups import assign, group_names

    statics = {s.name: s for s in cfg.features.static}
    spec = next(s for s in cfg.evaluation.subgroups if s.name == truth.grouping)
    names = group_names(spec, statics[spec.column])
    return assign(spec, statics[spec.column], run.groups[spec.column]) == names.index(truth.group)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.subgroup_study", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs_dir", type=Path, nargs="+", help="simulations.utility output folders (fold*/model.pt)")
    parser.add_argument("--draws", type=int, default=5, help="fresh noise draws of each run's subgroup release per scale")
    parser.add_argument("--intervals", type=int, default=0, help="of those, how many also get intervals (slow)")
    parser.add_argument("--noise-scales", default="1,0.3,0.1", help="comma-separated multiples of the run's noise")
    parser.add_argument("--readings", default="binned,skewnormal", help="comma-separated: binned, binormal, skewnormal")
    args = parser.parse_args(argv)
    scales = [float(s) for s in args.noise_scales.split(",") if s.strip()]
    if not scales or min(scales) <= 0:
        parser.error("--noise-scales must be positive")
    readings = [r.strip() for r in args.readings.split(",") if r.strip()]
    if any(r not in ("binned", "binormal", "skewnormal") for r in readings):
        parser.error("--readings: binned, binormal or skewnormal")
    dirs = [p for folder in args.runs_dir for p in sorted(folder.glob("fold*")) if (p / "model.pt").is_file()]
    if not dirs:
        parser.error(f"{', '.join(map(str, args.runs_dir))}: no fold*/model.pt (simulations.utility output folders)")
    runs = [test_scores(d) for d in dirs]
    if any(r.cfg.privacy.aggregation == "secure" for r in runs):
        parser.error("secure-aggregation runs are not studied here (their subgroup noise is a sum of Skellam shares)")
    print(f"{len(runs)} runs of {', '.join(map(str, args.runs_dir))}, {args.draws} fresh subgroup releases each per scale (noise sd per "
          f"cell {min(r.subgroup_noise_sd for r in runs):.1f}-{max(r.subgroup_noise_sd for r in runs):.1f} at scale 1)",
          file=sys.stderr)
    found = study(runs, readings, scales, args.draws, args.intervals)
    columns = (*METRICS, RATIO)
    print("| noise scale | reading | rows read (AUROC printed) | "
          + " | ".join(f"{m}: bias / sd / rmse / held" for m in columns) + " |")
    print("|---|---|---|" + "---|" * len(columns))
    for scale in scales:
        for reading in readings:
            cell = found[(scale, reading)]
            parts = []
            for m in columns:
                e = np.array([v for v in cell["errors"][m] if math.isfinite(v)])
                held = cell["held"][m]
                hits = f"{sum(held)}/{len(held)}" if held else "-"
                parts.append(f"{e.mean():+.3f} / {e.std():.3f} / {math.sqrt((e ** 2).mean()):.3f} / {hits}"
                             if len(e) else "-")
            print(f"| {scale:g} | {reading} | {cell['read']}/{cell['offered']} ({cell['ranked']}) | "
                  + " | ".join(parts) + " |")
    print("\nThe read rows' AUROC by what the ranking rule sees in them (common.estimates.ranks_patients); held: "
          "their intervals held the exact AUROC (withheld rows have none)\n")
    print("| noise scale | reading | rule | rows | AUROC bias / sd / rmse | held |")
    print("|---|---|---|---|---|---|")
    for scale in scales:
        for reading in readings:
            cell = found[(scale, reading)]
            for why, errors in sorted(cell["why"].items()):
                e = np.array([v for v in errors if math.isfinite(v)])
                held = cell["why_held"][why]
                stats = f"{e.mean():+.3f} / {e.std():.3f} / {math.sqrt((e ** 2).mean()):.3f}" if len(e) else "-"
                print(f"| {scale:g} | {reading} | {why} | {len(errors)} | {stats} | "
                      f"{f'{sum(held)}/{len(held)}' if held else '-'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
