"""Whose gradients DP-SGD's clipping shrinks, and how far that pulls the risks down.

    python -m simulations.clipping_study RUNS_DIR [--norms 3,4.5,6]

Why: DP-SGD clips every patient's gradient to the clipping norm C before it adds noise
(Abadi et al., "Deep Learning with Differential Privacy", CCS 2016). Clipping is not
neutral between the classes. Under the log loss a patient's gradient on a risk model's
output layer is ``(p - y)`` times the layer's inputs: a death the model scores at 0.1
pushes about nine times as hard as a survivor it scores at 0.1. Where C cuts the deaths'
gradients and not the survivors', the clipped sum weighs a death less than a survivor,
and training settles where the risks are too low. The imbalance is the known one behind
DP-SGD's disparate impact (Bagdasaryan, Poursaeed & Shmatikov, NeurIPS 2019), here on the
outcome itself.

For every ``fold*/model.pt`` of a ``simulations.utility`` folder this scores each
hospital's own training stays with the run's final model and prints, for each class, the
share of per-example gradients (of the trained weights, as Opacus computes them) that
each norm would clip and the mean factor it would scale them by; the ratio of the two
classes' factors is how much a death counts against a survivor in the clipped sum. Beside
it, the exact observed death rate over the mean predicted risk on the same stays. It reads
every patient (a simulation holds them); nothing here is a DP release.

Measured on 2026-12-07 (README "Risks on their true scale"), on 5 runs' final models
trained at C 3: 91% of the deaths' gradients (89-95% by hospital) and 1% of the
survivors' were clipped at 3; a death counted 0.65 of a survivor; the risks ran 35% low
(observed over predicted 1.35). On 5 models trained at C 6 (lr halved, lr x C kept): 4%
of the deaths' clipped at 6, a death counted 1.00, the ratio 1.00.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

CHUNK = 256  # stays per backward pass: bounds the per-example gradients held at once


@dataclass
class ClassClipping:
    """One class's per-example gradients at one clipping norm, as sums (so that hospitals
    pool by adding them)."""

    stays: int
    clipped_stays: int  # gradients longer than the norm
    factor_sum: float  # sum of min(1, norm / length): what clipping scales each by

    def __add__(self, other: ClassClipping) -> ClassClipping:
        return ClassClipping(self.stays + other.stays, self.clipped_stays + other.clipped_stays,
                             self.factor_sum + other.factor_sum)

    @property
    def clipped(self) -> float:
        """The share clipped (NaN without stays)."""
        return self.clipped_stays / self.stays if self.stays else float("nan")

    @property
    def factor(self) -> float:
        """The mean scale factor (NaN without stays)."""
        return self.factor_sum / self.stays if self.stays else float("nan")


def clipping_of(norms: np.ndarray, clip: float) -> ClassClipping:
    """How many of ``norms`` exceed ``clip`` and the scale factors Opacus's clipping applies
    to them (``min(1, C / (norm + 1e-6))``, its formula)."""
    return ClassClipping(len(norms), int((norms > clip).sum()), float(np.minimum(1.0, clip / (norms + 1e-6)).sum()))


def per_example_norms(model: torch.nn.Module, X: np.ndarray, S: np.ndarray, y: np.ndarray,
                      positive_weight: float = 1.0, hourly: bool = False) -> np.ndarray:
    """Each stay's gradient length over the model's trainable weights, as DP-SGD clips it
    (Opacus's per-example gradients of the training loss, ``common.model.batch_loss``)."""
    from opacus import GradSampleModule

    from common.model import batch_loss

    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    try:
        for start in range(0, len(y), CHUNK):
            rows = slice(start, start + CHUNK)
            for p in params:
                p.grad, p.grad_sample = None, None
            loss = batch_loss(model, torch.as_tensor(X[rows], dtype=torch.float32),
                              torch.as_tensor(S[rows], dtype=torch.float32), torch.as_tensor(y[rows], dtype=torch.long),
                              positive_weight, hourly)
            loss.backward()
            squares = sum(p.grad_sample.reshape(p.grad_sample.shape[0], -1).pow(2).sum(1) for p in params)
            out.append(squares.sqrt().detach().numpy())
    finally:
        gsm._close()
    return np.concatenate(out) if out else np.zeros(0)


@dataclass
class HospitalClipping:
    run: str
    hospital: str
    stays: int
    died: int  # deaths among the hospital's training stays
    predicted: float  # the sum of the final model's risks over the same stays
    deaths: dict[float, ClassClipping]  # by clipping norm
    survivors: dict[float, ClassClipping]


def study_run(run_dir: Path, clips: list[float]) -> list[HospitalClipping]:
    """Every hospital of one utility run, at each norm in ``clips``."""
    from common.bundle import Bundle
    from common.data.dataset import load_dataset
    from common.data.partition import make_partition
    from common.model import GRUClassifier
    from common.training import predict_proba

    bundle = Bundle(run_dir / "model.pt")
    cfg = bundle.config
    if bundle.spec.n_outputs != 1:
        raise SystemExit(f"{run_dir}: a binary task's run is needed (this model has {bundle.spec.n_outputs} outputs)")
    # the network as training built it (its GRU implementation computes per-example gradients)
    model = GRUClassifier(bundle.spec, gru_impl=cfg.model.gru_impl)
    model.load_state_dict(bundle.model.state_dict(), strict=True)
    model.train()  # dropout on, as DP-SGD computes the gradients it clips
    torch.manual_seed(0)  # and the same dropout draws at every call of the study
    ds = load_dataset(cfg)
    rows = []
    for h in make_partition(ds, cfg):
        X, S, y = ds.X[h.train], ds.S[h.train], ds.y[h.train]
        norms = per_example_norms(model, X, S, y, cfg.training.positive_weight, cfg.training.hourly_loss)
        risk = predict_proba(bundle.model, X, S)[:, 1]
        rows.append(HospitalClipping(run_dir.name, h.name, len(y), int(y.sum()), float(risk.sum()),
                                     {c: clipping_of(norms[y == 1], c) for c in clips},
                                     {c: clipping_of(norms[y == 0], c) for c in clips}))
    return rows


def table(rows: list[HospitalClipping], clips: list[float]) -> str:
    """Markdown: per norm, each hospital's and all hospitals' stays pooled (sums within a run),
    then the mean over runs (a run without a class's stays left out of that mean); the
    observed over predicted risk is the final model's, the same at every norm."""
    lines = ["| norm | hospital | deaths clipped | survivors clipped | a death counts (against a survivor) | "
             "observed / predicted (the run's own norm) |", "|---|---|---|---|---|---|"]
    hospitals = sorted({r.hospital for r in rows})
    runs = sorted({r.run for r in rows})
    for c in clips:
        for name in hospitals + ["all"]:
            per_run = []  # (deaths, survivors, died, predicted) of the run's chosen hospitals, pooled
            for run in runs:
                mine = [r for r in rows if r.run == run and name in ("all", r.hospital)]
                if mine:
                    per_run.append((sum((r.deaths[c] for r in mine), ClassClipping(0, 0, 0.0)),
                                    sum((r.survivors[c] for r in mine), ClassClipping(0, 0, 0.0)),
                                    sum(r.died for r in mine), sum(r.predicted for r in mine)))
            died = _mean([d.clipped for d, _, _, _ in per_run])
            lived = _mean([s.clipped for _, s, _, _ in per_run])
            weight = _mean([d.factor / s.factor for d, s, _, _ in per_run])
            ratio = np.array([k / p for _, _, k, p in per_run if p > 0])
            spread = f" ± {ratio.std(ddof=1):.2f}" if len(ratio) > 1 else ""
            shown = f"{ratio.mean():.2f}{spread}" if len(ratio) else "no risk"
            lines.append(f"| {c:g} | {name} | {died:.2f} | {lived:.2f} | {weight:.2f} | {shown} |")
    return "\n".join(lines)


def _mean(values: list[float]) -> float:
    """The mean of the finite ``values`` (NaN: a run without that class); NaN if none."""
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.clipping_study", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs_dir", type=Path, help="a simulations.utility output folder (fold*/model.pt)")
    parser.add_argument("--norms", default="3,4.5,6", help="comma-separated clipping norms to measure at")
    args = parser.parse_args(argv)
    clips = [float(v) for v in args.norms.split(",") if v.strip()]
    dirs = sorted(p for p in args.runs_dir.glob("fold*") if (p / "model.pt").is_file())
    if not dirs:
        parser.error(f"{args.runs_dir}: no fold*/model.pt (a simulations.utility output folder)")
    rows = [row for d in dirs for row in study_run(d, clips)]
    print(f"{len(dirs)} runs of {args.runs_dir}; each hospital's training stays, the run's final model; "
          "mean over runs\n")
    print(table(rows, clips))
    return 0


if __name__ == "__main__":
    sys.exit(main())
