"""One patient on whom a crafted global model overflows moves a hospital's DP-SGD step
by no more than any other patient: at most 2C (replaced by a benign record), divided
by the expected batch. A hostile coordinator can send a finite model whose output
gradient overflows only for patients with some value (here: a descriptor above 50);
before the fix, that patient's NaN reached every patient's gradient (FastDPGRU measured
one scale for the whole batch) or the whole update (per-layer clipping), and whether
such a patient was in the data showed in the release."""

from __future__ import annotations

import math

import pytest
import torch

from common.config import load_config
from common.model import GRUClassifier
from common.training import DPSettings, TensorData, train_local
from tests.conftest import DEFAULT_CONFIG, small_spec

C = 1.0


def _crafted_model(architecture: str) -> GRUClassifier:
    spec = small_spec(architecture=architecture, n_variables=2 if architecture == "per_variable" else 0, head_hidden=2)
    torch.manual_seed(0)
    model = GRUClassifier(spec, gru_impl="fast")
    first, last = model.head[0], model.head[-1]
    pooled = first.in_features - spec.n_static
    with torch.no_grad():
        for gru_weight in model.grus.parameters():  # every GRU state 0: unit 0 below reads the descriptor alone
            gru_weight.zero_()
        first.weight[0].zero_()
        first.weight[0, pooled] = 1.0  # hidden unit 0 fires only when descriptor 0 > 50
        first.bias[0] = -50.0
        first.weight[0, :pooled] = 1e19  # ... and then its gradient towards the GRU overflows
        last.weight[0, 0] = 1e19
        first.weight[1].zero_()  # hidden unit 1: always on, reads the GRU: every patient's GRU gradient counts
        first.weight[1, :pooled] = 1.0
        first.bias[1] = 5.0
        last.weight[0, 1] = 1.0
    return model


def _step(architecture: str, X, S, y, per_layer: bool) -> torch.Tensor:
    model = _crafted_model(architecture)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    training = load_config(DEFAULT_CONFIG, ["training.lr=1.0", "model.train_gru=true"]).training
    train_local(model, TensorData(X, S, y), training, steps=1, dp=DPSettings(0.0, C, 1.0, per_layer),
                sample_generator=torch.Generator().manual_seed(0), noise_generator=torch.Generator().manual_seed(0))
    return torch.cat([p.detach().flatten() for p in model.parameters()]) - before


@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("architecture", ["stacked", "per_variable"])
def test_an_overflowing_patient_moves_the_step_by_at_most_2c_over_the_batch(architecture, per_layer):
    gen = torch.Generator().manual_seed(1)
    B = 8
    X, S = torch.randn(B, 6, 6, generator=gen), torch.randn(B, 3, generator=gen)
    y = torch.tensor([0, 1] * (B // 2))
    benign = _step(architecture, X, S, y, per_layer)
    S_target = S.clone()
    S_target[0, 0] = 100.0  # patient 0 now has the value the crafted model looks for
    targeted = _step(architecture, X, S_target, y, per_layer)
    assert torch.isfinite(targeted).all()
    assert float((targeted - benign).norm()) <= 2 * C / B + 1e-4  # lr 1, sample rate 1: expected batch B


@pytest.mark.parametrize("architecture", ["stacked", "per_variable"])
def test_an_overflowing_patient_leaves_every_other_patients_gradient_as_it_was(architecture):
    """Per-example gradients are per example: FastDPGRU's rows for the other patients are
    the same whether or not patient 0 makes the model overflow."""
    from opacus import GradSampleModule

    from common.model import batch_loss

    gen = torch.Generator().manual_seed(2)
    X, S = torch.randn(8, 6, 6, generator=gen), torch.randn(8, 3, generator=gen)
    y = torch.tensor([0, 1] * 4)

    def rows(S):
        model = _crafted_model(architecture)
        gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
        batch_loss(model, X, S, y, 1.0, False).backward()
        out = {n: p.grad_sample[1:].clone() for n, p in model.named_parameters() if n.startswith("grus")}
        gsm._close()
        return out

    benign = rows(S)
    S_target = S.clone()
    S_target[0, 0] = 100.0
    targeted = rows(S_target)
    assert benign.keys() == targeted.keys() and benign
    for name in benign:
        assert torch.isfinite(benign[name]).all(), name
        torch.testing.assert_close(targeted[name], benign[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("architecture", ["stacked", "per_variable"])
def test_under_secure_aggregation_an_overflowing_patient_adds_at_most_one_clipped_gradient(architecture):
    """The secure path's integer sum (client.secure.integer_gradient_sum) cleans a patient's
    non-finite gradient row before clipping, as DP-SGD's does: the targeted patient moves
    the sum by at most one clipped gradient in integers (clip x scale, plus the rounding),
    never through a platform's cast of NaN to an integer, and no warning is raised."""
    import warnings
    from types import SimpleNamespace

    import numpy as np

    from client.policy import default_policy
    from client.secure import SecureSettings, integer_gradient_sum

    gen = torch.Generator().manual_seed(3)
    B = 8
    X, S = torch.randn(B, 6, 6, generator=gen), torch.randn(B, 3, generator=gen)
    y = torch.tensor([0, 1] * (B // 2))
    cfg = load_config(DEFAULT_CONFIG, ["model.train_gru=true", "training.sample_rate=1.0"])
    req = SimpleNamespace(cfg=cfg, server_round=1, policy=default_policy(1.0, 1e-5, 1.0))
    scale = 2.0**10
    settings = SecureSettings(1.0, C, scale, None, 2)

    def total(S_):
        model = _crafted_model(architecture)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # numpy's "invalid value in cast" would be one
            return integer_gradient_sum(model, X, S_, y, req, settings, np.random.default_rng(0),
                                        torch.Generator().manual_seed(0)).astype(np.float64)

    benign = total(S)
    S_target = S.clone()
    S_target[0, 0] = 100.0
    targeted = total(S_target)
    assert np.isfinite(targeted).all()
    # patient 0's row replaced: at most 2 clipped gradients apart, each coordinate's rounding at most 1 per patient
    assert float(np.linalg.norm(targeted - benign)) <= 2 * C * scale + 2 * math.sqrt(B * len(benign))
