"""Local training and scoring, testable without Flower.

``train_local`` runs one hospital's share of a round: ``steps`` DP-SGD steps (Abadi et
al., "Deep Learning with Differential Privacy", CCS 2016), each on a Poisson sample of
the training split (every example joins independently with probability ``q``, which is
what the accountant assumes; empty samples still take a noise-only step). Per-example
clipping and Gaussian noise are Opacus's (``GradSampleModule`` + ``DPOptimizer``, its
per-tensor loops fused in ``FusedDPOptimizer``). The
FedProx term (Li et al., arXiv:1812.06127) does not depend on data, so it is added to
the gradient *after* clipping and noise: post-processing, no privacy cost.

Sampling and noise use generators the caller provides. Hospitals pass generators
seeded from the operating system's entropy (``secret_generator``): a seed the server
knows would let it subtract the noise.
"""

from __future__ import annotations

import io
import math
import secrets
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from .config import ExperimentConfig, TrainingSection
from .dp_optimizer import FusedDPOptimizer, PerLayerDPOptimizer
from .model import GRUClassifier, batch_loss, probabilities

# Opacus's hooks on a model whose GRU is frozen (the default: only the head trains) make
# torch warn at every backward pass that no input requires a gradient; that is the point.
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with respect to "
                                          "module outputs since no inputs require gradients")


@dataclass
class TensorData:
    X: torch.Tensor  # (N, T, C)
    S: torch.Tensor  # (N, static)
    y: torch.Tensor  # (N,)

    @classmethod
    def from_numpy(cls, X: np.ndarray, S: np.ndarray, y: np.ndarray, device: torch.device) -> TensorData:
        return cls(
            X=torch.as_tensor(X, dtype=torch.float32, device=device),
            S=torch.as_tensor(S, dtype=torch.float32, device=device),
            y=torch.as_tensor(y, dtype=torch.long, device=device),
        )

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass
class DPSettings:
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    per_layer: bool = False  # clip each parameter tensor to max_grad_norm / sqrt(tensors)
    # What the noisy gradient sum is divided by. A hospital passes the sample rate times the
    # training count it declares: divided by the real expected batch (rate x its stays), the
    # released weights would be scaled by a number that depends on its data. None: rate x
    # the data's size (central training, where that size is public).
    expected_batch_size: int | None = None
    # A hospital's Poisson sample is processed in pieces of exactly this many rows (the last
    # padded with rows whose per-example gradients are zeroed), so its memory never depends
    # on how many stays it holds: a message cannot probe that count through an
    # out-of-memory failure. None: the whole sample at once (central training).
    micro_batch: int | None = None


@dataclass
class LocalResult:
    steps: int  # optimizer steps taken (each a noisy release under DP)
    mean_loss: float  # mean training loss over the round's batches (kept at the hospital)
    seconds: float
    optimizer_state: bytes  # to carry the optimizer across rounds (stays local)
    canary_coordinates: np.ndarray | None = None  # a privacy audit's coordinates after the round


@dataclass
class Canaries:
    """Gradient canaries for the one-run privacy audit (``simulations.audit``; Steinke,
    Nasr & Jagielski, "Privacy Auditing with One (1) Training Run", NeurIPS 2023).

    Canary k is an example whose per-example gradient is exactly the clipping norm along
    audit coordinate k, a coordinate no patient's gradient touches; ``included[k]`` says
    whether it is in this hospital's data this run. Included canaries are Poisson-sampled
    like any patient, clipped, summed and noised with them by the same DP optimizer, so the
    audit coordinates after a round are released exactly as the model update is.
    """

    included: torch.Tensor  # (m,) bool
    # Tests only: change the DP optimizer after it is built (a planted bug, e.g. less
    # noise than the accountant assumes, which the audit must catch). Never set by a user.
    tamper: Callable[[DPOptimizer], None] | None = None

    def rows(self, rate: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        """The included canaries this step samples (Poisson, rate ``rate``)."""
        sampled = torch.rand(len(self.included), generator=generator, device="cpu") < rate
        return (sampled & self.included.cpu()).nonzero().squeeze(1).to(device)


def resolve_device(name: str) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' was requested but no CUDA GPU is visible to torch")
        return torch.device("cuda")
    return torch.device("cpu")


def secret_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator seeded from the OS's entropy (not reproducible by design)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(secrets.randbits(63))
    return gen


def training_for_round(cfg: ExperimentConfig, server_round: int) -> TrainingSection:
    """The training settings of one round: the learning rate constant, or cosine-decayed
    over ``run.rounds`` (data-independent, so it costs no privacy)."""
    lr = cfg.training.lr
    if cfg.training.lr_schedule == "cosine":
        lr *= 0.5 * (1 + math.cos(math.pi * (server_round - 1) / cfg.run.rounds))
    return replace(cfg.training, lr=lr)


def make_optimizer(model: torch.nn.Module, training: TrainingSection) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if training.optimizer == "adam":
        return torch.optim.Adam(params, lr=training.lr, weight_decay=training.weight_decay)
    return torch.optim.SGD(params, lr=training.lr, momentum=training.momentum, weight_decay=training.weight_decay)


def optimizer_bytes(optimizer: torch.optim.Optimizer) -> bytes:
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    return buffer.getvalue()


def load_optimizer_bytes(optimizer: torch.optim.Optimizer, blob: bytes, device: torch.device) -> None:
    state = torch.load(io.BytesIO(blob), map_location=device, weights_only=True)
    optimizer.load_state_dict(state)


def train_local(
    model: GRUClassifier,
    data: TensorData,
    training: TrainingSection,
    steps: int,
    dp: DPSettings | None,
    sample_generator: torch.Generator,
    noise_generator: torch.Generator | None = None,
    optimizer_state: bytes | None = None,
    proximal_mu: float = 0.0,
    canaries: Canaries | None = None,
) -> LocalResult:
    """Train ``model`` in place for ``steps`` steps; DP-SGD when ``dp`` is given.
    ``canaries``: a privacy audit's (``Canaries``), trained beside the model."""
    start = time.perf_counter()
    device = data.X.device
    model.to(device).train()
    optimizer = make_optimizer(model, training)
    if optimizer_state:
        load_optimizer_bytes(optimizer, optimizer_state, device)
        for group in optimizer.param_groups:  # carried state, this round's settings
            group.update(lr=training.lr, weight_decay=training.weight_decay)
            if "momentum" in group:
                group["momentum"] = training.momentum
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if proximal_mu > 0 else None
    n = len(data)
    losses: list[tuple[float, int]] = []
    audit = None
    if canaries is not None:
        audit = torch.zeros(len(canaries.included), device=device, requires_grad=True)
        optimizer.add_param_group({"params": [audit]})

    if dp is None:
        order = torch.randperm(n, generator=sample_generator, device="cpu").to(device)
        cursor = 0
        for _ in range(steps):
            if cursor + training.batch_size > n:
                order = torch.randperm(n, generator=sample_generator, device="cpu").to(device)
                cursor = 0
            idx = order[cursor : cursor + training.batch_size]
            cursor += training.batch_size
            optimizer.zero_grad(set_to_none=True)
            loss = batch_loss(model, data.X[idx], data.S[idx], data.y[idx], training.positive_weight, training.hourly_loss)
            loss.backward()
            _add_proximal(params, anchor, proximal_mu)
            if audit is not None:  # no clipping, no noise: the canaries' plain mean gradient
                hits = canaries.rows(len(idx) / n, sample_generator, device)
                audit.grad = torch.zeros_like(audit).index_fill_(0, hits, 1.0) / len(idx)
            optimizer.step()
            losses.append((float(loss.detach()), len(idx)))
        return LocalResult(steps, _mean_loss(losses), time.perf_counter() - start, optimizer_bytes(optimizer),
                           _coordinates(audit))

    if canaries is not None and dp.per_layer:
        # The audit's canaries carry the whole clipping norm on their own coordinate; per-tensor
        # shares would clip them to less and the audit would measure the wrong mechanism.
        raise ValueError("the one-run privacy audit needs privacy.clipping=flat (per_layer clips its canaries)")
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    common = {
        "noise_multiplier": dp.noise_multiplier,
        "expected_batch_size": dp.expected_batch_size or max(1, int(round(dp.sample_rate * n))),
        "loss_reduction": "mean",
        "generator": noise_generator,
    }
    if dp.per_layer:
        # The per-tensor norms add up (in squares) to max_grad_norm: same sensitivity.
        share = dp.max_grad_norm / math.sqrt(len(params))
        dp_optimizer = PerLayerDPOptimizer(optimizer, max_grad_norm=[share] * len(params), **common)
    else:
        # Opacus's DPOptimizer with its per-tensor loops fused (tests/test_dp_optimizer.py).
        dp_optimizer = FusedDPOptimizer(optimizer, max_grad_norm=dp.max_grad_norm, **common)
    if canaries is not None and canaries.tamper is not None:
        canaries.tamper(dp_optimizer)
    taken = 0
    try:
        for _ in range(steps):
            dp_optimizer.zero_grad(set_to_none=True)
            chosen = torch.rand(n, generator=sample_generator, device="cpu") < dp.sample_rate
            idx = chosen.nonzero().squeeze(1).to(device)
            if idx.numel() == 0:
                # Empty Poisson sample: the mechanism still releases pure noise.
                for p in params:
                    p.grad_sample = p.new_zeros((0, *p.shape))
            else:
                pieces = list(idx.split(dp.micro_batch)) if dp.micro_batch else [idx]
                for k, piece in enumerate(pieces):
                    rows, real = _padded(piece, dp.micro_batch)
                    # The model itself, not gsm: Opacus's hooks sit on its layers either way.
                    loss = batch_loss(model, data.X[rows], data.S[rows], data.y[rows], training.positive_weight,
                                      training.hourly_loss)
                    loss.backward()
                    if real is not None:
                        for p in params:  # padding rows move nothing
                            p.grad_sample[~real] = 0.0
                    losses.append((float(loss.detach()), int(piece.numel())))
                    if k < len(pieces) - 1:  # clip and add this piece; the last is clipped by pre_step below
                        dp_optimizer.clip_and_accumulate()
                        for p in params:
                            p.grad_sample, p.grad = None, None
            if audit is not None:
                _add_canary_rows(params, audit, canaries.rows(dp.sample_rate, sample_generator, device), dp.max_grad_norm)
            if dp_optimizer.pre_step():  # clip, sum, add noise, scale (Opacus)
                _add_proximal(params, anchor, proximal_mu)
                optimizer.step()
                taken += 1
    finally:
        dp_optimizer.zero_grad(set_to_none=True)
        gsm._close()  # remove Opacus's hooks so the model can be reused
    return LocalResult(taken, _mean_loss(losses), time.perf_counter() - start, optimizer_bytes(optimizer),
                       _coordinates(audit))


def _padded(piece: torch.Tensor, size: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``piece``'s row indices padded to ``size`` rows (repeating its first), and which
    rows are real; unchanged, and None, without a size."""
    if not size:
        return piece, None
    real = torch.zeros(size, dtype=torch.bool, device=piece.device)
    real[: piece.numel()] = True
    return torch.cat([piece, piece[:1].expand(size - piece.numel())]), real


def _add_canary_rows(params: list[torch.Tensor], audit: torch.Tensor, hits: torch.Tensor, norm: float) -> None:
    """Append the sampled canaries to the step's per-example gradients: zero on every
    model weight, ``norm`` on the canary's own audit coordinate (so clipping keeps it)."""
    batch = params[0].grad_sample.shape[0]
    rows = torch.zeros((batch + len(hits), audit.numel()), device=audit.device, dtype=audit.dtype)
    rows[batch + torch.arange(len(hits), device=audit.device), hits] = norm
    audit.grad_sample = rows
    for p in params:
        p.grad_sample = torch.cat([p.grad_sample, p.grad_sample.new_zeros((len(hits), *p.shape))])


def _coordinates(audit: torch.Tensor | None) -> np.ndarray | None:
    return None if audit is None else audit.detach().cpu().numpy().copy()


def _add_proximal(params: list[torch.Tensor], anchor: list[torch.Tensor] | None, mu: float) -> None:
    if anchor is None:
        return
    with torch.no_grad():
        for p, a in zip(params, anchor):
            if p.grad is not None:
                p.grad.add_(p - a, alpha=mu)


def _mean_loss(losses: list[tuple[float, int]]) -> float:
    total = sum(n for _, n in losses)
    return sum(l * n for l, n in losses) / total if total else float("nan")


def _batches(model: GRUClassifier, X: np.ndarray | torch.Tensor, S: np.ndarray | torch.Tensor, batch: int, pad: bool):
    """(inputs, descriptors, real rows) of each batch on the model's device; ``pad``: every
    batch exactly ``batch`` rows (a short one padded with copies of its first row), so
    memory does not depend on how many patients are scored (a hospital's releases)."""
    model.eval()
    device = next(model.parameters()).device
    X = torch.as_tensor(X, dtype=torch.float32)
    S = torch.as_tensor(S, dtype=torch.float32)
    for i in range(0, X.shape[0], batch):
        x, s = X[i : i + batch], S[i : i + batch]
        real = x.shape[0]
        if pad and real < batch:
            x = torch.cat([x, x[:1].expand(batch - real, *x.shape[1:])])
            s = torch.cat([s, s[:1].expand(batch - real, *s.shape[1:])])
        yield x.to(device), s.to(device), real


@torch.no_grad()
def hourly_logits_at(model: GRUClassifier, X: np.ndarray | torch.Tensor, S: np.ndarray | torch.Tensor,
                     hours: list[int], batch: int = 256, pad: bool = True) -> np.ndarray:
    """The single logit (binary tasks) after each of ``hours`` (1-based): (N, len(hours)),
    each reading only the steps up to its hour. ``pad`` as in :func:`predict_proba`."""
    at = [h - 1 for h in hours]
    out = [model.hourly_logits(x, s)[:real, at, 0].double().cpu() for x, s, real in _batches(model, X, S, batch, pad)]
    return torch.cat(out).numpy() if out else np.zeros((0, len(hours)))


@torch.no_grad()
def predict_proba(model: GRUClassifier, X: np.ndarray | torch.Tensor, S: np.ndarray | torch.Tensor, batch: int = 1024,
                  pad: bool = False) -> np.ndarray:
    """Class probabilities (N, K) with K >= 2 (binary models give [1 - p, p]). ``pad``:
    every batch is run at exactly ``batch`` rows (a short one padded), so memory does not
    depend on how many patients are scored (a hospital's releases)."""
    out = [probabilities(model(x, s)[:real]).cpu() for x, s, real in _batches(model, X, S, batch, pad)]
    if not out:
        k = max(2, model.spec.n_outputs)
        return np.zeros((0, k), dtype=np.float64)
    return torch.cat(out).double().numpy()
