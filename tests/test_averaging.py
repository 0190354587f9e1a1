"""The final model as an exponential average of the rounds' global models
(server.averaging): against a plain loop, across a checkpoint, and never in place of a
model when nothing trained."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from server.averaging import ROUNDS_KEY, STATE_KEY, ModelAverage


def _model(value: float) -> ArrayRecord:
    return ArrayRecord({"head.weight": Array(np.full((1, 3), value, dtype=np.float32)),
                        "head.bias": Array(np.array([value], dtype=np.float32))})


def test_the_average_weighs_each_round_as_the_decay_says():
    average = ModelAverage(0.9)
    models = [0.0, 1.0, 2.0, 5.0]
    for r, m in enumerate(models, start=1):
        average.update(_model(m), r)
    expected = models[0]
    for t, m in enumerate(models[1:], start=2):  # the slow reference: the recursion written out, with the warm-up
        d = min(0.9, (1 + t) / (10 + t))
        expected = d * expected + (1 - d) * m
    final = average.final(_model(5.0))
    assert final["head.bias"].numpy().dtype == np.float32  # the last model's dtypes
    np.testing.assert_allclose(final["head.weight"].numpy(), np.full((1, 3), expected), rtol=1e-6)
    # the warm-up: a short run's first model weighs little (3/12 * 4/13 * 5/14 of it is left after 4 rounds,
    # where a decay of 0.9 from the start would leave 0.73)
    first = ModelAverage(0.9)
    for r, m in enumerate((1.0, 0.0, 0.0, 0.0), start=1):
        first.update(_model(m), r)
    assert first.final(_model(0.0))["head.bias"].numpy()[0] == pytest.approx((3 / 12) * (4 / 13) * (5 / 14), rel=1e-6)


def test_the_decay_warms_up_to_its_setting():
    from server.averaging import decay_at

    assert decay_at(0.9, 2) == pytest.approx(3 / 12) and decay_at(0.9, 80) == pytest.approx(0.9)
    assert decay_at(0.5, 10) == 0.5  # never above the setting


def test_decay_zero_and_a_run_that_never_trained_release_the_last_model():
    last = _model(3.0)
    assert ModelAverage(0.9).final(last) is last  # no round trained: nothing to average
    zero = ModelAverage(0.0)
    zero.update(_model(1.0), 1)
    assert zero.final(last) is last
    with pytest.raises(ValueError, match="decay"):
        ModelAverage(1.0)


def test_a_resumed_run_continues_the_same_average():
    """A restarted coordinator reads the average from its checkpoint's strategy state, and
    takes its key out so the strategy's own loader never sees it."""
    whole, first = ModelAverage(0.8), ModelAverage(0.8)
    for r, m in ((1, 1.0), (2, 2.0)):
        whole.update(_model(m), r)
        first.update(_model(m), r)
    state = {"m_t": {"x": np.zeros(1)}, **first.state_dict()}
    resumed = ModelAverage(0.8)
    resumed.load_state_dict(state)
    assert STATE_KEY not in state and "m_t" in state
    for r, m in ((3, 4.0), (4, 8.0)):
        whole.update(_model(m), r)
        resumed.update(_model(m), r)
    np.testing.assert_allclose(resumed.final(_model(0))["head.weight"].numpy(), whole.final(_model(0))["head.weight"].numpy())
    assert resumed.rounds == whole.rounds == (1, 4)
    fresh = ModelAverage(0.8)
    fresh.load_state_dict({})  # a checkpoint from before the average: it starts again, at the resume
    fresh.update(_model(2.0), 3)
    assert fresh.final(_model(2.0))["head.bias"].numpy()[0] == 2.0 and fresh.rounds == (3, 3)
    # a checkpoint that kept an average but not its rounds (written before they were kept): the first round is
    # unknown, and stays unknown rather than becoming the resume's
    older = {k: v for k, v in first.state_dict()[STATE_KEY].items() if k != ROUNDS_KEY}
    unknown = ModelAverage(0.8)
    unknown.load_state_dict({STATE_KEY: older})
    unknown.update(_model(4.0), 3)
    assert unknown.rounds is None and unknown.updates == 3
    assert ROUNDS_KEY not in unknown.state_dict()[STATE_KEY]


def test_the_average_survives_the_checkpoint_file(tmp_path):
    from server.checkpoint import RunSnapshot, load_checkpoint, save_checkpoint

    average = ModelAverage(0.9)
    for r, m in enumerate((1.0, 2.0, 3.0), start=1):
        average.update(_model(m), r)
    snapshot = RunSnapshot(run_id="r", round=3, config_json="{}", arrays={k: v.numpy() for k, v in _model(3.0).items()},
                           strategy_state=average.state_dict(), hospital_dp_state=None, hospitals=[], rounds=[])
    save_checkpoint(snapshot, tmp_path / "checkpoint.pt")
    resumed = ModelAverage(0.9)
    resumed.load_state_dict(dict(load_checkpoint(tmp_path / "checkpoint.pt").strategy_state))
    assert resumed.updates == 3 and resumed.rounds == (1, 3)
    np.testing.assert_allclose(resumed.final(_model(0))["head.weight"].numpy(), average.final(_model(0))["head.weight"].numpy())


def test_the_report_names_the_rounds_the_released_model_averages():
    """A run resumed from a checkpoint that held no average averages only the rounds after
    its resume: the settings say which rounds, not "the rounds' global models"."""
    from server.report.sections import released_model_words

    assert "of the global models of the rounds that trained from 31 to 60 (decay 0.9" in released_model_words(0.9, [31, 60])
    assert "of the global models of round 5 (" in released_model_words(0.9, [5, 5])
    assert "of the rounds' global models (" in released_model_words(0.9, [])  # a run folder from before
    assert released_model_words(0.0, []) == "Released model: the last round's global model"
