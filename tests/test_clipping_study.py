"""The clipping study (simulations.clipping_study): its per-example gradient lengths
against a slow reference (one stay at a time, plain autograd), and the clipped share and
factor against their definitions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.model import GRUClassifier, batch_loss
from simulations.clipping_study import CHUNK, clipping_of, per_example_norms
from tests.conftest import small_spec


@pytest.mark.parametrize("train_gru", [False, True])
def test_per_example_norms_match_one_stay_at_a_time(train_gru):
    torch.manual_seed(0)
    model = GRUClassifier(small_spec(train_gru=train_gru), "fast").train()
    n = CHUNK + 9  # two chunks, the second short
    X, S = np.random.default_rng(0).normal(size=(n, 10, 6)), np.random.default_rng(1).normal(size=(n, 3))
    y = (np.random.default_rng(2).random(n) < 0.3).astype(np.int64)
    norms = per_example_norms(model, X, S, y, positive_weight=2.0)
    params = [p for p in model.parameters() if p.requires_grad]
    for i in (0, 5, CHUNK, n - 1):
        model.zero_grad(set_to_none=True)
        batch_loss(model, torch.tensor(X[i:i + 1], dtype=torch.float32), torch.tensor(S[i:i + 1], dtype=torch.float32),
                   torch.tensor(y[i:i + 1]), 2.0).backward()
        slow = torch.sqrt(sum(p.grad.pow(2).sum() for p in params)).item()
        assert norms[i] == pytest.approx(slow, rel=1e-4)
    # Opacus's hooks are gone: the backward passes above made no per-example gradients
    assert not any(hasattr(p, "grad_sample") for p in params)


def test_the_clipped_share_and_factor_follow_opacus_formula():
    norms = np.array([1.0, 2.0, 4.0, 8.0])
    c = clipping_of(norms, 2.0)
    assert c.clipped == 0.5  # only the lengths over the norm: 4 and 8
    assert c.factor == pytest.approx(np.mean([1.0, 2.0 / (2.0 + 1e-6), 2.0 / (4.0 + 1e-6), 2.0 / (8.0 + 1e-6)]))
    assert np.isnan(clipping_of(np.zeros(0), 2.0).clipped)
