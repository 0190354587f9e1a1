"""Opacus's DP-SGD step with its clipping, noise and scaling done for all weights at once.

Opacus's ``DPOptimizer`` clips, noises and scales parameter by parameter: for every
weight tensor a norm, a cast, an ``einsum``, a noise draw, an addition and a division,
each a separate kernel launch and a few Python calls. On a GPU with small models those
launches, not the arithmetic, set the time of the step (issue 13: FastDPGRU at B = 256,
H = 64 spent most of a step launching kernels outside its CUDA-graphed backward).

:class:`FusedDPOptimizer` computes the same mechanism (Abadi et al., "Deep Learning
with Differential Privacy", CCS 2016; Opacus's flat clipping) over one flat
``(batch, all weights)`` matrix:

- per-example norms: one norm over each row (the norm over all weights, which is what
  Opacus computes as the norm of the per-tensor norms);
- clip factors ``min(1, C / (norm + 1e-6))`` and their weighted sum of rows: one
  matrix-vector product;
- Gaussian noise ``N(0, (sigma C)^2)`` on every coordinate: one draw for all weights;
- the division by the expected batch size (``loss_reduction="mean"``): one division.

The flat matrix is a copy of every per-example gradient: on a GPU it costs a fraction of a
millisecond and saves dozens of launches, on a CPU it is pure memory traffic (a 256 x 80k
copy at B = 256, H = 128 slowed the CPU step by a fifth). So the clipping is flat on a GPU
and Opacus's own per-tensor code on a CPU (``flat``: None, the default, decides by device;
True or False forces one; the two are the same arithmetic, tested against each other).

One addition to Opacus: a per-example gradient's coordinates that are NaN or infinite
count as 0 before clipping. A global model can be finite and still overflow on some
patients (a hostile coordinator can craft one that does so only for patients with a
given value); Opacus would then clip NaN to NaN, and the hospital's noisy update would
be NaN exactly when such a patient was sampled: one bit outside the Gaussian mechanism.
Zeroed, each patient still moves the sum by at most C, whatever the model.

Everything else is Opacus's and unchanged: the step skipping and gradient accumulation
(``summed_grad``), the accountant's step hook, ``zero_grad``, the privacy engine's
bookkeeping. ``secure_mode`` (Opacus's floating-point-attack-resistant noise) falls
back to Opacus's own per-tensor code. ``tests/test_dp_optimizer.py`` holds the step
against Opacus's ``DPOptimizer`` on the same per-example gradients: equal without noise,
the same noise scale with it.
"""

from __future__ import annotations

import torch
from opacus.optimizers import DPOptimizer, DPPerLayerOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed


def zero_non_finite_grad_samples(params: list[torch.Tensor]) -> None:
    """Set every NaN or infinite per-example gradient coordinate to 0, in place (see the
    module's docstring: one patient must move the clipped sum by at most C, whatever the
    model). Per example: a row is only ever cleaned of its own values."""
    for p in params:
        parts = p.grad_sample if isinstance(p.grad_sample, list) else [p.grad_sample]  # a list: accumulated batches
        for g in parts:
            torch.nan_to_num_(g, nan=0.0, posinf=0.0, neginf=0.0)


class PerLayerDPOptimizer(DPPerLayerOptimizer):
    """Opacus's ``DPPerLayerOptimizer`` (``privacy.clipping: per_layer``), with the same
    cleaning of non-finite per-example gradients before its clipping."""

    def clip_and_accumulate(self) -> None:
        zero_non_finite_grad_samples(self.params)
        super().clip_and_accumulate()


class FusedDPOptimizer(DPOptimizer):
    """``opacus.optimizers.DPOptimizer`` (same arguments, same guarantees) with flat
    clipping and noise computed for all parameters in a handful of kernels."""

    flat: bool | None = None  # flat clipping: None = on a GPU only (see the module's docstring)

    def clip_and_accumulate(self) -> None:
        samples = self.grad_samples
        flat = samples[0].is_cuda if self.flat is None else self.flat
        if len(samples[0]) == 0 or not flat:  # an empty Poisson sample (zero clip factors), or a CPU: Opacus's code
            zero_non_finite_grad_samples(self.params)  # in place, on the tensors Opacus's code reads
            return super().clip_and_accumulate()
        batch = len(samples[0])
        if any(len(g) != batch for g in samples):  # Opacus's stack of per-tensor norms would refuse this too
            raise ValueError(f"per-example gradients of different batch sizes {sorted({len(g) for g in samples})}: "
                             "every parameter must see the same examples")
        # One (batch, all weights) matrix; a row is one example's whole gradient.
        rows = torch.cat([g.reshape(batch, -1).to(p.dtype) for g, p in zip(samples, self.params)], dim=1)
        torch.nan_to_num_(rows, nan=0.0, posinf=0.0, neginf=0.0)  # the same cleaning, one kernel for all weights
        norms = torch.linalg.vector_norm(rows, dim=1)
        factors = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)  # Opacus's formula
        summed = torch.mv(rows.t(), factors)  # sum over examples of factor * row
        for p, part in zip(self.params, summed.split([p.numel() for p in self.params])):
            _check_processed_flag(p.grad_sample)
            grad = part.view_as(p)
            if p.summed_grad is not None:  # accumulated over skipped steps, as in Opacus
                p.summed_grad += grad
            else:
                p.summed_grad = grad
            _mark_as_processed(p.grad_sample)

    def add_noise(self) -> None:
        summed = [p.summed_grad for p in self.params]
        if self.secure_mode or len({(s.device, s.dtype) for s in summed}) > 1:
            # Opacus's per-tensor draws: its floating-point-attack-resistant noise, or noise
            # drawn in each tensor's own dtype and device (one float32 draw would leave a
            # float64 weight's low bits unmasked)
            return super().add_noise()
        for s in summed:
            _check_processed_flag(s)
        std = self.noise_multiplier * self.max_grad_norm
        reference = summed[0]
        if std == 0:
            noisy = [s.clone() for s in summed]
        else:
            total = sum(s.numel() for s in summed)
            noise = torch.normal(mean=0.0, std=std, size=(total,), device=reference.device, dtype=reference.dtype,
                                 generator=self.generator)
            noisy = torch._foreach_add(summed, [n.view_as(s) for n, s in zip(noise.split([s.numel() for s in summed]),
                                                                              summed)])
        for p, grad in zip(self.params, noisy):
            p.grad = grad.view_as(p)
            _mark_as_processed(p.summed_grad)

    def scale_grad(self) -> None:
        if self.loss_reduction == "mean":
            # Opacus asks accumulated_iterations once per parameter; it is the same for all.
            torch._foreach_div_([p.grad for p in self.params], self.expected_batch_size * self.accumulated_iterations)
