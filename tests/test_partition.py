"""Partitions and splits: deterministic, stratified, and exactly covering the data."""

import numpy as np
import pytest

from common.config import load_config
from common.data.partition import format_table, make_partition, partition_table, stratified_split
from tests.conftest import DEFAULT_CONFIG


def _check_cover(hospitals, n):
    all_idx = np.concatenate([h.all for h in hospitals])
    assert len(all_idx) == len(np.unique(all_idx)) == n  # every stay exactly once
    for h in hospitals:
        assert not set(h.train) & set(h.val) and not set(h.train) & set(h.test) and not set(h.val) & set(h.test)


def test_icu_type_partition_is_the_natural_four_hospitals(full_dataset, default_cfg):
    hospitals = make_partition(full_dataset, default_cfg)
    rows = {r.hospital: r for r in partition_table(full_dataset, hospitals, default_cfg.task.classes)}
    assert {k: v.stays for k, v in rows.items()} == {
        "coronary_care": 577, "cardiac_surgery": 874, "medical": 1481, "surgical": 1068,
    }
    assert sum(r.classes["died"] for r in rows.values()) == 554
    table = format_table(list(rows.values())).splitlines()
    assert table[0].split() == ["hospital", "stays", "survived", "died", "train", "val", "test"]
    assert table[-1].split()[:4] == ["total", "4000", "3446", "554"]
    _check_cover(hospitals, 4000)


def test_splits_are_deterministic_and_stratified(full_dataset, default_cfg):
    a = make_partition(full_dataset, default_cfg)
    b = make_partition(full_dataset, default_cfg)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.train, y.train)
        np.testing.assert_array_equal(x.test, y.test)
    y_all = full_dataset.y
    for h in a:
        rate = y_all[h.all].mean()
        for part, frac in ((h.train, 0.7), (h.val, 0.1), (h.test, 0.2)):
            assert abs(len(part) / len(h.all) - frac) < 0.02
            # each split's death rate is within one stay of the hospital's
            assert abs(y_all[part].mean() - rate) <= 1.0 / len(part) + 1e-9
    other = load_config(DEFAULT_CONFIG, ["run.seed=7"])
    c = make_partition(full_dataset, other)
    assert any(not np.array_equal(x.train, z.train) for x, z in zip(a, c))


def test_iid_partition(full_dataset):
    cfg = load_config(DEFAULT_CONFIG, ["partition.scheme=iid", "partition.num_hospitals=5"])
    hospitals = make_partition(full_dataset, cfg)
    sizes = [len(h.all) for h in hospitals]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 4000
    deaths = [int(full_dataset.y[h.all].sum()) for h in hospitals]
    assert max(deaths) - min(deaths) <= 1
    _check_cover(hospitals, 4000)


def test_dirichlet_partition_skews_labels(full_dataset):
    skewed = make_partition(full_dataset, load_config(DEFAULT_CONFIG, ["partition.scheme=dirichlet", "partition.alpha=0.1"]))
    mild = make_partition(full_dataset, load_config(DEFAULT_CONFIG, ["partition.scheme=dirichlet", "partition.alpha=100"]))
    spread = lambda hs: np.std([full_dataset.y[h.all].mean() for h in hs])  # noqa: E731
    assert spread(skewed) > 3 * spread(mild)
    assert min(len(h.all) for h in skewed) >= 10
    _check_cover(skewed, 4000)
    again = make_partition(full_dataset, load_config(DEFAULT_CONFIG, ["partition.scheme=dirichlet", "partition.alpha=0.1"]))
    assert all(np.array_equal(x.all, y.all) for x, y in zip(skewed, again))


def test_column_partition_names_hospitals_and_leaves_out_unknown_values(full_dataset):
    cfg = load_config(DEFAULT_CONFIG, ["partition.scheme=column", "partition.column=Gender",
                                       "partition.names={0: women, 1: men}"])
    hospitals = make_partition(full_dataset, cfg)
    assert [h.name for h in hospitals] == ["women", "men"]
    gender = full_dataset.groups["Gender"]
    for h, value in zip(hospitals, (0, 1)):
        assert (gender[h.all] == value).all()
    known = int(np.isin(gender, [0, 1]).sum())
    assert sum(len(h.all) for h in hospitals) == known < 4000  # a few stays have no recorded sex


def test_stratified_split_small():
    y = np.array([0] * 90 + [1] * 10)
    tr, va, te = stratified_split(np.arange(100), y, load_config(DEFAULT_CONFIG).split, np.random.default_rng(0))
    assert (len(tr), len(va), len(te)) == (70, 10, 20)
    assert (y[tr].sum(), y[va].sum(), y[te].sum()) == (7, 1, 2)


def test_unknown_column_is_a_clear_error(full_dataset):
    cfg = load_config(DEFAULT_CONFIG, ["partition.scheme=column", "partition.column=Age"])
    with pytest.raises(ValueError, match="partition.column 'Age'"):
        make_partition(full_dataset, cfg)


def test_dirichlet_partition_of_many_hospitals_leaves_none_empty(full_dataset):
    """500 hospitals from 4,000 stays at strong skew: each is dealt a few stays first."""
    cfg = load_config(DEFAULT_CONFIG, ["partition.scheme=dirichlet", "partition.alpha=0.5", "partition.num_hospitals=500"])
    hospitals = make_partition(full_dataset, cfg)
    assert len(hospitals) == 500 and min(len(h.all) for h in hospitals) >= 4
    assert max(len(h.all) for h in hospitals) > 3 * 8  # still uneven: sizes are skewed too
    _check_cover(hospitals, 4000)


def test_train_fraction_keeps_a_nested_stratified_share_and_leaves_validation_and_test_whole(full_dataset):
    # simulations.data_size grows the training data of the same hospitals: a smaller share
    # must be a subset of a larger one, each class kept in its share, and the held-out
    # patients the same, or the curve would compare different test sets.
    def split(fraction):
        cfg = load_config(DEFAULT_CONFIG, ["split.folds=5", "split.fold=1", f"split.train_fraction={fraction}"])
        return {h.name: h for h in make_partition(full_dataset, cfg)}

    whole, half, fifth = split(1.0), split(0.5), split(0.2)
    y = full_dataset.y
    for name, h in whole.items():
        assert np.array_equal(half[name].val, h.val) and np.array_equal(half[name].test, h.test)
        assert set(fifth[name].train) <= set(half[name].train) <= set(h.train)
        for k in (0, 1):
            n = int((y[h.train] == k).sum())
            assert int((y[half[name].train] == k).sum()) == max(1, round(n * 0.5))
            assert int((y[fifth[name].train] == k).sum()) == max(1, round(n * 0.2))


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_train_fraction_outside_0_1_is_refused_naming_the_key(fraction):
    from common.config import ConfigError

    with pytest.raises(ConfigError, match="train_fraction"):
        load_config(DEFAULT_CONFIG, [f"split.train_fraction={fraction}"])
