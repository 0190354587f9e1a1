"""One patient on whom a crafted global model overflows moves a hospital's DP-SGD step
by no more than any other patient: at most 2C (replaced by a benign record), divided
by the expected batch. A hostile coordinator can send a finite model whose output
gradient overflows only for patients with some value (here: a descriptor above 50);
before the fix, that patient's NaN reached every patient's gradient (FastDPGRU measured
one scale for the whole batch) or the whole update (per-layer clipping), and whether
such a patient was in the data showed in the release."""

from __future__ import annotations

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
