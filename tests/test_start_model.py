"""model.init_from: a run starts from a model bundle's weights, checked against the config."""

from __future__ import annotations

import hashlib

import pytest
import torch

from common.bundle import save_bundle
from common.config import ConfigError, load_config
from common.model import GRUClassifier, model_spec
from server.coordinator import initial_arrays
from server.start_model import load_start_model
from tests.conftest import ROOT

DEFAULT = ROOT / "configs" / "default.yaml"


def _bundle(path, *overrides: str) -> dict[str, torch.Tensor]:
    """A bundle of a model with non-zero weights everywhere (not any config's own start)."""
    cfg = load_config(DEFAULT, list(overrides))
    torch.manual_seed(7)
    model = GRUClassifier(model_spec(cfg), gru_impl="torch")
    weights = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    save_bundle(path, weights, model_spec(cfg), cfg, info={"run_id": "earlier-run"})
    return weights


def test_the_first_global_model_is_the_bundles_and_the_file_is_identified(tmp_path):
    weights = _bundle(tmp_path / "start.pt")
    cfg = load_config(DEFAULT, [f"model.init_from={tmp_path / 'start.pt'}"])
    start = load_start_model(cfg)
    assert start.sha256 == hashlib.sha256((tmp_path / "start.pt").read_bytes()).hexdigest()
    assert start.source_run == "earlier-run"
    arrays = initial_arrays(cfg, start)
    for key, value in weights.items():
        assert torch.equal(torch.as_tensor(arrays[key].numpy()), value), key
    # without a start the config's own initialisation is used: a head at zero
    assert not initial_arrays(load_config(DEFAULT))["head.0.weight"].numpy().any()


def test_training_settings_may_differ_from_the_bundles(tmp_path):
    _bundle(tmp_path / "start.pt", "model.dropout=0.5", "model.train_gru=true", "model.zero_init_head=false",
            "training.lr=0.3", "run.rounds=3")
    cfg = load_config(DEFAULT, [f"model.init_from={tmp_path / 'start.pt'}"])
    assert load_start_model(cfg).weights


@pytest.mark.parametrize("bundle_overrides, run_overrides, message", [
    (["features.select=[]"], [], r"reads other variables \(37: ALP, ALT, AST, Albumin, \.\.\. against 15 here"),
    (["features.window_hours=24"], [], r"has another features\.window_hours"),
    ([], ["features.bin_hours=2"], r"has another features\.bin_hours"),
    (["model.gru_hidden=[4]"], [], r"has another network: gru_hidden \[4\] against \[3\]"),
    (["model.carry_units=[value, high, seen]"], [], r"has another network: carry_units"),
    ([], ["task.classes=[alive, dead]"], r"predicts other classes \(survived, died\)"),
])
def test_a_bundle_that_reads_other_inputs_or_has_another_network_is_refused(tmp_path, bundle_overrides, run_overrides,
                                                                          message):
    _bundle(tmp_path / "start.pt", *bundle_overrides)
    cfg = load_config(DEFAULT, run_overrides + [f"model.init_from={tmp_path / 'start.pt'}"])
    with pytest.raises(ConfigError, match=r"^model\.init_from \(.*start\.pt\): the bundle " + message):
        load_start_model(cfg)


def test_a_missing_or_foreign_file_names_the_setting_and_the_file(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    for name, why in (("nothere.pt", "model bundle not found"), ("notes.txt", "is not a fedgru model bundle")):
        cfg = load_config(DEFAULT, [f"model.init_from={tmp_path / name}"])
        with pytest.raises(ConfigError, match=rf"^model\.init_from: .*{name}: {why}"):
            load_start_model(cfg)
