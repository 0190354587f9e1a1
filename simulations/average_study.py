"""The released model (the average of the rounds' global models) against the last round's
model, on the same runs: paired, exactly, on each run's own test patients.

    python -m simulations.average_study RUNS_DIR [RUNS_DIR ...]
    python -m simulations.average_study --central-dp [--folds 5] [--seeds 2] [--set KEY=VALUE ...]

Each run folder a ``simulations.utility`` call left (``fold*/``) holds both: ``model.pt``
is what the run released (since ``strategy.average_decay``, an exponential average of
the global models: ``server.averaging``) and ``checkpoint.pt`` the last round's global
model. Both are scored on the run's fold's test patients at the run's own hour-48
threshold: AUROC, the share flagged, sensitivity and specificity. The runs are the same,
so the differences are the average's alone (no training noise between the columns), and
the sd over runs of the share flagged is issue 22's target for the decision (<= 0.03).

``--central-dp`` does the same for the honest reference: central DP-SGD at the config's
epsilon (simulations.baselines) on each fold, once per seed, each training giving both its
last model and the average it releases, scored at the config's level.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

from common.bundle import Bundle
from common.config import load_config
from common.data.dataset import load_dataset
from common.data.partition import make_partition
from common.metrics import exact_metrics
from common.model import GRUClassifier, model_spec
from common.training import predict_proba

COLUMNS = ("auroc", "flagged", "sensitivity", "specificity")


def _scores(cfg, models: list[GRUClassifier]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Labels of the run's test patients, every hospital's pooled, and each model's risks."""
    ds = load_dataset(cfg)
    test = np.concatenate([h.test for h in make_partition(ds, cfg)])
    return ds.y[test], [predict_proba(m, ds.X[test], ds.S[test])[:, 1] for m in models]


def _row(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    m = exact_metrics(y, np.stack([1 - p, p], axis=1), threshold)
    return {"auroc": m.auroc, "flagged": float((p >= threshold).mean()), "sensitivity": m.sensitivity,
            "specificity": m.specificity}


def score(run_dir: Path) -> dict[str, dict[str, float]]:
    """The released and the last model of one run, at the run's threshold."""
    cfg = load_config(run_dir / "config.yaml")
    bundle = Bundle(run_dir / "model.pt")
    if bundle.info.get("calibration") or isinstance(cfg.evaluation.threshold, str):
        # the released model's risks (recalibrated) or threshold (read from its own validation) would differ from
        # the last model's for more than the average: not a like-for-like comparison
        raise SystemExit(f"{run_dir}: compares runs at a fixed level without recalibration only (evaluation."
                         "threshold a number, evaluation.calibrate false)")
    threshold = float(bundle.info.get("threshold", 0.5))
    last = GRUClassifier(model_spec(cfg), gru_impl="torch")
    arrays = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)["arrays"]
    last.load_state_dict({k: torch.as_tensor(v) for k, v in arrays.items()}, strict=True)
    y, (released, plain) = _scores(cfg, [bundle.model, last.eval()])
    return {"released": _row(y, released, threshold), "last round": _row(y, plain, threshold)}


def score_central_dp(overrides: list[str], folds: int, fold: int, seed: int) -> dict[str, dict[str, float]]:
    """Central DP-SGD on one fold: the average it releases and its last model, one training."""
    from server.averaging import ModelAverage
    from simulations.baselines import _train

    class KeepsLast(ModelAverage):
        def update(self, arrays, server_round):
            self.last = arrays.to_torch_state_dict()
            super().update(arrays, server_round)

    cfg = load_config(None, overrides + [f"split.folds={folds}", f"split.fold={fold}"])
    if isinstance(cfg.evaluation.threshold, str):
        raise SystemExit("--central-dp compares at a fixed level: set evaluation.threshold to a number")
    ds = load_dataset(cfg)
    train = np.concatenate([h.train for h in make_partition(ds, cfg)])
    average = KeepsLast(cfg.strategy.average_decay)
    released, _ = _train(cfg, ds.X[train], ds.S[train], ds.y[train], cfg.privacy.target_epsilon, seed, average)
    last = GRUClassifier(model_spec(cfg), gru_impl="torch")
    last.load_state_dict(average.last, strict=True)
    plain = GRUClassifier(model_spec(cfg), gru_impl="torch")
    plain.load_state_dict(released.state_dict(), strict=True)
    y, (averaged, final) = _scores(cfg, [plain.eval(), last.eval()])
    threshold = float(cfg.evaluation.threshold)
    return {"released": _row(y, averaged, threshold), "last round": _row(y, final, threshold)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="*", type=Path, help="simulations.utility output folders")
    parser.add_argument("--central-dp", action="store_true", help="train and compare the central DP baseline instead")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=2, help="--central-dp: trainings per fold")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    if args.central_dp:
        if args.folds * args.seeds < 2:
            raise SystemExit("--central-dp needs at least 2 trainings (--folds x --seeds) for a spread")
        rows = []
        for seed in range(args.seeds):
            for fold in range(args.folds):
                rows.append(score_central_dp(args.overrides, args.folds, fold, seed))
                print(f"seed {seed} fold {fold}: AUROC released {rows[-1]['released']['auroc']:.3f}, "
                      f"last {rows[-1]['last round']['auroc']:.3f}", flush=True)
        return _print(rows, "central DP-SGD trainings; each model at the config's level, exactly, on its fold's test "
                            "patients")
    runs = sorted(d for f in args.folders for d in f.glob("fold*")
                  if (d / "model.pt").is_file() and (d / "checkpoint.pt").is_file())
    if len(runs) < 2:
        raise SystemExit("need at least 2 finished run folders (fold*/ with model.pt and checkpoint.pt)")
    rows = [score(d) for d in runs]
    return _print(rows, "runs; each model at its run's threshold, exactly, on the run's test patients")


def _print(rows: list[dict[str, dict[str, float]]], what: str) -> int:
    print(f"{len(rows)} {what}")
    print(f"{'':12s}" + "".join(f"{c:>26s}" for c in COLUMNS))
    for model in ("released", "last round"):
        cells = []
        for c in COLUMNS:
            values = [r[model][c] for r in rows]
            cells.append(f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f} (min {min(values):.3f})")
        print(f"{model:12s}" + "".join(f"{cell:>26s}" for cell in cells))
    diffs = ["{:+.4f} ± {:.4f}".format(statistics.fmean(d := [r["released"][c] - r["last round"][c] for r in rows]),
                                       statistics.stdev(d)) for c in COLUMNS]
    print(f"{'difference':12s}" + "".join(f"{cell:>26s}" for cell in diffs))
    for model in ("released", "last round"):
        sens = sum(r[model]["sensitivity"] < 0.55 for r in rows)
        spec = sum(r[model]["specificity"] < 0.7 for r in rows)
        print(f"{model}: sensitivity below 0.55 in {sens} runs, specificity below 0.7 in {spec}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
