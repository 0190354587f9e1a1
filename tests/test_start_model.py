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


def _bundle(path, *overrides: str, config=DEFAULT, drop: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """A bundle of a model with non-zero weights everywhere (not any config's own start);
    ``drop``: features keys its saved config lacks (a bundle written before they existed)."""
    cfg = load_config(config, list(overrides))
    torch.manual_seed(7)
    model = GRUClassifier(model_spec(cfg), gru_impl="torch")
    weights = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    save_bundle(path, weights, model_spec(cfg), cfg, info={"run_id": "earlier-run"})
    if drop:
        raw = torch.load(path, weights_only=True)
        for key in drop:
            del raw["config"]["features"][key]
        torch.save(raw, path)
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


@pytest.mark.parametrize("bundle_overrides, drop, run_overrides", [
    (["features.select=[GCS, HR, Urine]"], (), ["features.select=[Urine, GCS, HR]"]),  # the table's order either way
    (["features.select=[]"], ("select",), ["features.select=[]"]),  # saved before select existed: all 37
    (["model.carry_units=[value, high, low]"], (), []),  # the explicit list of what [] means
])
def test_a_bundle_that_reads_the_same_inputs_the_same_way_is_accepted(tmp_path, bundle_overrides, drop, run_overrides):
    weights = _bundle(tmp_path / "start.pt", *bundle_overrides, drop=drop)
    cfg = load_config(DEFAULT, run_overrides + [f"model.init_from={tmp_path / 'start.pt'}"])
    start = load_start_model(cfg)
    assert all(torch.equal(start.weights[k], v) for k, v in weights.items())


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


def test_a_bundle_with_other_reference_values_for_the_same_names_is_refused(tmp_path):
    """The likeliest mismatch for a model trained elsewhere: same variable names, other units."""
    import yaml

    tree = yaml.safe_load(DEFAULT.read_text())
    hr = next(v for v in tree["features"]["variables"] if v["name"] == "HR")
    hr["center"] = 90
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({"features": tree["features"]}))
    _bundle(tmp_path / "start.pt", config=other)
    cfg = load_config(DEFAULT, [f"model.init_from={tmp_path / 'start.pt'}"])
    with pytest.raises(ConfigError, match=r"the bundle has another features\.variables"):
        load_start_model(cfg)
    _bundle(tmp_path / "start.pt", "task.label_column=Survival")
    with pytest.raises(ConfigError, match=r"predicts another outcome \(task\.label_column 'Survival'"):
        load_start_model(cfg)


def test_a_resumed_run_reads_no_start_file_and_keeps_the_recorded_start(tmp_path):
    from common.files import write_json
    from server.app import start_of_run
    from server.records import RunMetrics

    _bundle(tmp_path / "start.pt")
    cfg = load_config(DEFAULT, [f"model.init_from={tmp_path / 'start.pt'}"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    start, record = start_of_run(cfg, run_dir, resumed=False)
    assert start is not None and record.sha256 == start.sha256
    write_json(run_dir / "metrics.json", RunMetrics("run-1", start=record))  # as RunRecorder writes it every round
    (tmp_path / "start.pt").unlink()  # gone by the time the coordinator restarts
    again, kept = start_of_run(cfg, run_dir, resumed=True)
    assert again is None and kept == record


def test_a_missing_or_foreign_file_names_the_setting_and_the_file(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    (tmp_path / "run").mkdir()
    for name, why in (("nothere.pt", "model bundle not found"), ("notes.txt", r"is not a fedgru model bundle \(not a "),
                      ("run", "is a folder, not a model bundle")):
        cfg = load_config(DEFAULT, [f"model.init_from={tmp_path / name}"])
        with pytest.raises(ConfigError, match=rf"^model\.init_from: .*{name}: {why}"):
            load_start_model(cfg)
