import re
from pathlib import Path

import pytest

from common.config import ConfigError, ExperimentConfig, load_config

ROOT = Path(__file__).resolve().parent.parent


def test_default_config_loads_and_round_trips():
    cfg = load_config(ROOT / "configs" / "default.yaml")
    assert cfg.task.label_column == "In-hospital_death"
    assert cfg.is_binary
    # the model reads the SAPS II variables (features.select) of the 37 in the reference table
    assert {v.name for v in cfg.features.variables} == set(cfg.features.select) and len(cfg.features.select) == 15
    assert len(load_config(ROOT / "configs" / "default.yaml", ["features.select=[]"]).features.variables) == 37
    assert cfg.partition.scheme == "icu_type"
    again = ExperimentConfig.from_json(cfg.to_json())
    assert again.to_dict() == {**cfg.to_dict(), "source": again.source}


def test_an_empty_file_is_exactly_the_default(tmp_path):
    """default.yaml is the one source of defaults: a file with no keys gets all of it."""
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing set\n")
    got, want = load_config(empty).to_dict(), load_config(ROOT / "configs" / "default.yaml").to_dict()
    assert got.pop("source") != want.pop("source")
    assert got == want


def test_a_file_sets_only_what_differs(tmp_path):
    partial = tmp_path / "partial.yaml"
    partial.write_text("run:\n  rounds: 3\ntraining:\n  lr: 0.25\n")
    cfg, default = load_config(partial), load_config(ROOT / "configs" / "default.yaml")
    assert (cfg.run.rounds, cfg.training.lr) == (3, 0.25)
    assert cfg.run.seed == default.run.seed and cfg.model == default.model and cfg.privacy == default.privacy


def test_the_sections_have_no_defaults_of_their_own():
    """A key missing from the full tree is an error, not a silent second default."""
    tree = load_config(ROOT / "configs" / "default.yaml").to_dict()
    del tree["training"]["batch_size"]
    with pytest.raises(ConfigError, match="'training.batch_size' is missing"):
        ExperimentConfig.from_dict(tree, origin="msg")
    assert ExperimentConfig.from_dict(tree, origin="bundle", fill_defaults=True).training.batch_size == 256


def test_los_config_is_a_config_change_only():
    cfg = load_config(ROOT / "configs" / "los.yaml")
    assert cfg.task.label_column == "Length_of_stay"
    assert cfg.num_classes == 4 and not cfg.is_binary
    assert cfg.task.bins == [3.0, 7.0, 14.0]
    # inherited from default.yaml
    assert cfg.features == load_config(ROOT / "configs" / "default.yaml").features


def test_overrides_parse_values_as_yaml():
    cfg = load_config(ROOT / "configs" / "default.yaml", ["training.lr=0.5", "model.gru_hidden=[16, 8]", "privacy.delta=1e-6",
                                                                "model.init=random"])
    assert cfg.training.lr == 0.5
    assert cfg.model.gru_hidden == [16, 8]
    assert cfg.privacy.delta == 1e-6


def test_unknown_key_names_file_and_suggests(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"extends: {ROOT / 'configs' / 'default.yaml'}\ntraining:\n  lr_rate: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    msg = str(err.value)
    assert "bad.yaml" in msg and "training.lr_rate" in msg and "training.lr" in msg


def test_wrong_type_and_choice_are_reported(tmp_path):
    with pytest.raises(ConfigError, match="training.batch_size.*whole number"):
        load_config(ROOT / "configs" / "default.yaml", ["training.batch_size=abc"])
    with pytest.raises(ConfigError, match="strategy.name.*fedavg"):
        load_config(ROOT / "configs" / "default.yaml", ["strategy.name=fedmagic"])


def test_privacy_needs_exactly_one_of_sigma_and_target():
    with pytest.raises(ConfigError, match="exactly one"):
        load_config(ROOT / "configs" / "default.yaml", ["privacy.noise_multiplier=1.0"])
    cfg = load_config(ROOT / "configs" / "default.yaml", ["privacy.noise_multiplier=1.0", "privacy.target_epsilon=0"])
    assert cfg.privacy.noise_multiplier == 1.0


def test_torch_gru_is_refused_with_dp():
    with pytest.raises(ConfigError, match="per-example"):
        load_config(ROOT / "configs" / "default.yaml", ["model.gru_impl=torch"])


def test_invalid_yaml_names_the_line(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("run:\n  rounds: [1,\n")
    with pytest.raises(ConfigError, match="broken.yaml.*line"):
        load_config(bad)


def test_carry_forward_init_needs_one_per_variable_layer_and_the_mask():
    with pytest.raises(ConfigError, match="carry_forward"):
        load_config(ROOT / "configs" / "default.yaml", ["model.init=carry_forward", "model.architecture=stacked"])
    with pytest.raises(ConfigError, match="carry_forward"):
        load_config(ROOT / "configs" / "default.yaml", ["model.init=carry_forward", "model.gru_hidden=[4, 4]"])
    with pytest.raises(ConfigError, match="observed_mask"):
        load_config(ROOT / "configs" / "default.yaml", ["model.init=carry_forward", "features.observed_mask=false"])
    load_config(ROOT / "configs" / "default.yaml", ["model.init=carry_forward"])


@pytest.mark.parametrize("overrides, message", [
    (["model.carry_units=[value,worst_high]"], "names 2 units but model.gru_hidden is \\[3\\]"),
    (["model.carry_units=[value,worst,low]"], "unknown unit.*'worst'.*worst_high"),
    (["model.carry_units=[value,value,low]"], "names a unit twice"),
    (["model.carry_units=[value,high,low]", "model.init=random", "model.train_gru=true"], "carry_forward"),
])
def test_carry_units_are_checked(overrides, message):
    with pytest.raises(ConfigError, match=f"model.carry_units.*{message}"):
        load_config(ROOT / "configs" / "default.yaml", overrides)
    load_config(ROOT / "configs" / "default.yaml", ["model.carry_units=[worst_high,worst_low]", "model.gru_hidden=[2]"])


def test_a_checkpoint_written_before_a_key_existed_resumes_with_its_default():
    import json

    from common.config import load_config
    from server.app import resumed_config

    old = json.loads(load_config(None).to_json())
    del old["model"]["carry_units"]  # a checkpoint from before model.carry_units
    assert resumed_config(json.dumps(old), "checkpoint.pt").model.carry_units == []


def test_an_empty_override_is_the_empty_text():
    assert load_config(ROOT / "configs" / "default.yaml", ["model.init_from=x.pt", "model.init_from="]).model.init_from == ""
    with pytest.raises(ConfigError, match=r"'training\.lr' must be a number"):
        load_config(ROOT / "configs" / "default.yaml", ["training.lr="])


def test_a_bundle_saved_before_select_existed_still_reads_every_variable_it_was_trained_on():
    old = load_config(ROOT / "configs" / "default.yaml", ["features.select=[]"]).to_dict()
    del old["features"]["select"]  # a model.pt, checkpoint or run folder written before the key
    again = ExperimentConfig.from_dict(old, origin="old model.pt", fill_defaults=True)
    assert len(again.features.variables) == 37 and again.features.select == []
    new = load_config(ROOT / "configs" / "default.yaml").to_dict()  # one written since keeps its selection
    assert ExperimentConfig.from_dict(new, origin="model.pt", fill_defaults=True).features.select == new["features"]["select"]


def test_an_old_run_folders_config_yaml_loads_with_the_meanings_it_had(tmp_path):
    import yaml

    old = load_config(ROOT / "configs" / "default.yaml", ["features.select=[]"]).to_dict()
    del old["features"]["select"], old["model"]["init"], old["model"]["train_gru"]  # keys it predates
    old["model"].update(architecture="stacked", gru_hidden=[16], carry_units=[])
    saved = tmp_path / "config.yaml"
    saved.write_text("# resolved config of run abc\n" + yaml.safe_dump(old))
    again = load_config(saved)  # as fedgru simulate --config runs/<old>/config.yaml reads it
    assert len(again.features.variables) == 37
    assert (again.model.init, again.model.train_gru) == ("random", True)


def test_a_file_with_its_own_variable_table_reads_all_of_it_unless_it_selects(tmp_path):
    table = "features:\n  variables:\n    - {name: HR, low: 1, high: 300, center: 80, scale: 18}\n" \
            "    - {name: Lactate, low: 0.1, high: 40, center: 1.5, scale: 0.5, log: true}\n"
    own = tmp_path / "own.yaml"
    own.write_text(table)
    assert [v.name for v in load_config(own).features.variables] == ["HR", "Lactate"]
    chosen = tmp_path / "chosen.yaml"
    chosen.write_text(table + "  select: [Lactate]\n")
    assert [v.name for v in load_config(chosen).features.variables] == ["Lactate"]
    over = tmp_path / "over.yaml"  # a file over it that selects
    over.write_text(f"extends: {own}\nfeatures:\n  select: [HR]\n")
    assert [v.name for v in load_config(over).features.variables] == ["HR"]


def test_an_override_error_names_the_override_not_the_file(tmp_path):
    default = ROOT / "configs" / "default.yaml"
    with pytest.raises(ConfigError) as err:
        load_config(default, ["run.rounds=3", "training.lr=abc"])
    assert str(err.value).startswith("override 'training.lr=abc': 'training.lr' must be a number")
    with pytest.raises(ConfigError) as err:  # two overrides together break a rule that spans both
        load_config(default, ["privacy.noise_multiplier=1.0", "run.rounds=3"])
    # the message names the section, not the key, so both overrides are named
    assert str(err.value).startswith("overrides 'privacy.noise_multiplier=1.0', 'run.rounds=3': 'privacy' needs exactly one")
    bad = tmp_path / "bad.yaml"  # the file's own error still names the file, overrides or not
    bad.write_text(f"extends: {default}\ntraining:\n  lr_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key 'training\.lr_rate'"):
        load_config(bad, ["training.lr=0.1"])


def test_select_keeps_the_named_variables_in_the_tables_order_and_travels_unchanged():
    full = load_config(ROOT / "configs" / "default.yaml")
    cfg = load_config(ROOT / "configs" / "default.yaml", ["features.select=[Urine, HR, GCS]"])
    assert [v.name for v in cfg.features.variables] == ["GCS", "HR", "Urine"]  # the table's order
    by_name = {v.name: v for v in full.features.variables}
    assert all(v == by_name[v.name] for v in cfg.features.variables)  # same reference values
    assert cfg.features.static == full.features.static  # descriptors are not cut
    again = ExperimentConfig.from_json(cfg.to_json())  # as a hospital reads it from a message
    assert again.features == cfg.features


@pytest.mark.parametrize("select, message", [
    ("[HR, GSC]", r"'features\.select' names GSC, not in features\.variables \(did you mean 'GCS'\?\)"),
    ("[HR, HR]", r"'features\.select' lists HR more than once"),
    ("HR", r"'features\.select' must be a list"),
])
def test_select_errors_name_the_unknown_or_repeated_variable(tmp_path, select, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"features:\n  select: {select}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: " + message):
        load_config(bad)


def test_selected_variables_read_the_same_channels_from_the_real_files(physionet_files, tmp_path):
    import tarfile

    from common.data.dataset import load_dataset

    set_a, _ = physionet_files
    with tarfile.open(set_a) as tar:  # the first 40 real stays, as a folder (parsing all 4,000 twice is slow)
        members = [m for m in tar if m.isfile() and m.name.endswith(".txt")][:40]
        for m in members:
            (tmp_path / Path(m.name).name).write_bytes(tar.extractfile(m).read())
    small = ["data.cache=false"]
    full = load_config(ROOT / "configs" / "default.yaml", small + ["features.select=[]"])
    cut = load_config(ROOT / "configs" / "default.yaml", small + ["features.select=[HR, GCS, Lactate]"])
    full_ds, cut_ds = load_dataset(full, data_path=tmp_path), load_dataset(cut, data_path=tmp_path)
    V, names = len(full.features.variables), [v.name for v in full.features.variables]
    keep = [names.index(n) for n in ("GCS", "HR", "Lactate")]
    per_kind = full_ds.X.shape[2] // V  # value, observed mask and hours-since channels, each V wide
    columns = [kind * V + v for kind in range(per_kind) for v in keep]
    assert len(full_ds) == 40 and cut_ds.X.shape == (*full_ds.X.shape[:2], per_kind * len(keep))
    assert (cut_ds.X == full_ds.X[:, :, columns]).all()
    assert (cut_ds.S == full_ds.S).all() and (cut_ds.y == full_ds.y).all()


@pytest.mark.parametrize("row, where", [
    ("{name: GCS, low: 3, high: 15, center: 11, scale: 4, normal: 16}", "features.variables[0].normal"),
    ("{name: MechVent, low: 0, high: 1, binary: true, normal: 0.5}", "features.variables[0].normal"),
])
def test_a_normal_value_outside_what_the_variable_can_take_is_refused(tmp_path, row, where):
    """``normal`` (explanations' reference patient) must be a value the variable can take."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"features:\n  variables:\n    - {row}\n")
    with pytest.raises(ConfigError, match=re.escape(where)):
        load_config(bad)
