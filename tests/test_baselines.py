"""The baselines on the real data and the shipped config (delta: auto included): the DP
ones spend their target epsilon, and on the same split the model trained centrally
without DP beats every hospital training alone with DP (what federation has to win back)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import DEFAULT_CONFIG

HOSPITALS = {"coronary_care", "cardiac_surgery", "medical", "surgical"}


@pytest.fixture(scope="module")
def cfg(physionet_files):
    from common.config import load_config

    return load_config(DEFAULT_CONFIG, ["run.rounds=10"])


@pytest.fixture(scope="module")
def results(cfg, tmp_path_factory):
    from simulations.baselines import run_baseline

    out = tmp_path_factory.mktemp("baselines") / "baselines.json"
    return {kind: run_baseline(cfg, kind, out=out) for kind in ("central", "local")}, out


def test_central_without_dp_beats_each_hospital_alone_with_dp(results):
    (by_kind, _) = results
    central, local = by_kind["central"].pooled, by_kind["local"].pooled
    assert central.n == local.n == 800  # the same 20% test patients of every hospital
    assert local.auroc > 0.6  # the local models did learn something
    assert central.auroc > local.auroc + 0.02


def test_every_hospital_spends_its_target_and_every_test_patient_is_scored(results, cfg):
    (by_kind, out) = results
    local = by_kind["local"]
    assert set(local.hospitals) == set(local.epsilon) == HOSPITALS
    assert sum(m.n for m in local.hospitals.values()) == local.pooled.n
    for eps in local.epsilon.values():  # sigma calibrated for the whole run, never over it
        assert cfg.privacy.target_epsilon - 1e-3 <= eps <= cfg.privacy.target_epsilon
    assert by_kind["central"].epsilon == {}
    saved = json.loads(out.read_text())
    assert set(saved) == {"central", "local"} and saved["local"]["pooled"]["n"] == 800


def test_central_dp_spends_its_target(cfg):
    from dataclasses import replace

    from simulations.baselines import run_baseline

    small = replace(cfg, run=replace(cfg.run, rounds=2), data=replace(cfg.data, max_stays=400))
    result = run_baseline(small, "central-dp", target_epsilon=0.5)
    assert result.epsilon["all"] == pytest.approx(0.5, abs=1e-3) and result.epsilon["all"] <= 0.5


def test_a_dp_baseline_needs_an_epsilon(cfg):
    from dataclasses import replace

    from simulations.baselines import run_baseline

    no_target = replace(cfg, privacy=replace(cfg.privacy, target_epsilon=0.0, noise_multiplier=1.0))
    with pytest.raises(ValueError, match="target epsilon"):
        run_baseline(no_target, "central-dp")


def test_a_baseline_releases_the_average_of_its_rounds_models_as_the_federation_does(cfg):
    """The honest reference is post-processed as the federation's release is: the model a
    baseline scores is the exponential average (server.averaging) of its model after each
    round, checked here against the recursion written out over the models it took in."""
    from dataclasses import replace

    import numpy as np

    from common.data.dataset import load_dataset
    from server.averaging import ModelAverage, decay_at
    from simulations.baselines import _train

    class Recording(ModelAverage):
        def __init__(self, decay):
            super().__init__(decay)
            self.models = []

        def update(self, arrays, server_round):
            self.models.append({k: v.numpy().astype(np.float64) for k, v in arrays.items()})
            super().update(arrays, server_round)

    small = replace(cfg, run=replace(cfg.run, rounds=3), data=replace(cfg.data, max_stays=300))
    ds = load_dataset(small)
    average = Recording(0.9)
    model, _ = _train(small, ds.X, ds.S, ds.y, 0.5, seed=3, average=average)
    assert len(average.models) == 3 and average.rounds == (1, 3)
    expected = average.models[0]
    for t, m in enumerate(average.models[1:], start=2):
        d = decay_at(0.9, t)
        expected = {k: d * expected[k] + (1 - d) * m[k] for k in m}
    released = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    for key, value in expected.items():
        np.testing.assert_allclose(released[key], value, rtol=1e-5, atol=1e-6)
    assert any(not np.allclose(released[k], average.models[-1][k]) for k in released)  # not the last model
