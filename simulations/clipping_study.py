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

Measured on 2026-12-07 (README "Risks on their true scale"): at C 3, 89-98% of the
deaths' gradients were clipped and no survivor's; a death counted about 0.66 of a
survivor; the risks ran 35% low (observed over predicted 1.35). At C 6 (lr halved, lr x C
kept) the ratio was 1.00.
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
    """One class's per-example gradients at one clipping norm."""

    clipped: float  # share of the class's gradients longer than the norm
    factor: float  # mean of min(1, norm / length): what clipping scales them by, on average


def clipping_of(norms: np.ndarray, clip: float) -> ClassClipping:
    """The share of ``norms`` over ``clip`` and the mean scale factor Opacus's clipping
    applies to them (``min(1, C / (norm + 1e-6))``, its formula)."""
    if len(norms) == 0:
        return ClassClipping(float("nan"), float("nan"))
    return ClassClipping(float((norms > clip).mean()), float(np.minimum(1.0, clip / (norms + 1e-6)).mean()))


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
    """Markdown: per norm and hospital (and all hospitals pooled), the mean over runs; the
    observed over predicted risk is the final model's, the same at every norm."""
    lines = ["| norm | hospital | deaths clipped | survivors clipped | a death counts (against a survivor) | "
             "observed / predicted (the run's own norm) |", "|---|---|---|---|---|---|"]
    hospitals = sorted({r.hospital for r in rows})
    for c in clips:
        for name in hospitals + ["all"]:
            mine = [r for r in rows if name in ("all", r.hospital)]
            died = np.mean([r.deaths[c].clipped for r in mine])
            lived = np.mean([r.survivors[c].clipped for r in mine])
            weight = np.mean([r.deaths[c].factor / r.survivors[c].factor for r in mine])
            # observed over predicted of each run, pooled over the run's hospitals in the "all" row
            runs = sorted({r.run for r in mine})
            ratio = np.array([sum(r.died for r in mine if r.run == run) / sum(r.predicted for r in mine if r.run == run)
                              for run in runs])
            spread = f" ± {ratio.std(ddof=1):.2f}" if len(ratio) > 1 else ""
            lines.append(f"| {c:g} | {name} | {died:.2f} | {lived:.2f} | {weight:.2f} | {ratio.mean():.2f}{spread} |")
    return "\n".join(lines)


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
