"""Post-hoc recalibration of a binary model's risk from released score histograms.

Why: under DP-SGD the output bias and scale learn slowly and noisily, so the ranking of
patients (AUROC) can be good while the risks themselves are far off (a risk of 0.04 for
a typical death). Platt scaling (Platt 1999, "Probabilistic outputs for support vector
machines"), p' = sigmoid(scale * logit(p) + shift), fixes that without changing the
ranking. It is fitted to the pooled validation histograms that the hospitals have
already released, so it reads nothing new: post-processing, free under DP.

The fit is folded into the model's output layer (logit' = scale * logit + shift is
linear in the last layer's weights), so every later use of the model, at the hospitals,
in the bundle, by ``fedgru evaluate`` and ``predict``, is calibrated without extra code.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from common.metrics import ScoreSummary, sigmoid

# A fit that stretches logits more than this comes from scores crammed into a few bins
# (a barely trained model, a tiny validation split): not trusted, left uncalibrated.
MAX_SCALE = 50.0


def fit_logistic_calibration(summary: ScoreSummary, max_iter: int = 100) -> tuple[float, float] | None:
    """(scale, shift) minimising the log loss of sigmoid(scale * c + shift) over the
    histogram's bin centres c, weighted by how many survivors and deaths fall in each.

    As in Platt's paper, the targets are smoothed to (N+ + 1) / (N+ + 2) for deaths and
    1 / (N- + 2) for survivors, so that a small or perfectly separated validation split
    still has a finite fit. Counts may be noisy (DP releases): they are read clipped at
    zero, and the fit weighs each bin by its count as any other. Damped Newton steps on a convex two-parameter problem. None
    for multi-class tasks, a summary without both outcomes or with (nearly) all patients
    in one bin, or a fit that reverses the ranking or stretches it past ``MAX_SCALE``.
    """
    counts = summary.binary_counts()
    if counts is None:
        return None
    pos, neg = counts
    centres = summary.grid.centre_logits()
    keep = (pos + neg) > 0.5  # a noisy released count under half a patient is taken as empty
    if keep.sum() < 3:  # (nearly) all patients share a score: the slope is not identified
        return None
    target_pos = (pos.sum() + 1) / (pos.sum() + 2)
    target_neg = 1 / (neg.sum() + 2)
    c, pos, neg = centres[keep], pos[keep], neg[keep]
    weight = pos + neg
    target = (pos * target_pos + neg * target_neg) / weight  # per bin, in (0, 1)
    features = np.stack([c, np.ones_like(c)], axis=1)

    def loss(theta: np.ndarray) -> float:
        z = features @ theta
        return float((weight * (target * np.logaddexp(0, -z) + (1 - target) * np.logaddexp(0, z))).sum())

    theta = np.array([1.0, 0.0])
    current = loss(theta)
    for _ in range(max_iter):
        p = 0.5 * (1 + np.tanh(0.5 * (features @ theta)))  # sigmoid without overflow
        gradient = features.T @ (weight * (p - target))
        hessian = (features * (weight * p * (1 - p))[:, None]).T @ features + 1e-9 * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        for _ in range(40):  # halve until the loss does not go up
            trial = loss(theta - step)
            if trial <= current:
                break
            step = step / 2
        theta, previous, current = theta - step, current, min(trial, current)
        if np.abs(step).max() < 1e-10 or previous - current < 1e-12:
            break
    scale, shift = float(theta[0]), float(theta[1])
    if not (math.isfinite(scale) and math.isfinite(shift)) or not 0 < scale <= MAX_SCALE:
        return None
    return scale, shift


def calibrate_risk(risk: float, scale: float, shift: float) -> float:
    """A risk before calibration -> the same patient's risk after it."""
    risk = min(max(risk, 1e-12), 1 - 1e-12)
    z = scale * (math.log(risk) - math.log1p(-risk)) + shift
    return sigmoid(z)


def fold_into_output_layer(
    state_dict: dict[str, torch.Tensor], weight_key: str, bias_key: str, scale: float, shift: float
) -> dict[str, torch.Tensor]:
    """New weights whose single output logit is ``scale * old_logit + shift``."""
    out = dict(state_dict)
    if out[weight_key].shape[0] != 1:
        raise ValueError("logit calibration is for a single-logit (binary) output layer")
    out[weight_key] = state_dict[weight_key] * scale
    out[bias_key] = state_dict[bias_key] * scale + shift
    return out
