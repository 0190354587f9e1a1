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


def _random_samples(batch: int, scale: float, seed: int, device="cpu") -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn((batch, *s), generator=gen, dtype=torch.float64) * scale).to(device) for s in SHAPES]


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 40), scale=st.floats(0.01, 10.0), clip=st.floats(0.1, 5.0), expected=st.integers(1, 64),
       reduction=st.sampled_from(["mean", "sum"]), seed=st.integers(0, 2**16), flat=st.sampled_from([True, False, None]))
def test_without_noise_equals_opacus(batch, scale, clip, expected, reduction, seed, flat):
    """Clipping (some rows clipped, some not), summing and scaling equal Opacus's, with
    the flat clipping and with the per-tensor one."""
    samples = _random_samples(batch, scale, seed)
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
