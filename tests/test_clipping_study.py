"""The clipping study (simulations.clipping_study): its per-example gradient lengths
against a slow reference (one stay at a time, plain autograd), and the clipped share and
factor against their definitions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.model import GRUClassifier, batch_loss
from simulations.clipping_study import CHUNK, ClassClipping, HospitalClipping, clipping_of, per_example_norms, table
from tests.conftest import small_spec


@pytest.mark.parametrize("train_gru, hourly", [(False, False), (True, False), (False, True)])
def test_per_example_norms_match_one_stay_at_a_time(train_gru, hourly):
    torch.manual_seed(0)
    model = GRUClassifier(small_spec(train_gru=train_gru), "fast").train()
    n = CHUNK + 9  # two chunks, the second short
    X, S = np.random.default_rng(0).normal(size=(n, 10, 6)), np.random.default_rng(1).normal(size=(n, 3))
    y = (np.random.default_rng(2).random(n) < 0.3).astype(np.int64)
    norms = per_example_norms(model, X, S, y, positive_weight=2.0, hourly=hourly)
    params = [p for p in model.parameters() if p.requires_grad]
    for i in (0, 5, CHUNK, n - 1):
        model.zero_grad(set_to_none=True)
        batch_loss(model, torch.tensor(X[i:i + 1], dtype=torch.float32), torch.tensor(S[i:i + 1], dtype=torch.float32),
                   torch.tensor(y[i:i + 1]), 2.0, hourly).backward()
        slow = torch.sqrt(sum(p.grad.pow(2).sum() for p in params)).item()
        assert norms[i] == pytest.approx(slow, rel=1e-4)
    # Opacus's hooks are gone: the backward passes above made no per-example gradients
    assert not any(hasattr(p, "grad_sample") for p in params)


def test_the_clipped_share_and_factor_follow_opacus_formula():
    norms = np.array([1.0, 2.0, 4.0, 8.0])
    c = clipping_of(norms, 2.0)
    assert c.clipped == 0.5  # only the lengths over the norm: 4 and 8
    assert c.factor == pytest.approx(np.mean([1.0, 2.0 / (2.0 + 1e-6), 2.0 / (4.0 + 1e-6), 2.0 / (8.0 + 1e-6)]))
    assert np.isnan(clipping_of(np.zeros(0), 2.0).clipped) and np.isnan(clipping_of(np.zeros(0), 2.0).factor)


def test_the_table_pools_a_runs_hospitals_and_leaves_out_a_hospital_without_deaths():
    # run r1: hospital a has 10 deaths, 8 clipped; b has none (its shares are NaN, not a NaN row)
    def row(run, name, deaths, survivors, died, predicted):
        return HospitalClipping(run, name, deaths.stays + survivors.stays, died, predicted, {3.0: deaths}, {3.0: survivors})

    rows = [row("r1", "a", ClassClipping(10, 8, 7.0), ClassClipping(90, 0, 90.0), 10, 8.0),
            row("r1", "b", ClassClipping(0, 0, 0.0), ClassClipping(50, 1, 49.5), 0, 2.0),
            row("r2", "a", ClassClipping(30, 15, 24.0), ClassClipping(70, 0, 70.0), 30, 20.0)]
    lines = {tuple(c.strip() for c in line.split("|")[1:3]): line for line in table(rows, [3.0]).splitlines()[2:]}
    assert "nan" not in lines[("3", "all")] and "nan" in lines[("3", "b")]
    # all, pooled within a run: r1 8/10 deaths clipped, r2 15/30; survivors r1 1/140, r2 0/70; means over runs
    cells = [c.strip() for c in lines[("3", "all")].split("|")]
    assert cells[3] == f"{(0.8 + 0.5) / 2:.2f}" and cells[4] == f"{(1 / 140) / 2:.2f}"
    weight = ((7.0 / 10) / (139.5 / 140) + (24.0 / 30) / 1.0) / 2
    assert cells[5] == f"{weight:.2f}"
    ratios = np.array([10 / 10.0, 30 / 20.0])  # observed over predicted, each run's hospitals pooled
    assert cells[6] == f"{ratios.mean():.2f} ± {ratios.std(ddof=1):.2f}"
