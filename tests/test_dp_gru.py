"""FastDPGRU against nn.GRU (forward), a batch-of-one reference (per-example
gradients) and Opacus's DPGRU (a whole DP training run)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st
from opacus import GradSampleModule, PrivacyEngine
from opacus.layers import DPGRU
from opacus.optimizers import DPOptimizer
from opacus.utils.per_sample_gradients_utils import check_per_sample_gradients_are_correct
from opacus.validators import ModuleValidator

from common.dp_gru import FastDPGRU, RowGraphs, _gate_gradients, gate_gradients

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run by simulations.gpu_check)")


@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("batch_first", [True, False])
def test_forward_equals_nn_gru(num_layers, batch_first):
    torch.manual_seed(0)
    ref = nn.GRU(6, 9, num_layers=num_layers, batch_first=batch_first)
    fast = FastDPGRU(6, 9, num_layers=num_layers, batch_first=batch_first)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(5, 11, 6) if batch_first else torch.randn(11, 5, 6)
    h0 = torch.randn(num_layers, 5, 9)
    for hx in (None, h0):
        out_ref, h_ref = ref(x, hx)
        out, h = fast(x, hx)
        torch.testing.assert_close(out, out_ref, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(h, h_ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("num_layers", [1, 2])
def test_variable_lengths_equal_packed_nn_gru(num_layers):
    torch.manual_seed(1)
    ref = nn.GRU(4, 7, num_layers=num_layers, batch_first=True)
    fast = FastDPGRU(4, 7, num_layers=num_layers, batch_first=True)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(6, 10, 4)
    lengths = torch.tensor([10, 3, 1, 7, 10, 5])
    packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    out_p, h_ref = ref(packed)
    out_ref, _ = nn.utils.rnn.pad_packed_sequence(out_p, batch_first=True, total_length=10)
    out, h = fast(x, lengths=lengths)
    torch.testing.assert_close(out, out_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(h, h_ref, atol=1e-6, rtol=1e-5)


def test_state_dicts_move_both_ways_and_bidirectional_is_refused():
    ref = nn.GRU(3, 5, num_layers=2, bias=False)
    fast = FastDPGRU(3, 5, num_layers=2, bias=False)
    assert set(fast.state_dict()) == set(ref.state_dict())
    fast.load_state_dict(ref.state_dict())
    ref.load_state_dict(fast.state_dict())
    assert fast.weight_hh_l1.shape == ref.weight_hh_l1.shape
    with pytest.raises(ValueError, match="bidirectional"):
        FastDPGRU(3, 5, bidirectional=True)


class _Head(nn.Module):
    """GRU then Linear; reads h_n (the opacus#639 pattern) or the output sequence."""

    def __init__(self, gru: nn.Module, use_h_n: bool, hidden: int = 7):
        super().__init__()
        self.gru, self.use_h_n = gru, use_h_n
        self.fc = nn.Linear(hidden, 3)

    def forward(self, x):
        out, h_n = self.gru(x)
        return self.fc(h_n[-1] if self.use_h_n else out.mean(dim=1))


@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("use_h_n", [True, False])
def test_per_example_gradients_match_opacus_microbatch_reference(num_layers, use_h_n):
    torch.manual_seed(2)
    model = _Head(FastDPGRU(5, 7, num_layers=num_layers, batch_first=True), use_h_n)
    x = torch.randn(8, 6, 5)
    assert check_per_sample_gradients_are_correct(x, model, batch_first=True, atol=1e-6, rtol=1e-4)


def _microbatch(model_fn, inputs, targets, lengths=None):
    """The slow reference: one example at a time, plain autograd."""
    grads = {}
    for i in range(inputs.shape[0]):
        model = model_fn()
        out = model(inputs[i : i + 1], None if lengths is None else lengths[i : i + 1])
        nn.functional.mse_loss(out, targets[i : i + 1], reduction="sum").backward()
        for name, p in model.named_parameters():
            grads.setdefault(name, []).append(p.grad.clone())
    return {k: torch.stack(v) for k, v in grads.items()}


class _TwoLayers(nn.Module):
    """Two FastDPGRU layers (3 inputs, ``groups`` sequences per example) and a linear head."""

    def __init__(self, groups: int, hidden: int):
        super().__init__()
        self.gru = FastDPGRU(3, hidden, num_layers=2, batch_first=True, groups=groups)
        self.fc = nn.Linear(hidden * groups, 1)

    def forward(self, x, lengths=None):
        _, h_n = self.gru(x, lengths=lengths)
        return self.fc(h_n[-1].reshape(x.shape[0], -1))


@pytest.mark.parametrize("groups", [1, 4])
def test_per_example_gradients_with_lengths_and_groups(groups):
    torch.manual_seed(3)

    base = _TwoLayers(groups, 4)
    shape = (6, groups, 9, 3) if groups > 1 else (6, 9, 3)
    x, y = torch.randn(*shape), torch.randn(6, 1)
    lengths = torch.tensor([9, 2, 5, 1, 9, 7])

    def fresh():
        m = _TwoLayers(groups, 4)
        m.load_state_dict(base.state_dict())
        return m

    ref = _microbatch(fresh, x, y, lengths)
    gsm = GradSampleModule(fresh(), loss_reduction="sum")
    nn.functional.mse_loss(gsm(x, lengths), y, reduction="sum").backward()
    for name, p in gsm._module.named_parameters():
        torch.testing.assert_close(p.grad_sample, ref[name], atol=1e-6, rtol=1e-4)


def test_make_private_accepts_fastdpgru_without_validator_errors():
    model = _Head(FastDPGRU(5, 7, batch_first=True), use_h_n=True)
    assert ModuleValidator.validate(model, strict=False) == []
    data = torch.utils.data.TensorDataset(torch.randn(32, 6, 5), torch.randint(0, 3, (32,)))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    engine = PrivacyEngine()
    model, optimizer, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader,
        noise_multiplier=1.0, max_grad_norm=1.0,
    )
    for xb, yb in loader:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(xb), yb).backward()
        optimizer.step()
    assert engine.get_epsilon(1e-5) > 0


def _ordered_params(model: nn.Module) -> list[nn.Parameter]:
    """Parameters in nn.GRU state_dict order, so both GRUs draw the same noise per tensor."""
    gru = model.gru
    names = [k for k in nn.GRU(5, 7, num_layers=2, batch_first=True).state_dict()]
    return [getattr(gru, n) for n in names] + list(model.fc.parameters())


def test_dp_training_ends_where_opacus_dpgru_ends():
    """Same initial weights, same batches, same noise seed: the same parameters."""
    torch.manual_seed(4)
    ref_init = nn.GRU(5, 7, num_layers=2, batch_first=True).state_dict()
    fc_init = nn.Linear(7, 3).state_dict()
    batches = [(torch.randn(12, 6, 5), torch.randint(0, 3, (12,))) for _ in range(5)]
    finals = []
    for cls in (FastDPGRU, DPGRU):
        model = _Head(cls(5, 7, num_layers=2, batch_first=True), use_h_n=True)
        model.gru.load_state_dict(ref_init)
        model.fc.load_state_dict(fc_init)
        gsm = GradSampleModule(model)
        opt = DPOptimizer(
            torch.optim.SGD(_ordered_params(model), lr=0.5), noise_multiplier=0.7, max_grad_norm=0.5,
            expected_batch_size=12, generator=torch.Generator().manual_seed(99),
        )
        for xb, yb in batches:
            opt.zero_grad()
            nn.functional.cross_entropy(gsm(xb), yb).backward()
            opt.step()
        finals.append({**{f"gru.{k}": v for k, v in model.gru.state_dict().items()}, **{f"fc.{k}": v for k, v in model.fc.state_dict().items()}})
    moved = any(not torch.allclose(finals[0][k], ref_init[k.split(".", 1)[1]]) for k in finals[0] if k.startswith("gru."))
    assert moved
    for k in finals[0]:
        torch.testing.assert_close(finals[0][k], finals[1][k], atol=1e-5, rtol=1e-4)


def _backward_inputs(rows, T=7, I=3, H=5, device="cpu", bias=True):
    g = torch.Generator().manual_seed(rows)
    make = lambda *shape: torch.randn(*shape, generator=g).to(device)  # noqa: E731
    per_row = (make(rows, T, H), make(rows, T, I), make(rows, T, H).tanh())  # grad_out, x, h_prev
    w = 1 / H**0.5  # nn.GRU's scale: gradients neither vanish nor explode over T steps
    shared = (make(3 * H, I) * w, make(3 * H, H) * w, make(3 * H) * w if bias else None, make(3 * H) * w if bias else None)
    return per_row, shared


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30))


def test_padded_rows_never_reach_the_real_rows():
    """What the CUDA graphs rely on: a layer's backward never mixes rows, so rows padded
    with anything (here values a million times larger) leave the real rows' gradients
    as they are, up to the rounding of matrix products of another size."""
    rows, shared = _backward_inputs(5)
    junk, _ = _backward_inputs(27)
    padded = [torch.cat([a, b * 1e6]) for a, b in zip(rows, junk)]
    plain = _gate_gradients(*rows, *shared)
    with_padding = _gate_gradients(*padded, *shared)
    for a, b in zip(plain, with_padding):
        torch.testing.assert_close(b[:5], a, atol=1e-6, rtol=1e-5)


@given(st.integers(min_value=1, max_value=200_000))
def test_row_buckets_cover_the_rows_with_little_padding(rows):
    bucket = RowGraphs.bucket(rows)
    assert bucket >= rows and bucket % 32 == 0
    assert bucket - rows < 32 or bucket <= rows * 1.25
    assert RowGraphs.bucket(rows + 1) >= bucket


def test_a_poisson_batch_needs_few_graphs():
    sizes = torch.distributions.Poisson(256.0).sample((2000,)).long().tolist()
    assert len({RowGraphs.bucket(n) for n in sizes}) <= 6


@CUDA
@pytest.mark.parametrize("rows", [1, 37, 256, 300, 9472])
@pytest.mark.parametrize("bias", [True, False])
def test_cuda_graph_backward_equals_the_plain_code(rows, bias):
    """The graph pads the rows to a bucket, so its matrix products have other shapes than
    the plain code's: equal up to float32 rounding (norm-relative error)."""
    per_row, shared = _backward_inputs(rows, T=48, I=11, H=16, device="cuda", bias=bias)
    for _ in range(2):  # the first call captures, the second replays
        for graph, plain in zip(gate_gradients(*per_row, *shared), _gate_gradients(*per_row, *shared)):
            assert torch.isfinite(graph).all() and _relative_error(graph, plain) < 1e-5
        per_row = tuple(t.flip(0) for t in per_row)  # new values, same shapes


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("groups", [1, 4])
def test_per_example_gradients_with_padded_batches(device, groups, monkeypatch):
    """Per-example gradients (on a GPU: cuDNN forward, backward replayed from a CUDA
    graph over rows padded to a bucket) equal a one-example-at-a-time reference on the
    same device computed without graphs. (A CPU reference would differ from a GPU by
    cuDNN's TF32 arithmetic, about 1e-3.)"""
    import common.dp_gru as dp_gru

    torch.manual_seed(5)

    base = _TwoLayers(groups, 8)

    def fresh():
        m = _TwoLayers(groups, 8).to(device)
        m.load_state_dict(base.state_dict())
        return m

    for batch in (37, 70):
        shape = (batch, groups, 20, 3) if groups > 1 else (batch, 20, 3)
        x, y = torch.randn(*shape, device=device), torch.randn(batch, 1, device=device)
        with monkeypatch.context() as plain:
            plain.setattr(dp_gru, "CUDA_GRAPHS", False)
            ref = _microbatch(fresh, x, y, None)
        gsm = GradSampleModule(fresh(), loss_reduction="sum")
        nn.functional.mse_loss(gsm(x), y, reduction="sum").backward()
        for name, p in gsm._module.named_parameters():
            assert _relative_error(p.grad_sample, ref[name]) < 1e-5, name


@CUDA
def test_cuda_weights_live_in_one_buffer_and_forward_equals_cudnn():
    """On a GPU the layer lays its weights out as ``nn.GRU`` does (one buffer, cuDNN's
    order), so cuDNN's forward no longer copies them every call: same outputs as
    ``nn.GRU`` with the same weights, the same Parameter objects, no compaction warning,
    and laid out again after the weights move."""
    import warnings

    torch.manual_seed(3)
    reference = nn.GRU(5, 7, batch_first=True).cuda()
    fast = FastDPGRU(5, 7, batch_first=True).cuda()
    fast.load_state_dict(reference.state_dict())
    params = list(fast.parameters())
    x = torch.randn(9, 12, 5, device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # cuDNN warns when it has to compact the weights
        out, h = fast(x)
        out, h = fast(x)
    storages = {p.untyped_storage().data_ptr() for p in fast.parameters()}
    assert len(storages) == 1 and list(fast.parameters()) == params
    expected, expected_h = reference(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(h, expected_h, atol=1e-5, rtol=1e-4)
    with torch.no_grad():  # an optimizer's in-place update reaches the buffer cuDNN reads
        for p, q in zip(fast.parameters(), reference.parameters()):
            p.add_(0.1)
            q.add_(0.1)
    torch.testing.assert_close(fast(x)[0], reference(x)[0], atol=1e-5, rtol=1e-4)
    fast.cpu().cuda()  # moved: new storage, laid out again on the next call
    torch.testing.assert_close(fast(x)[0], reference(x)[0], atol=1e-5, rtol=1e-4)
    assert len({p.untyped_storage().data_ptr() for p in fast.parameters()}) == 1
