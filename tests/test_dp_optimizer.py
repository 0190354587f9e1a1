"""FusedDPOptimizer against Opacus's DPOptimizer, the reference it must equal.

Both get the same per-example gradients (set on plain parameters, as Opacus's
GradSampleModule would) and take one ``pre_step``: without noise the resulting
gradients must be equal; with noise, they must differ from the clipped mean by Gaussian
noise of exactly the scale the accountant assumes (sigma C / expected batch), fresh on
every coordinate and every step.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.optimizers import DPOptimizer

from common.dp_optimizer import FusedDPOptimizer

SHAPES = [(3, 4), (5,), (2, 2, 3)]


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run by simulations.gpu_check)")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


def _params(shapes=SHAPES, device="cpu") -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.zeros(s, dtype=torch.float64, device=device)) for s in shapes]


def _step(cls, grad_samples: list[torch.Tensor], *, sigma: float, clip: float, expected: int,
          reduction: str = "mean", generator: torch.Generator | None = None,
          flat: bool | None = True) -> list[torch.Tensor]:
    params = _params([g.shape[1:] for g in grad_samples], grad_samples[0].device)
    optimizer = cls(torch.optim.SGD(params, lr=1.0), noise_multiplier=sigma, max_grad_norm=clip,
                    expected_batch_size=expected, loss_reduction=reduction, generator=generator)
    if cls is FusedDPOptimizer:
        optimizer.flat = flat  # the flat clipping on any device (by default: on a GPU only)
    for p, g in zip(params, grad_samples):
        p.grad_sample = g.clone()
    assert optimizer.pre_step()
    return [p.grad.clone() for p in params]


def _random_samples(batch: int, scale: float, seed: int, device="cpu", shapes=SHAPES) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn((batch, *s), generator=gen, dtype=torch.float64) * scale).to(device) for s in shapes]


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 40), scale=st.floats(0.01, 10.0), clip=st.floats(0.1, 5.0), expected=st.integers(1, 64),
       reduction=st.sampled_from(["mean", "sum"]), seed=st.integers(0, 2**16), flat=st.sampled_from([True, False, None]),
       shapes=st.lists(st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple), min_size=1, max_size=4))
def test_without_noise_equals_opacus(batch, scale, clip, expected, reduction, seed, flat, shapes):
    """Clipping (some rows clipped, some not), summing and scaling equal Opacus's, with
    the flat clipping and with the per-tensor one, for any number and shapes of weights."""
    samples = _random_samples(batch, scale, seed, shapes=shapes)
    ours = _step(FusedDPOptimizer, samples, sigma=0.0, clip=clip, expected=expected, reduction=reduction, flat=flat)
    reference = _step(DPOptimizer, samples, sigma=0.0, clip=clip, expected=expected, reduction=reduction)
    for a, b in zip(ours, reference):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@CUDA
def test_without_noise_equals_opacus_on_cuda():
    samples = _random_samples(37, 2.0, seed=11, device="cuda")
    ours = _step(FusedDPOptimizer, samples, sigma=0.0, clip=1.0, expected=30)
    reference = _step(DPOptimizer, samples, sigma=0.0, clip=1.0, expected=30)
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_an_empty_batch_releases_only_noise_of_the_right_scale():
    empty = [torch.zeros((0, *s), dtype=torch.float64) for s in SHAPES]
    assert all(torch.equal(g, torch.zeros_like(g)) for g in _step(FusedDPOptimizer, empty, sigma=0.0, clip=1.0,
                                                                    expected=8))
    gen = torch.Generator().manual_seed(1)
    noisy = torch.cat([g.flatten() for g in _step(FusedDPOptimizer, empty, sigma=2.0, clip=1.5, expected=1,
                                                  generator=gen)])
    assert noisy.std().item() == pytest.approx(3.0, rel=0.6)  # 29 coordinates: a loose check; the next test is tight


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("flat", [True, False])
def test_noise_has_the_scale_the_accountant_assumes_and_is_fresh(device, flat):
    """sigma C / expected batch on every coordinate, independent across coordinates and
    steps: the clipped mean subtracted, the rest is N(0, (sigma C / B)^2)."""
    sigma, clip, expected, batch = 1.7, 0.8, 16, 10
    samples = _random_samples(batch, 3.0, seed=7, device=device)
    exact = torch.cat([g.flatten() for g in _step(DPOptimizer, samples, sigma=0.0, clip=clip, expected=expected)])
    gen = torch.Generator(device=device).manual_seed(123)
    draws = torch.stack([
        torch.cat([g.flatten() for g in _step(FusedDPOptimizer, samples, sigma=sigma, clip=clip, expected=expected,
                                              generator=gen, flat=flat)]) - exact
        for _ in range(400)
    ]).cpu()  # (steps, coordinates)
    target = sigma * clip / expected
    n = draws.numel()
    # The sample variance of n Gaussians has relative sd sqrt(2 / n) (~1% here): 5 sd.
    assert draws.var().item() / target**2 == pytest.approx(1.0, abs=5 * math.sqrt(2 / n))
    assert abs(draws.mean().item()) < 5 * target / math.sqrt(n)
    # Fresh noise: no two coordinates and no two steps move together.
    coordinates = torch.corrcoef(draws.t())
    off_diagonal = coordinates[~torch.eye(len(coordinates), dtype=torch.bool)]
    assert off_diagonal.abs().max().item() < 0.3  # 400 draws: |r| of independent pairs stays near 0.05
    assert torch.unique(draws, dim=0).shape[0] == draws.shape[0]


def test_a_reused_gradient_is_refused_as_in_opacus():
    """Opacus refuses a second step on the same per-example gradients (each example once
    per step: the accountant's assumption). So does the fused optimizer."""
    params = _params()
    optimizer = FusedDPOptimizer(torch.optim.SGD(params, lr=1.0), noise_multiplier=1.0, max_grad_norm=1.0,
                                 expected_batch_size=4)
    for p, g in zip(params, _random_samples(4, 1.0, seed=3)):
        p.grad_sample = g
    optimizer.step()
    with pytest.raises(ValueError):
        optimizer.step()


def test_training_uses_the_fused_optimizer():
    """The hospital's local training takes its DP step through FusedDPOptimizer (the
    optimizer these tests hold to Opacus's), not a third implementation."""
    import common.training as training

    assert training.FusedDPOptimizer is FusedDPOptimizer
    assert issubclass(FusedDPOptimizer, DPOptimizer)


def _optimizer(params, **kw) -> FusedDPOptimizer:
    return FusedDPOptimizer(torch.optim.SGD(params, lr=1.0), **{"noise_multiplier": 1.0, "max_grad_norm": 1.0,
                                                                "expected_batch_size": 4, **kw})


@pytest.mark.parametrize("flat", [True, False])
def test_noise_comes_from_the_hospitals_generator_and_is_fresh_every_step(flat):
    """The noise is drawn from the generator the hospital passes (seeded from its OS),
    never from torch's global one (a simulation seeds that from the run's config, which
    the server knows); and one optimizer draws new noise at every step."""
    samples = _random_samples(4, 1.0, seed=5)

    def steps(generator_seed: int, global_seed: int, count: int = 3) -> list[torch.Tensor]:
        torch.manual_seed(global_seed)
        params = _params()
        optimizer = _optimizer(params, generator=torch.Generator().manual_seed(generator_seed))
        optimizer.flat = flat
        out = []
        for _ in range(count):
            optimizer.zero_grad()
            for p, g in zip(params, samples):
                p.grad_sample = g.clone()
            assert optimizer.pre_step()
            out.append(torch.cat([p.grad.flatten() for p in params]))
        return out

    first = steps(generator_seed=1, global_seed=0)
    assert all(torch.equal(a, b) for a, b in zip(first, steps(generator_seed=1, global_seed=99)))  # global seed: no effect
    assert not any(torch.equal(a, b) for a, b in zip(first, steps(generator_seed=2, global_seed=0)))  # its own seed: all
    assert not torch.equal(first[0], first[1]) and not torch.equal(first[1], first[2])  # fresh each step


def test_accumulated_batches_are_divided_as_in_opacus():
    """Two backward passes before a step (grad_sample lists): Opacus divides by the expected
    batch times the passes; so does the fused step."""
    first, second = _random_samples(3, 1.0, seed=8), _random_samples(5, 1.0, seed=9)
    grads = []
    for cls in (FusedDPOptimizer, DPOptimizer):
        params = _params()
        optimizer = cls(torch.optim.SGD(params, lr=1.0), noise_multiplier=0.0, max_grad_norm=0.7, expected_batch_size=4)
        for p, a, b in zip(params, first, second):
            p.grad_sample = [a.clone(), b.clone()]
        assert optimizer.accumulated_iterations == 2 and optimizer.pre_step()
        grads.append([p.grad.clone() for p in params])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_secure_mode_and_mixed_dtypes_keep_opacus_per_tensor_noise():
    """secure_mode (noise resistant to floating-point attacks) is Opacus's own code; a
    float64 weight beside float32 ones gets float64 noise (one float32 draw for all would
    leave the float64 weight's low bits unmasked)."""
    samples = _random_samples(4, 1.0, seed=2)
    released = []
    for cls in (FusedDPOptimizer, DPOptimizer):
        params = _params()
        optimizer = cls(torch.optim.SGD(params, lr=1.0), noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4,
                        generator=torch.Generator().manual_seed(4), secure_mode=True)
        for p, g in zip(params, samples):
            p.grad_sample = g.clone()
        optimizer.pre_step()
        released.append(torch.cat([p.grad.flatten() for p in params]))
    torch.testing.assert_close(released[0], released[1], rtol=0, atol=0)  # the same draws: Opacus's code

    params = [torch.nn.Parameter(torch.zeros(50, dtype=torch.float32)), torch.nn.Parameter(torch.zeros(50, dtype=torch.float64))]
    optimizer = _optimizer(params, generator=torch.Generator().manual_seed(3))
    params[0].grad_sample = torch.zeros((4, 50), dtype=torch.float32)
    params[1].grad_sample = torch.zeros((4, 50), dtype=torch.float64)
    optimizer.pre_step()
    noise = params[1].grad * 4  # the float64 weight's noise (no gradient, expected batch 4)
    assert params[1].grad.dtype == torch.float64
    assert not torch.equal(noise, noise.float().double())  # not a float32 draw


def test_per_example_gradients_of_different_batches_are_refused():
    params = _params()
    optimizer = _optimizer(params)
    optimizer.flat = True
    for p, g in zip(params, _random_samples(4, 1.0, seed=1)):
        p.grad_sample = g
    params[1].grad_sample = params[1].grad_sample[:3]
    with pytest.raises(ValueError):
        optimizer.pre_step()


def test_the_privacy_audit_refuses_per_layer_clipping():
    """The one-run audit's canaries carry the whole clipping norm; per-layer shares would
    clip them and the audit would measure another mechanism: refused before any step."""
    from common.config import load_config
    from common.training import Canaries, DPSettings, TensorData, train_local

    data = TensorData(torch.zeros(4, 2, 3), torch.zeros(4, 0), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="clipping=flat"):
        train_local(torch.nn.Linear(3, 1), data, load_config(None).training, 1, DPSettings(1.0, 1.0, 0.5, per_layer=True),
                    sample_generator=torch.Generator(), canaries=Canaries(torch.ones(2, dtype=torch.bool)))


@pytest.mark.parametrize("flat", [True, False])
def test_a_patient_whose_gradient_overflows_still_moves_the_sum_by_at_most_c(flat):
    """A finite global model can overflow on one patient (a hostile coordinator can craft
    one that does so only for some patients). Opacus would clip NaN to NaN, and the noisy
    update would be NaN exactly when that patient was sampled. Here its non-finite
    coordinates count as 0: the release is finite and the patient's share bounded by C."""
    samples = _random_samples(6, 3.0, seed=5)
    broken = [g.clone() for g in samples]
    broken[0][2] = float("nan")
    broken[1][2, 0] = float("inf")
    broken[2][4, 1, 1] = float("-inf")
    gen = torch.Generator().manual_seed(3)
    noisy = _step(FusedDPOptimizer, broken, sigma=1.0, clip=1.0, expected=6, generator=gen, flat=flat)
    assert all(torch.isfinite(g).all() for g in noisy)
    # without noise: exactly the step on the gradients with those coordinates set to 0
    zeroed = [torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0) for g in broken]
    ours = _step(FusedDPOptimizer, broken, sigma=0.0, clip=1.0, expected=1, reduction="sum", flat=flat)
    reference = _step(DPOptimizer, zeroed, sigma=0.0, clip=1.0, expected=1, reduction="sum")
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # patient 2 alone (every other row zeroed): its contribution's norm is at most C
    alone = [torch.zeros_like(g) for g in broken]
    for a, g in zip(alone, broken):
        a[2] = g[2]
    share = _step(FusedDPOptimizer, alone, sigma=0.0, clip=1.0, expected=1, reduction="sum", flat=flat)
    assert math.sqrt(sum(float((g ** 2).sum()) for g in share)) <= 1.0 + 1e-9
