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


def test_an_oracle_start_is_the_converged_fit_and_the_cosine_decay_ends_where_asked(full_dataset):
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    from simulations.head_screen import cosine_lr, head_features

    cfg = load_config(DEFAULT_CONFIG, ["run.rounds=1", "split.folds=5", "split.fold=0"])
    features, y, hospitals = head_features(cfg)
    train, test = (np.concatenate([getattr(h, part) for h in hospitals]) for part in ("train", "test"))
    fit = LogisticRegression(C=1.0, max_iter=2000).fit(features[train], y[train])
    expected = roc_auc_score(y[test], fit.decision_function(features[test]))
    start = screen(cfg, Screen(runs=2, oracle_init=0.5, lr=1e-12, noise_scale=0.0))["last"]  # one round that moves nothing
    assert start == pytest.approx([expected, expected], abs=1e-6)
    assert cosine_lr(0.3, 0.01, 0, 80) == pytest.approx(0.3) and cosine_lr(0.3, 0.01, 79, 80) == pytest.approx(0.01)
    assert cosine_lr(0.3, 0.01, 40, 81) == pytest.approx(0.155)  # halfway: the mean of the two


def test_a_public_share_leaves_every_hospital_and_the_head_starts_at_its_fit(full_dataset):
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    from simulations.head_screen import head_features, split_off_public

    cfg = load_config(DEFAULT_CONFIG, ["run.rounds=1", "split.folds=5", "split.fold=0"])
    features, y, hospitals = head_features(cfg)
    public, rest = split_off_public(hospitals, len(y), 0.25, seed=0)
    assert len(public) == round(0.25 * len(y))
    before = np.concatenate([getattr(h, p) for h in hospitals for p in ("train", "val", "test")])
    after = np.concatenate([getattr(h, p) for h in rest for p in ("train", "val", "test")])
    assert not np.intersect1d(after, public).size and np.array_equal(np.sort(np.union1d(after, public)), np.sort(before))
    fit = LogisticRegression(C=1.0, max_iter=2000).fit(features[public], y[public])
    test = np.concatenate([h.test for h in rest])
    expected = roc_auc_score(y[test], fit.decision_function(features[test]))
    result = screen(cfg, Screen(runs=1, public_fraction=0.25))
    assert result["start"] == pytest.approx([expected], abs=1e-9)
