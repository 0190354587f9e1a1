"""The GRU classifier: shapes, losses, and DP training through Opacus for each GRU."""

import math

import pytest
import torch

from common.config import load_config
from common.model import GRUClassifier, loss_fn, model_spec, probabilities
from common.training import DPSettings, TensorData, secret_generator, train_local
from tests.conftest import DEFAULT_CONFIG, small_spec


def _spec(n_outputs):
    return small_spec(n_outputs=n_outputs, gru_hidden=[8, 5], dropout=0.1, head_hidden=4)


@pytest.mark.parametrize("impl", ["fast", "opacus", "torch"])
@pytest.mark.parametrize("n_outputs, n_classes", [(1, 2), (4, 4)])
def test_forward_backward(impl, n_outputs, n_classes):
    torch.manual_seed(0)
    model = GRUClassifier(_spec(n_outputs), impl)
    x, s = torch.randn(7, 10, 6), torch.randn(7, 3)
    y = torch.randint(0, n_classes, (7,))
    logits = model(x, s)
    assert logits.shape == (7, n_outputs)
    probs = probabilities(logits)
    assert probs.shape == (7, n_classes)
    torch.testing.assert_close(probs.sum(1), torch.ones(7))
    loss = loss_fn(logits, y)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_state_dicts_move_between_gru_implementations():
    torch.manual_seed(0)
    models = {impl: GRUClassifier(_spec(1), impl) for impl in ("fast", "opacus", "torch")}
    state = models["fast"].state_dict()
    x, s = torch.randn(3, 10, 6), torch.randn(3, 3)
    for m in models.values():
        m.load_state_dict(state, strict=True)
        m.eval()
    ref = models["torch"](x, s)
    for impl in ("fast", "opacus"):
        torch.testing.assert_close(models[impl](x, s), ref, atol=1e-5, rtol=1e-5)


def test_model_spec_follows_the_config():
    cfg = load_config(DEFAULT_CONFIG)
    spec = model_spec(cfg)
    # the 15 SAPS II variables the default selects, 3 channels each (value, observed, hours since)
    assert spec.n_variables == 15 and spec.n_channels == 45 and spec.n_static == 12 and spec.n_outputs == 1
    assert model_spec(load_config(DEFAULT_CONFIG, ["features.select=[]"])).n_channels == 37 * 3
    los = load_config(DEFAULT_CONFIG.parent / "los.yaml")
    assert model_spec(los).n_outputs == 4


@pytest.mark.parametrize("impl", ["fast", "opacus"])
def test_dp_training_step_with_head(impl):
    """Regression for opacus#639 (a GRU followed by a Linear head under DP-SGD)."""
    torch.manual_seed(0)
    model = GRUClassifier(_spec(1), impl)
    data = TensorData(torch.randn(40, 10, 6), torch.randn(40, 3), torch.randint(0, 2, (40,)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = load_config(DEFAULT_CONFIG, ["training.batch_size=8"])
    result = train_local(model, data, cfg.training, steps=3, dp=DPSettings(1.0, 1.0, 0.2), sample_generator=secret_generator(), noise_generator=secret_generator())
    assert result.steps == 3
    after = model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.isfinite(v).all() for v in after.values())


def test_empty_poisson_batch_still_takes_a_noisy_step():
    torch.manual_seed(0)
    model = GRUClassifier(_spec(1), "fast")
    data = TensorData(torch.randn(5, 10, 6), torch.randn(5, 3), torch.randint(0, 2, (5,)))
    cfg = load_config(DEFAULT_CONFIG, ["training.optimizer=sgd", "training.lr=1.0"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # sample rate so small that every Poisson sample is empty
    result = train_local(model, data, cfg.training, steps=2, dp=DPSettings(1.0, 1.0, 1e-9), sample_generator=secret_generator(), noise_generator=secret_generator())
    assert result.steps == 2  # both steps were noisy releases
    assert all(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # pure noise moved every weight


@pytest.mark.parametrize("impl", ["fast", "torch"])
def test_per_variable_input_skip_gives_the_head_the_last_step(impl):
    """per_variable + input_skip: the head also reads the last step's channels directly,
    so with every GRU weight at zero the output still follows the last values."""
    torch.manual_seed(0)
    spec = small_spec(gru_hidden=[2], architecture="per_variable", n_variables=2, input_skip=True)
    model = GRUClassifier(spec, impl).eval()
    assert model.head[-1].in_features == 2 * 2 + 3 + 6
    with torch.no_grad():
        for gru in model.grus:
            for p in gru.parameters():
                p.zero_()
    x, s = torch.randn(4, 10, 6), torch.randn(4, 3)
    changed = x.clone()
    changed[:, -1] += 1.0
    assert not torch.allclose(model(x, s), model(changed, s))
    changed_early = x.clone()
    changed_early[:, 0] += 1.0
    torch.testing.assert_close(model(x, s), model(changed_early, s))  # GRUs at zero forget the past
    model.train()
    loss_fn(model(x, s), torch.randint(0, 2, (4,))).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def _carry_forward_model(impl, *extra):
    cfg = load_config(DEFAULT_CONFIG, ["model.architecture=per_variable", "model.gru_hidden=[4]",
                                       "model.init=carry_forward", *extra])
    torch.manual_seed(0)
    return cfg, GRUClassifier(model_spec(cfg), impl).eval()


@pytest.mark.parametrize("impl", ["fast", "torch"])
def test_carry_forward_init_holds_each_variables_last_observation(impl):
    """Each unit holds what it read at the variable's last observation: the value
    (tanh v), the high/low deviation units and seen (1); 0 for a variable never
    observed, however long ago the last observation was."""
    cfg, model = _carry_forward_model(impl)
    V, T = len(cfg.features.variables), 48
    x = torch.zeros(3, T, 3 * V)
    x[0, 5:, 0], x[0, 5, V] = 1.5, 1.0  # variable 0 seen once, at hour 5 (then carried forward)
    x[1, 10:, 0], x[1, 10, V] = -0.7, 1.0  # seen at hour 10, then again at hour 30 with a new value
    x[1, 30:, 0], x[1, 30, V] = -2.0, 1.0
    x[2, 47, 0], x[2, 47, V] = 0.3, 1.0  # seen in the last hour only
    with torch.no_grad():
        states, _ = model._run(model.grus[0], model._per_variable_view(x))
    last = states[:, :, -1]  # (B, V, 4)
    value, high, low, seen = last[:, 0].unbind(-1)
    torch.testing.assert_close(seen, torch.full((3,), float(torch.tanh(torch.tensor(3.0)))), atol=1e-3, rtol=0)
    torch.testing.assert_close(value, torch.tanh(torch.tensor([1.5, -2.0, 0.3])), atol=1e-3, rtol=0)
    torch.testing.assert_close(high, torch.tanh(2 * (torch.tensor([1.5, -2.0, 0.3]) - 1)), atol=1e-3, rtol=0)
    torch.testing.assert_close(low, torch.tanh(2 * (-torch.tensor([1.5, -2.0, 0.3]) - 1)), atol=1e-3, rtol=0)
    assert last[:, 1:].abs().max() < 3e-3  # the other variables were never observed: states stay at 0


def test_carry_forward_with_three_units_reads_value_and_deviations_only():
    cfg, model = _carry_forward_model("torch", "model.gru_hidden=[3]")
    V = len(cfg.features.variables)
    x = torch.zeros(1, 48, 3 * V)
    x[0, 20:, 0], x[0, 20, V] = -1.5, 1.0
    with torch.no_grad():
        states, _ = model._run(model.grus[0], model._per_variable_view(x))
    v = torch.tensor(-1.5)
    expected = torch.stack([torch.tanh(v), torch.tanh(2 * (v - 1)), torch.tanh(2 * (-v - 1))])
    torch.testing.assert_close(states[0, 0, -1], expected, atol=1e-3, rtol=0)


def test_carry_forward_init_starts_from_no_data():
    """The same weights whatever the seed: the initialisation reads no patient."""
    _, a = _carry_forward_model("fast")
    torch.manual_seed(123)
    b = GRUClassifier(a.spec, "fast")
    for key, value in a.grus.state_dict().items():
        torch.testing.assert_close(value, b.grus.state_dict()[key])


def test_frozen_gru_gets_neither_updates_nor_noise_under_dp():
    """train_gru false: DP-SGD moves only the head; the GRU's weights come back unchanged."""
    cfg, model = _carry_forward_model("fast", "model.train_gru=false", "training.batch_size=8")
    model.train()
    assert not any(p.requires_grad for p in model.grus.parameters())
    n = 40
    data = TensorData(torch.randn(n, 48, model.spec.n_channels), torch.randn(n, model.spec.n_static),
                      torch.randint(0, 2, (n,)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train_local(model, data, cfg.training, steps=3, dp=DPSettings(1.0, 1.0, 0.2),
                         sample_generator=secret_generator(), noise_generator=secret_generator())
    assert result.steps == 3
    after = model.state_dict()
    for key in before:
        if key.startswith("grus."):
            assert torch.equal(before[key], after[key]), key
        else:
            assert not torch.equal(before[key], after[key]), key


def test_frozen_gru_head_gets_exact_per_example_gradients():
    """With the GRU frozen no input of the head requires grad (torch warns about its
    full backward hook); Opacus's per-example gradients must still be each example's own."""
    from opacus import GradSampleModule

    cfg, model = _carry_forward_model("fast", "model.train_gru=false", "model.dropout=0")
    model.train()
    x, s, y = torch.randn(5, 48, model.spec.n_channels), torch.randn(5, model.spec.n_static), torch.randint(0, 2, (5,))
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")  # as train_local
    loss_fn(model(x, s), y).backward()
    samples = {n: p.grad_sample.clone() for n, p in model.named_parameters() if p.requires_grad}
    gsm._close()
    assert set(samples) == {"head.0.weight", "head.0.bias"}
    for i in range(5):
        model.zero_grad()
        loss_fn(model(x[i : i + 1], s[i : i + 1]), y[i : i + 1]).backward()
        for name, grads in samples.items():
            torch.testing.assert_close(grads[i], dict(model.named_parameters())[name].grad)


def _exact_running_max(values, observed, sign):
    """The running max of tanh(g (sign v - c)) over observed hours, from the state 0."""
    from common.model import CARRY_GAIN, CARRY_OFFSET

    candidate = torch.tanh(CARRY_GAIN * (sign * values - CARRY_OFFSET))
    candidate = torch.where(observed, candidate, torch.zeros_like(candidate))  # 0: the start state
    return torch.cummax(candidate, dim=-1).values


@pytest.mark.parametrize("impl", ["fast", "torch"])
def test_worst_units_hold_the_running_max_of_their_deviation(impl):
    """worst_high / worst_low follow the exact running max of their deviation through
    gaps (values carried forward, unobserved hours held); a variable never observed
    stays at 0; value still reads the last observation."""
    cfg, model = _carry_forward_model(impl, "model.gru_hidden=[3]", "model.carry_units=[value,worst_high,worst_low]")
    V, T = len(cfg.features.variables), 48
    gen = torch.Generator().manual_seed(0)
    B = 64
    observed = torch.rand(B, T, generator=gen) < 0.3
    observed[:, 0] = False  # every sequence starts with a gap
    raw = torch.randn(B, T, generator=gen) * 1.5
    index = torch.where(observed, torch.arange(T), torch.zeros(T, dtype=torch.long)).cummax(dim=1).values
    values = torch.where(observed.cumsum(1) > 0, raw.gather(1, index), torch.zeros(B, T))  # carried forward
    x = torch.zeros(B, T, 3 * V)
    x[:, :, 0], x[:, :, V] = values, observed.float()
    with torch.no_grad():
        states, _ = model._run(model.grus[0], model._per_variable_view(x))
    value, worst_high, worst_low = states[:, 0].unbind(-1)  # (B, T) each
    for got, sign in ((worst_high, 1.0), (worst_low, -1.0)):
        error = (got - _exact_running_max(values, observed, sign)).abs()
        assert error.max() < 0.15 and error.mean() < 0.015, (error.max(), error.mean())
    last_seen = observed.cumsum(1) > 0
    torch.testing.assert_close(value[last_seen], torch.tanh(values[last_seen]), atol=1e-3, rtol=0)
    assert states[:, 1:].abs().max() < 1e-6  # the other variables were never observed
    assert states[:, 0][~last_seen].abs().max() < 1e-6  # nor variable 0 before its first observation


def test_worst_unit_is_exact_for_a_rising_then_falling_deviation():
    """A larger deviation replaces the state, smaller ones and gaps leave it: the state is
    the running max itself, not only close to it, when values move far apart."""
    cfg, model = _carry_forward_model("torch", "model.gru_hidden=[2]", "model.carry_units=[worst_high,worst_low]")
    V = len(cfg.features.variables)
    x = torch.zeros(1, 48, 3 * V)
    for hour, v in ((3, 0.2), (10, 1.4), (20, 2.5), (30, 1.0), (40, -3.0)):
        x[0, hour:, 0], x[0, hour, V] = v, 1.0
    with torch.no_grad():
        states, _ = model._run(model.grus[0], model._per_variable_view(x))
    at = {h: states[0, 0, h] for h in (5, 15, 25, 35, 47)}
    high, low = math.tanh(2.0 * (2.5 - 1)), math.tanh(2.0 * (3.0 - 1))  # g = 2, c = 1
    expected = {5: (0, 0), 15: (math.tanh(2.0 * 0.4), 0), 25: (high, 0), 35: (high, 0), 47: (high, low)}
    for hour, pair in expected.items():
        torch.testing.assert_close(at[hour], torch.tensor(pair, dtype=torch.float32), atol=2e-3, rtol=0)


def test_named_carry_units_lay_out_the_default_units_unchanged():
    """carry_units: [] and the same units named give the same weights; the init reads no
    data (the same weights whatever the seed)."""
    _, default = _carry_forward_model("fast")
    _, named = _carry_forward_model("fast", "model.carry_units=[value,high,low,seen]")
    torch.manual_seed(123)
    _, worst = _carry_forward_model("fast", "model.gru_hidden=[3]", "model.carry_units=[value,worst_high,worst_low]")
    again = GRUClassifier(worst.spec, "fast")
    for key, value in default.grus.state_dict().items():
        torch.testing.assert_close(value, named.grus.state_dict()[key])
        torch.testing.assert_close(worst.grus.state_dict()[key], again.grus.state_dict()[key])
