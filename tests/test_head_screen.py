"""The fast DP-SGD screen of the default (fixed-GRU) model: real data, real calibration."""

import pytest

from common.config import load_config
from simulations.head_screen import Screen, screen
from tests.conftest import DEFAULT_CONFIG


def test_screen_runs_independent_federations_and_adds_the_noise(full_dataset):
    cfg = load_config(DEFAULT_CONFIG, ["run.rounds=5", "training.lr=1.0", "privacy.max_grad_norm=1.0", "split.folds=5",
                                       "split.fold=0"])
    noisy = screen(cfg, Screen(runs=3))["last"]
    assert len(noisy) == 3 and len(set(noisy)) == 3  # fresh sampling and noise in every run
    assert all(0.5 < a < 1 for a in noisy)
    exact = screen(cfg, Screen(runs=2, noise_scale=0.0))["last"]
    drowned = screen(cfg, Screen(runs=2, noise_scale=20.0))["last"]
    assert min(exact) > max(drowned) + 0.05  # the noise is there, in proportion to the multiplier


def test_screen_refuses_a_trained_gru(full_dataset):
    cfg = load_config(DEFAULT_CONFIG, ["model.train_gru=true"])
    with pytest.raises(ValueError, match="train_gru"):
        screen(cfg, Screen(runs=1))
