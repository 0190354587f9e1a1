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
from dataclasses import asdict, dataclass, field

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
    carry_units: list[str] = field(default_factory=list)  # carry_forward: what each unit reads ([]: by gru_hidden)

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
# worst_* units (see carry_forward_init), chosen on PhysioNet 2012 set A against the exact running
# max of the candidate (final states: mean |error| 0.003, 99th percentile 0.08, max 0.2; with
# scale 1 and sharpness 10: 0.015, 0.22, 0.54). Constants of the method, not fitted to patients.
WORST_SHARPNESS = 30.0  # update-gate slope per unit of (s h - new deviation)
WORST_STATE_SCALE = 1.4  # s: makes s h a closer linear stand-in for atanh(h) on [0, 0.9]
WORST_HOLD = 100.0  # update-gate push towards "keep" in an hour the variable is not observed


def carry_unit_kinds(hidden: int) -> list[str]:
    """The layout ``carry_units: []`` gives ``hidden`` units: value, high, low, seen, then
    further high/low pairs (named ``high2``, ``low2``, ... turning further out)."""
    kinds = ["value", "high", "low", "seen"][:hidden]
    for i in range(hidden - len(kinds)):
        kinds.append(f"{('high', 'low')[i % 2]}{2 + i // 2}")
    return kinds


@torch.no_grad()
def carry_forward_init(model: GRUClassifier) -> None:
    """Start the per-variable GRU as a reader of its variable, with no data involved.

    Every variable's channels are ``[value, observed mask, hours since]`` (value carried
    forward and normalised by the config's reference constants). PyTorch's GRU, gates in
    the order r, z, n::

        r = sigmoid(W_ir x + b_ir + W_hr h + b_hr)
        z = sigmoid(W_iz x + b_iz + W_hz h + b_hz)
        n = tanh(W_in x + b_in + r (W_hn h + b_hn))
        h' = (1 - z) n + z h

    W_hn and b_hn stay 0, so the candidate n reads only the hour's value and r does
    nothing. The "last observation" units shut their update gate (z = 0: take the new
    candidate) in an hour the variable is observed and open it (z = 1: keep the state)
    otherwise, so each holds what it read at the last observation, and 0 before the first:

    - ``value``: the last value, tanh(v);
    - ``high``, ``low``: deviations tanh(g (v - c)) and tanh(g (-v - c)), so a linear
      head can weigh deviations either way (U-shaped risks);
    - ``seen``: 1 once the variable was observed (tanh(3) = 0.995), 0 if never;
    - ``high2``, ``low2``, ...: further high/low pairs, turning further out (only in the
      ``carry_units: []`` layout).

    The "worst" units hold the largest deviation observed so far instead of the last one,
    as severity scores read a variable's worst value:

    - ``worst_high``: running max of tanh(a_t), a_t = g (v_t - c), starting from the
      state 0: tanh(g max(0, max_t v_t - c)), 0 while the variable never went above c;
    - ``worst_low``: the same for a_t = g (-v_t - c): how far it went below -c.

    Their candidate is the deviation's; their update gate compares the state with the
    new deviation's pre-activation, z = sigmoid(k (s h - a_t) + K (1 - mask_t)): keep the
    state when it is larger or the hour has no observation, take the candidate when the
    new deviation is larger (W_hz = k s, W_iz = -k g on the value for high (+k g for
    low), -K on the mask, b_iz = K + k g c). A gate is linear in h and x, so it cannot
    compare h = tanh(a_max) with tanh(a_t) exactly; the right threshold, a_t > atanh(h),
    is approximated by a_t > s h (s = WORST_STATE_SCALE). A new deviation just past the
    threshold replaces a slightly larger state (or one just short of it is missed): the
    unit is close to, not exactly, the running max (errors above the constants;
    tests/test_model.py bounds them).

    ``carry_units: []`` lays out ``gru_hidden[0]`` units as value, high, low, seen,
    further pairs (so ``gru_hidden: [3]`` reads value and deviations, ``[4]`` adds
    whether it was seen); a list names each unit. The head then starts from a logistic
    model over these per-variable summaries: what DP-SGD has left to learn is mostly the
    head's weights. Nothing here depends on patients' data, so it costs no privacy.
    """
    spec = model.spec
    if spec.architecture != "per_variable" or len(model.grus) != 1:
        raise ValueError("init carry_forward needs the per_variable architecture with one GRU layer")
    gru = model.grus[0]
    H = spec.gru_hidden[0]
    channels = spec.n_channels // spec.n_variables
    kinds = list(spec.carry_units) or carry_unit_kinds(H)
    if len(kinds) != H:
        raise ValueError(f"carry_units names {len(kinds)} units but the GRU has {H}")
    if (H < 2 and not spec.carry_units) or channels < 2:
        raise ValueError("init carry_forward needs at least 2 GRU units and the observed-mask channel")
    state = {k: torch.zeros_like(v) for k, v in gru.state_dict().items()}  # nn.GRU's names for every impl
    w_ih, b_ih, w_hh = state["weight_ih_l0"], state["bias_ih_l0"], state["weight_hh_l0"]
    z, n = H, 2 * H  # first rows of the update gate and the candidate (reset gate rows 0..H-1 stay 0)
    g, c, k, K = CARRY_GAIN, CARRY_OFFSET, WORST_SHARPNESS, WORST_HOLD
    for u, kind in enumerate(kinds):
        if kind.startswith("worst_"):
            sign = 1.0 if kind == "worst_high" else -1.0
            w_ih[n + u, 0], b_ih[n + u] = sign * g, -g * c  # candidate tanh(a_t), a_t = g (sign v - c)
            w_hh[z + u, u] = k * WORST_STATE_SCALE  # z = sigmoid(k (s h - a_t) + K (1 - mask))
            w_ih[z + u, 0] = -k * sign * g
            w_ih[z + u, 1] = -K
            b_ih[z + u] = K + k * g * c
            continue
        # Update gate: z = sigmoid(k (1 - 2 mask)), near 0 when observed, near 1 otherwise.
        w_ih[z + u, 1] = -2 * CARRY_GATE
        b_ih[z + u] = CARRY_GATE
        if kind == "value":
            w_ih[n + u, 0] = 1.0
        elif kind == "seen":
            b_ih[n + u] = 3.0
        else:  # high, low, high2, low2, ...
            sign = 1.0 if kind.startswith("high") else -1.0
            step = int((kind[4:] if sign > 0 else kind[3:]) or 1)
            w_ih[n + u, 0] = sign * g
            b_ih[n + u] = -g * c * step  # further pairs turn further out
    gru.load_state_dict(state)  # W_hn and the hidden biases stay 0


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
        carry_units=list(cfg.model.carry_units),
    )


def trainable_layout(cfg) -> list[tuple[str, tuple[int, ...]]]:
    """Name and shape of every weight DP training moves, in the model's order: the layout
    of secure aggregation's flat gradient vector, which both sides build alike. Built on
    the meta device: nothing is allocated."""
    with torch.device("meta"):
        model = GRUClassifier(model_spec(cfg), gru_impl=cfg.model.gru_impl)
    return [(name, tuple(p.shape)) for name, p in model.named_parameters() if p.requires_grad]
