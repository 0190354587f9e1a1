"""The baselines run on the real data with the shipped config (delta: auto included),
and the DP ones spend exactly their target epsilon, as an independent replay says."""

from __future__ import annotations

import json

import pytest

from tests.conftest import DEFAULT_CONFIG

SMALL = ["data.max_stays=400", "run.rounds=2", "model.gru_hidden=[2]"]


@pytest.fixture(scope="module")
def small_cfg(physionet_files):
    from common.config import load_config

    return load_config(DEFAULT_CONFIG, SMALL)


@pytest.mark.parametrize("kind", ["central", "central-dp", "local"])
def test_baseline_scores_every_test_split(small_cfg, kind, tmp_path):
    from simulations.baselines import run_baseline

    out = tmp_path / "baselines.json"
    result = run_baseline(small_cfg, kind, out=out, target_epsilon=0.5)
    pooled = result["test"]["pooled"]
    assert 0.0 <= pooled["auroc"] <= 1.0 and pooled["n"] > 0
    assert set(result["test"]["hospitals"]) == {"coronary_care", "cardiac_surgery", "medical", "surgical"}
    assert sum(m["n"] for m in result["test"]["hospitals"].values()) == pooled["n"]
    saved = json.loads(out.read_text())
    assert saved[kind]["test"]["pooled"]["n"] == pooled["n"]
    if kind == "central":
        assert result["epsilon"] is None
    elif kind == "central-dp":
        assert result["epsilon"] == pytest.approx(0.5, abs=1e-3)  # calibrated for the whole run
    else:
        assert all(e == pytest.approx(0.5, abs=1e-3) for e in result["epsilon"].values())


def test_a_dp_baseline_needs_an_epsilon(small_cfg):
    from dataclasses import replace

    from simulations.baselines import run_baseline

    cfg = replace(small_cfg, privacy=replace(small_cfg.privacy, target_epsilon=0.0, noise_multiplier=1.0))
    with pytest.raises(ValueError, match="target epsilon"):
        run_baseline(cfg, "central-dp")
