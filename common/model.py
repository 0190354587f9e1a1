"""The GRU classifier: stacked GRUs over the hourly channels, descriptors joined in,
and a dense head with one logit (two classes, sigmoid) or one per class (softmax).

    x (B, T, C) -> GRU(h1) -> dropout -> GRU(h2) -> ... -> last step (B, h_last)
    [last step, static (B, S)] -> dropout -> Linear(head_hidden) -> ReLU -> Linear(out)

GRU implementations come from a registry: ``fast`` (:class:`~common.dp_gru.FastDPGRU`,
per-example gradients at near ``nn.GRU`` speed), ``opacus`` (``opacus.layers.DPGRU``)
and ``torch`` (``nn.GRU``, non-private training and scoring only). All three share
``nn.GRU``'s state_dict names, so weights trained with one load into another.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from opacus.layers import DPGRU

from .dp_gru import FastDPGRU

GRU_IMPLS: dict[str, Callable[..., nn.Module]] = {
    "fast": FastDPGRU,
    "opacus": DPGRU,
    "torch": nn.GRU,
}


@dataclass
class ModelSpec:
    """Everything needed to rebuild the network (saved in model bundles); made from a
    config by :func:`model_spec`, so the config is the one source of its values."""

    n_channels: int  # input channels per time step (per_variable: n_variables x per-variable channels)
    n_static: int  # width of the static descriptor vector
    n_outputs: int  # 1 for binary (sigmoid), else number of classes (softmax)
    gru_hidden: list[int]
    dropout: float
    head_hidden: int
    pool: str  # last | mean | last_mean
    input_skip: bool
    architecture: str  # stacked | per_variable
    zero_init_head: bool
    n_variables: int  # per_variable: channels are [v_1..v_V | masks | deltas], V each
    init: str = "random"  # random | carry_forward (per_variable: see carry_forward_init)
    train_gru: bool = True  # false: the GRU keeps its initial weights; only the head learns

    def to_dict(self) -> dict:
        return asdict(self)


def output_layer_keys(spec: ModelSpec) -> tuple[str, str]:
    """State-dict keys of the output layer's weight and bias."""
    index = 2 if spec.head_hidden > 0 else 0
    return f"head.{index}.weight", f"head.{index}.bias"


class GRUClassifier(nn.Module):
    def __init__(self, spec: ModelSpec, gru_impl: str = "fast"):
        super().__init__()
        if gru_impl not in GRU_IMPLS:
            raise ValueError(f"unknown GRU implementation {gru_impl!r}; choose one of {', '.join(GRU_IMPLS)}")
        self.spec = spec
        self.per_variable = spec.architecture == "per_variable"
        make = GRU_IMPLS[gru_impl]
        if self.per_variable:
            if spec.n_variables < 1 or spec.n_channels % spec.n_variables:
                raise ValueError("per_variable needs n_channels to be a multiple of n_variables")
            groups = spec.n_variables
            sizes = [spec.n_channels // groups] + list(spec.gru_hidden)
            if gru_impl == "fast":
                self.grus = nn.ModuleList(
                    FastDPGRU(sizes[i], sizes[i + 1], batch_first=True, groups=groups) for i in range(len(spec.gru_hidden))
                )
            elif gru_impl == "torch":  # scoring / non-private: the rows of all groups at once
                self.grus = nn.ModuleList(nn.GRU(sizes[i], sizes[i + 1], batch_first=True) for i in range(len(spec.gru_hidden)))
            else:
                raise ValueError("the per_variable architecture needs gru_impl 'fast' (or 'torch' without DP)")
        else:
            groups = 1
            sizes = [spec.n_channels] + list(spec.gru_hidden)
            self.grus = nn.ModuleList(make(sizes[i], sizes[i + 1], batch_first=True) for i in range(len(spec.gru_hidden)))
        self.gru_impl = gru_impl
        self.drop = nn.Dropout(spec.dropout)
        pooled = groups * spec.gru_hidden[-1] * (2 if spec.pool == "last_mean" else 1)
        head_in = pooled + spec.n_static + (spec.n_channels if spec.input_skip else 0)
        if spec.head_hidden > 0:
            self.head = nn.Sequential(
                nn.Linear(head_in, spec.head_hidden), nn.ReLU(), nn.Linear(spec.head_hidden, spec.n_outputs)
            )
        else:
            self.head = nn.Sequential(nn.Linear(head_in, spec.n_outputs))
        if spec.zero_init_head:
            # Data-independent start: DP noise need not first undo random predictions.
            nn.init.zeros_(self.head[-1].weight)
            nn.init.zeros_(self.head[-1].bias)
        if spec.init == "carry_forward":
            carry_forward_init(self)
        elif spec.init != "random":
            raise ValueError(f"unknown model init {spec.init!r}; choose random or carry_forward")
        if not spec.train_gru:
            for p in self.grus.parameters():
                p.requires_grad_(False)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As nn.Module's, but Opacus DPGRU's internal aliases of the nn.GRU-named
        parameters do not count as missing (they are the same tensors)."""
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        aliases = {
            f"{prefix}.{old}" if prefix else old
            for prefix, module in self.named_modules()
            for old in getattr(module, "old_to_new", {})
        }
        missing = [k for k in result.missing_keys if k not in aliases]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(
                f"weights do not fit this model: missing {missing}, unexpected {result.unexpected_keys}"
            )
        return type(result)(missing, result.unexpected_keys)

    def forward(self, x: torch.Tensor, static: torch.Tensor) -> torch.Tensor:
        """Logits at the end of the window: (B, 1) or (B, classes)."""
        return self.head(self.head_inputs(x, static))

    def hourly_logits(self, x: torch.Tensor, static: torch.Tensor) -> torch.Tensor:
        """Logits after each time step, each reading only the steps up to it: (B, T, out).
        A GRU's state after step t depends on steps <= t only, so this is the risk a
        bedside monitor would have shown at that hour."""
        return self.head(self.head_inputs(x, static, hourly=True))

    def head_inputs(self, x: torch.Tensor, static: torch.Tensor, hourly: bool = False) -> torch.Tensor:
        """What the head reads: (B, F), or (B, T, F) after each step when ``hourly``.
        Layout: [per-variable states (variable-major) or the last GRU's state | descriptors
        | the step's input channels when input_skip]."""
        h = self._per_variable_view(x) if self.per_variable else x
        for i, gru in enumerate(self.grus):
            h, _ = self._run(gru, h)
            if i < len(self.grus) - 1:
                h = self.drop(h)
        if hourly:
            steps = torch.arange(1, h.shape[-2] + 1, device=h.device, dtype=h.dtype).unsqueeze(-1)
            running_mean = h.cumsum(dim=-2) / steps
            pooled = {"last": h, "mean": running_mean, "last_mean": torch.cat([h, running_mean], dim=-1)}[self.spec.pool]
            if self.per_variable:  # (B, V, T, P) -> (B, T, V*P)
                pooled = pooled.permute(0, 2, 1, 3).reshape(x.shape[0], x.shape[1], -1)
            parts = [self.drop(pooled), static.unsqueeze(1).expand(-1, x.shape[1], -1)]
            if self.spec.input_skip:
                parts.append(x)
            return torch.cat(parts, dim=-1)
        if self.spec.pool == "last":
            summary = h[..., -1, :]
        elif self.spec.pool == "mean":
            summary = h.mean(dim=-2)
        else:
            summary = torch.cat([h[..., -1, :], h.mean(dim=-2)], dim=-1)
        summary = summary.reshape(x.shape[0], -1)  # per_variable: all variables' states side by side
        parts = [self.drop(summary), static]
        if self.spec.input_skip:
            parts.append(x[:, -1])
        return torch.cat(parts, dim=1)

    def _per_variable_view(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, c*V) laid out [values | masks | deltas] -> (B, V, T, c)."""
        B, T, C = x.shape
        V = self.spec.n_variables
        return x.reshape(B, T, C // V, V).permute(0, 3, 1, 2)

    def _run(self, gru: nn.Module, h: torch.Tensor):
        if self.per_variable and self.gru_impl == "torch":
            B, V, T, c = h.shape
            out, h_n = gru(h.reshape(B * V, T, c))
            return out.reshape(B, V, T, -1), h_n
        return gru(h)


CARRY_GATE = 10.0  # |pre-activation| of the update gate: sigmoid(10) = 0.99995 (a state held 48 h keeps 99.8%)
CARRY_OFFSET = 1.0  # where the "high" and "low" units turn (in normalised units, ~ one clinical spread)
CARRY_GAIN = 2.0  # their steepness


@torch.no_grad()
def carry_forward_init(model: GRUClassifier) -> None:
    """Start the per-variable GRU as a reader of its variable, with no data involved.

    Every variable's channels are ``[value, observed mask, hours since]`` (value carried
    forward and normalised by the config's reference constants). The update gate is
    shut (z = 0: take the new candidate) in an hour the variable is observed and open
    (z = 1: keep the state) otherwise, so each unit holds what it read at the last
    observation, and 0 before the first. The candidates read only the value:

    - unit 0: the last value, tanh(v);
    - units 1, 2: "high" tanh(g (v - c)) and "low" tanh(g (-v - c)), so a linear head
      can weigh deviations either way (U-shaped risks);
    - unit 3: 1 once the variable was observed (tanh(3) = 0.995), 0 if never;
    - units 4, 5, ...: further high/low pairs, turning further out.

    So ``gru_hidden: [3]`` reads value and deviations, ``[4]`` adds whether it was seen.
    The head then starts from a logistic model over every variable's last value and its
    deviations: what DP-SGD has left to learn is mostly the head's weights.
    Nothing here depends on patients' data, so it costs no privacy.
    """
    spec = model.spec
    if spec.architecture != "per_variable" or len(model.grus) != 1:
        raise ValueError("init carry_forward needs the per_variable architecture with one GRU layer")
    gru = model.grus[0]
    H = spec.gru_hidden[0]
    channels = spec.n_channels // spec.n_variables
    if H < 2 or channels < 2:
        raise ValueError("init carry_forward needs at least 2 GRU units and the observed-mask channel")
    state = {k: torch.zeros_like(v) for k, v in gru.state_dict().items()}  # nn.GRU's names for every impl
    w_ih, b_ih = state["weight_ih_l0"], state["bias_ih_l0"]
    r, z, n = slice(0, H), slice(H, 2 * H), slice(2 * H, 3 * H)
    # Update gate: z = sigmoid(k (1 - 2 mask)), near 0 when observed, near 1 otherwise.
    w_ih[z, 1] = -2 * CARRY_GATE
    b_ih[z] = CARRY_GATE
    del r  # reset gate: W_hh = 0, so it has nothing to reset
    rows = n.start
    w_ih[rows + 0, 0] = 1.0  # last value
    if H > 3:
        b_ih[rows + 3] = 3.0  # seen
    pairs = [u for u in range(1, H) if u != 3]  # high, low, high, low, ...
    for i, unit in enumerate(pairs):
        sign = 1.0 if i % 2 == 0 else -1.0
        w_ih[rows + unit, 0] = sign * CARRY_GAIN
        b_ih[rows + unit] = -CARRY_GAIN * CARRY_OFFSET * (1 + i // 2)  # further pairs turn further out
    gru.load_state_dict(state)  # W_hh and the hidden biases stay 0


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """(B, 1) logits -> (B, 2) [p0, p1]; (B, K) -> softmax. Rows sum to 1."""
    if logits.shape[1] == 1:
        p1 = torch.sigmoid(logits[:, 0])
        return torch.stack([1 - p1, p1], dim=1)
    return torch.softmax(logits, dim=1)


def loss_fn(logits: torch.Tensor, y: torch.Tensor, positive_weight: float = 1.0) -> torch.Tensor:
    """Mean loss over the batch (binary cross-entropy, or cross-entropy)."""
    if logits.shape[1] == 1:
        weight = None
        if positive_weight != 1.0:
            weight = torch.where(y == 1, positive_weight, 1.0).to(logits.dtype)
        return nn.functional.binary_cross_entropy_with_logits(logits[:, 0], y.to(logits.dtype), weight=weight)
    return nn.functional.cross_entropy(logits, y)


def batch_loss(
    model: GRUClassifier, x: torch.Tensor, static: torch.Tensor, y: torch.Tensor,
    positive_weight: float = 1.0, hourly: bool = False,
) -> torch.Tensor:
    """The training loss of one batch. ``hourly`` (binary only): the mean over every hour's
    risk of the loss against the stay's outcome, so the risk is trained to be right early,
    not only at the end of the window. Per example it is still one mean, so Opacus's
    per-example clipping and its ``loss_reduction="mean"`` scaling hold unchanged."""
    if hourly and model.spec.n_outputs == 1:
        logits = model.hourly_logits(x, static)  # (B, T, 1)
        return loss_fn(logits.reshape(-1, 1), y.repeat_interleave(logits.shape[1]), positive_weight)
    return loss_fn(model(x, static), y, positive_weight)


def model_spec(cfg) -> ModelSpec:
    """The network shape a config implies (no data needed: both sides can build it)."""
    from .data.preprocess import num_channels, static_width

    return ModelSpec(
        n_channels=num_channels(cfg.features),
        n_static=static_width(cfg.features),
        n_outputs=1 if cfg.is_binary else cfg.num_classes,
        gru_hidden=list(cfg.model.gru_hidden),
        dropout=cfg.model.dropout,
        head_hidden=cfg.model.head_hidden,
        pool=cfg.model.pool,
        input_skip=cfg.model.input_skip,
        architecture=cfg.model.architecture,
        n_variables=len(cfg.features.variables),
        zero_init_head=cfg.model.zero_init_head,
        init=cfg.model.init,
        train_gru=cfg.model.train_gru,
    )
