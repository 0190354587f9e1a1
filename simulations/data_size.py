"""What data size makes the trained GRU worth it: utility of two configs as the hospitals'
training stays grow, on the same held-out folds.

    python -m simulations.data_size [--configs configs/default.yaml,configs/trained-gru.yaml]
                                    [--train-stays 500,1000,2000,all] [--runs 5] [--folds 5]
                                    [--set key=value ...] [--out DIR]
    python -m simulations.data_size --summarize DIR/data_size.json   # the table again, from saved runs

For every size and every fold, each config is a real ``fedgru simulate`` run (through
``simulations.utility.federated_fold``) on ``split.train_fraction`` of every hospital's
training split, the share that makes the federation's training stays the size asked for;
validation and test patients stay whole, and a smaller share is a subset of a larger one
(``common.data.partition.training_subsample``). Each run's model is scored exactly on its
fold's test patients, as in ``simulations.utility``. Every fold's test patients are the
same for both configs at every size, so the difference between the configs is read per
fold (paired), which removes the test sets' own sampling error from it.

The crossover: the paired differences (second config minus first) are fitted by a line in
log2 of the stays per hospital, and the size where the line crosses zero is read off it,
with a bootstrap over the runs of each size for its uncertainty. Sizes past the largest
measured one are an extrapolation of that line, and the output says so; where the line
does not rise the output says that no crossover can be read from the data. Because a line
through every size can rise on the small sizes alone, the output also gives the difference
at the largest size and its change over the last step, each with a 95% interval, and says
when a crossing past the data is not supported.

Writes ``data_size.json`` and ``data_size.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from common.config import load_config
from common.data.dataset import load_dataset
from common.data.partition import make_partition
from common.files import write_json
from common.paths import project_root
from simulations.utility import federated_fold

DEFAULT_CONFIGS = ("configs/default.yaml", "configs/trained-gru.yaml")
BOOTSTRAP_DRAWS = 2000


@dataclass
class SizeRun:
    """One config trained on one fold at one data size, scored exactly."""

    config: str
    target: str  # the size asked for: a count or "all"
    fraction: float  # split.train_fraction used
    fold: int
    training_stays: int  # the federation's training stays in this run
    hospitals: int
    auroc: float
    seconds: float


@dataclass
class Crossover:
    """Where a line through (log2 stays per hospital, paired AUROC difference) crosses zero."""

    intercept: float
    slope: float  # AUROC difference per doubling of the stays per hospital
    slope_se: float
    stays_per_hospital: float | None  # None: the fitted line does not rise, so it never crosses upward (inf: past 2^60)
    interval: tuple[float, float] | None  # 2.5 and 97.5 percentiles over the bootstrap (inf: no crossing)
    rising_share: float  # share of bootstrap fits whose line rises
    largest_measured: float  # stays per hospital at the largest measured size

    @property
    def extrapolated(self) -> bool:
        return self.stays_per_hospital is None or self.stays_per_hospital > self.largest_measured


def _fit(x: np.ndarray, d: np.ndarray) -> tuple[float, float, float]:
    """Least squares d = a + b x, with the standard error of b."""
    design = np.stack([np.ones_like(x), x], axis=1)
    (a, b), *_ = np.linalg.lstsq(design, d, rcond=None)
    resid = d - (a + b * x)
    dof = max(len(x) - 2, 1)
    sxx = float(((x - x.mean()) ** 2).sum())
    se = math.sqrt(float((resid**2).sum()) / dof / sxx) if sxx > 0 else float("inf")
    return float(a), float(b), se


def _crossing(a: float, b: float) -> float:
    """Where a + b log2(n) = 0; inf where the line does not rise or crosses past 2^60 stays."""
    if b <= 0 or -a / b > 60:
        return math.inf
    return 2 ** (-a / b)


def crossover(stays_per_hospital: list[float], differences: list[float], seed: int = 0,
              draws: int = BOOTSTRAP_DRAWS) -> Crossover:
    """The stays per hospital at which ``differences`` (paired, one per run) reach zero on a
    line in log2 of the stays; bootstrap resamples the runs within each size."""
    x = np.log2(np.asarray(stays_per_hospital, dtype=float))
    d = np.asarray(differences, dtype=float)
    a, b, se = _fit(x, d)
    point = _crossing(a, b) if b > 0 else None
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(x == v) for v in np.unique(x)]
    crossings, rising = [], 0
    for _ in range(draws):
        pick = np.concatenate([rng.choice(g, size=len(g)) for g in groups])
        ab, bb, _ = _fit(x[pick], d[pick])
        rising += bb > 0
        crossings.append(_crossing(ab, bb))
    interval = None
    if point is not None:
        ranked = sorted(crossings)  # nearest rank: inf (no crossing) may be among them
        interval = (float(ranked[int(0.025 * (draws - 1))]), float(ranked[int(math.ceil(0.975 * (draws - 1)))]))
    return Crossover(a, b, se, point, interval, rising / draws, float(2 ** x.max()))


def federation_training_stays(config: str | None, overrides: list[str], folds: int, fold: int) -> tuple[int, int]:
    """The federation's training stays on ``fold`` (with the ``split.train_fraction`` in
    ``overrides``, if any) and its number of hospitals."""
    cfg = load_config(config, overrides + [f"split.folds={folds}", f"split.fold={fold}"])
    hospitals = make_partition(load_dataset(cfg), cfg)
    return sum(len(h.train) for h in hospitals), len(hospitals)


def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else float("nan")


def summarize(runs: list[SizeRun], configs: list[str], seed: int = 0) -> dict:
    """Per size: each config's AUROC and the paired difference; the crossover over all sizes."""
    first, second = configs[0], configs[-1]
    sizes = list(dict.fromkeys(r.target for r in runs))
    rows, xs, ds = [], [], []
    for target in sizes:
        at = [r for r in runs if r.target == target]
        by = {c: {r.fold: r for r in at if r.config == c} for c in configs}
        paired = sorted(set(by[first]) & set(by[second]))
        diffs = [by[second][f].auroc - by[first][f].auroc for f in paired]
        per_hospital = statistics.fmean(r.training_stays / r.hospitals for r in at)
        row = {"target": target, "training_stays": statistics.fmean(r.training_stays for r in at),
               "stays_per_hospital": per_hospital, "fraction": at[0].fraction,
               "auroc": {c: _stats([r.auroc for r in by[c].values()]) for c in configs if by[c]},
               "seconds": {c: statistics.fmean(r.seconds for r in by[c].values()) for c in configs if by[c]},
               "difference": _stats(diffs) if diffs else None, "paired_runs": len(diffs)}
        rows.append(row)
        xs += [per_hospital] * len(diffs)
        ds += diffs
    out: dict = {"configs": configs, "sizes": rows}
    if len(set(xs)) >= 2:
        out["crossover"] = asdict(crossover(xs, ds, seed))
    measured = [r for r in rows if r["difference"] and r["paired_runs"] > 1]
    if len(measured) >= 2:
        # the fit pools every size; whether the difference still rises at the top is read
        # from the two largest sizes alone, each with its standard error
        below, top = measured[-2], measured[-1]
        se = lambda r: r["difference"][1] / math.sqrt(r["paired_runs"])  # noqa: E731
        out["largest"] = {"stays_per_hospital": top["stays_per_hospital"], "difference": top["difference"][0],
                          "se": se(top), "last_step": top["difference"][0] - below["difference"][0],
                          "last_step_se": math.hypot(se(top), se(below)),
                          "from_stays_per_hospital": below["stays_per_hospital"]}
    return out


def _crossover_text(c: dict, first: str, second: str) -> str:
    per_doubling = f"{c['slope']:+.3f} ± {c['slope_se']:.3f} AUROC per doubling of the stays per hospital"
    if c["stays_per_hospital"] is None:
        return (f"The paired difference does not rise with the data ({per_doubling}): no crossover can be read "
                f"from these sizes; {second} is not shown to be worth it at any size measured or beyond.")
    lo, hi = c["interval"]
    where = ("beyond the largest size measured, so an extrapolation of the line"
             if c["stays_per_hospital"] > c["largest_measured"] else "inside the measured sizes")
    upper = "not bounded (in some resamples the line does not rise)" if not math.isfinite(hi) else f"{hi:,.0f}"
    return (f"The paired difference ({second} minus {first}) grows by {per_doubling}. The fitted line crosses "
            f"zero at about {c['stays_per_hospital']:,.0f} training stays per hospital ({where}; bootstrap 95% "
            f"interval {lo:,.0f} to {upper}; the line rises in {c['rising_share']:.0%} of resamples). "
            f"Largest size measured: {c['largest_measured']:,.0f} per hospital.")


def markdown(summary: dict, runs: int) -> str:
    configs = summary["configs"]
    first, second = configs[0], configs[-1]
    f = lambda s: f"{s[0]:.3f} ± {s[1]:.3f}" if s else "-"  # noqa: E731
    head = ["training stays (federation)", "per hospital", *[f"{c} AUROC" for c in configs],
            f"{Path(second).stem} minus {Path(first).stem} (paired)", *[f"{Path(c).stem} s/run" for c in configs]]
    lines = [f"# AUROC as the training stays grow ({runs} runs per cell, one held-out fold each, mean ± sd)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary["sizes"]:
        cells = [f"{r['training_stays']:,.0f} ({r['target']})", f"{r['stays_per_hospital']:,.0f}",
                 *[f(r["auroc"].get(c)) for c in configs], f(r["difference"]),
                 *[f"{r['seconds'].get(c, float('nan')):.0f}" for c in configs]]
        lines.append("| " + " | ".join(cells) + " |")
    if "crossover" in summary:
        lines += ["", _crossover_text(summary["crossover"], first, second)]
    if "largest" in summary:
        lines += ["", _largest_text(summary["largest"])]
    return "\n".join(lines) + "\n"


def _largest_text(top: dict) -> str:
    """The difference at the largest size and its last step, each with a 95% interval: a
    line fitted through every size can rise on the small sizes alone."""
    lo, hi = top["difference"] - 1.96 * top["se"], top["difference"] + 1.96 * top["se"]
    step_lo = top["last_step"] - 1.96 * top["last_step_se"]
    step_hi = top["last_step"] + 1.96 * top["last_step_se"]
    verdict = ("indistinguishable from zero" if lo <= 0 <= hi else "above zero" if lo > 0 else "below zero")
    rising = ("still rising" if step_lo > 0 else "not shown to rise" if step_hi > 0 else "falling")
    text = (f"At the largest size ({top['stays_per_hospital']:,.0f} stays per hospital) the paired difference is "
            f"{top['difference']:+.3f} (95% interval {lo:+.3f} to {hi:+.3f}): {verdict}. From "
            f"{top['from_stays_per_hospital']:,.0f} to {top['stays_per_hospital']:,.0f} stays per hospital it changed "
            f"by {top['last_step']:+.3f} ({step_lo:+.3f} to {step_hi:+.3f}): {rising}.")
    if not step_lo > 0:
        text += " A crossing past the largest size is not supported by these data: measure at larger sizes."
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                        help="two comma-separated configs: the reference, then the one measured against it")
    parser.add_argument("--train-stays", default="500,1000,2000,all",
                        help="the federation's training stays per size, comma-separated ('all': the whole split)")
    parser.add_argument("--runs", type=int, default=5, help="runs per config and size, one held-out fold each")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=None, help="folder for the runs and data_size.json / .md")
    parser.add_argument("--summarize", type=Path, default=None, metavar="DATA_SIZE_JSON",
                        help="print the table of an earlier (or interrupted) measurement's data_size.json; runs nothing")
    args = parser.parse_args(argv)
    if args.summarize is not None:
        saved = json.loads(args.summarize.read_text())
        runs = [SizeRun(**r) for r in saved["runs"]]
        configs = list(dict.fromkeys(r.config for r in runs))
        per_cell = Counter((r.config, r.target) for r in runs)  # an interrupted measurement saved no runs_per_cell
        print(markdown(summarize(runs, configs), saved.get("runs_per_cell", max(per_cell.values()))))
        return 0
    configs = [c for c in args.configs.split(",") if c]
    if len(configs) != 2:
        parser.error("--configs takes exactly two configs")
    if not 1 <= args.runs <= args.folds:
        parser.error("--runs must be between 1 and --folds")
    targets = [t.strip() for t in args.train_stays.split(",") if t.strip()]
    if not targets or any(t != "all" and not (t.isdigit() and int(t) > 0) for t in targets):
        parser.error("--train-stays takes positive counts or 'all', comma-separated")
    out = (args.out or project_root() / "runs" / f"data-size-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    runs: list[SizeRun] = []
    for target in targets:
        for fold in range(args.runs):
            whole, hospitals = federation_training_stays(configs[0], args.overrides + ["split.train_fraction=1"],
                                                         args.folds, fold)
            fraction = 1.0 if target == "all" else min(1.0, int(target) / whole)
            sets = args.overrides + [f"split.train_fraction={fraction:.6f}"]
            stays = whole if fraction == 1 else federation_training_stays(configs[0], sets, args.folds, fold)[0]
            for config in configs:
                result = federated_fold(Path(config), sets, args.folds, fold, out / f"{Path(config).stem}-{target}")
                runs.append(SizeRun(config, target, fraction, fold, stays, hospitals, result.pooled.auroc, result.seconds))
                print(f"{target} training stays ({stays}), fold {fold}, {config}: AUROC {result.pooled.auroc:.3f}, "
                      f"{result.seconds:.0f} s", flush=True)
            write_json(out / "data_size.json", {"runs": [asdict(r) for r in runs]})  # partial results survive a stop
    summary = summarize(runs, configs)
    write_json(out / "data_size.json", {"runs_per_cell": args.runs, "folds": args.folds, "overrides": args.overrides,
                                        "summary": summary, "runs": [asdict(r) for r in runs]})
    text = markdown(summary, args.runs)
    (out / "data_size.md").write_text(text)
    print(text)
    print(json.dumps({"out": str(out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
