"""FastDPGRU: a drop-in ``torch.nn.GRU`` whose per-example gradients Opacus can use.

Why: DP-SGD clips each example's gradient, so Opacus needs per-example gradients.
``nn.GRU`` hides its recurrence inside one fused kernel, and Opacus's ``DPGRU`` unrolls
it in Python with a hook on every time step (7.5x slower than ``nn.GRU`` on 2 CPU
cores). Yet a GRU's per-example weight gradient costs about what its ordinary weight
gradient costs: for one layer with gates ``g = [r, z, n]``,

    dL/dW_ih[b] = sum_t  dgi[b, t]^T  x[b, t]         dL/db_ih[b] = sum_t dgi[b, t]
    dL/dW_hh[b] = sum_t  dgh[b, t]^T  h[b, t-1]       dL/db_hh[b] = sum_t dgh[b, t]

where ``dgi``/``dgh`` are the gradients of the gate pre-activations (Cho et al. 2014,
arXiv:1406.1078; PyTorch's gate convention). So this module:

1. runs the fused forward (``torch._VF.gru``, cuDNN on GPU) and keeps the hidden states;
2. in backward, recomputes all gates at once from those states (two large matrix
   products, no time loop), runs the only sequential part, the backward recurrence of
   ``dL/dh``, as one small matrix product per step, and
3. forms the per-example gradients with two batched matrix products, stores them, and
   hands them to Opacus through a registered grad sampler, so clipping, noise and
   accounting stay Opacus's.

On a GPU the whole backward of a layer (gates and recurrence) is replayed from a CUDA
graph (:class:`RowGraphs`): otherwise kernel launches, not arithmetic, set its time.

Each layer is its own submodule (``FastGRULayer``) so that Opacus's backward hook for a
layer fires only after that layer's backward has run: every layer receives an initial
state that requires grad, which makes PyTorch wait for the layer's input gradients. The
container's ``state_dict`` uses ``nn.GRU``'s names (``weight_ih_l0``, ...), so weights
move freely between ``nn.GRU``, Opacus's ``DPGRU`` and this module.

Variable lengths: pass ``lengths`` (a 1-D tensor, each >= 1, valid steps are a prefix).
Outputs past a sequence's length are zero and ``h_n`` is the state at its last valid
step, as with packed sequences in ``nn.GRU``.
"""

from __future__ import annotations

import math
import os
from types import SimpleNamespace

import torch
import torch.nn as nn
from opacus.grad_sample import register_grad_sampler


class _GRULayerFunction(torch.autograd.Function):
    """One GRU layer over a padded batch; saves what the per-example backward needs."""

    @staticmethod
    def forward(ctx, x, h0, mask, layer, w_ih, w_hh, b_ih, b_hh):  # noqa: D401
        # x: (B, T, I) batch-first; h0: (B, H); mask: (B, T, 1) or None
        B, T, _ = x.shape
        H = w_hh.shape[1]
        x = x.contiguous()  # backward reads each example's rows in place
        if B == 0:
            out = x.new_zeros((0, T, H))
        else:
            weights = [w_ih, w_hh] + ([b_ih, b_hh] if b_ih is not None else [])
            out, _ = torch._VF.gru(
                x, h0.unsqueeze(0).contiguous(), weights,
                b_ih is not None, 1, 0.0, False, False, True,
            )
        h_seq = out  # unmasked states; padded steps hold values nobody reads
        if mask is not None:
            out = out * mask
        ctx.save_for_backward(x, h0, h_seq, mask, w_ih, w_hh, b_ih, b_hh)
        ctx.layer = layer
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, h0, h_seq, mask, w_ih, w_hh, b_ih, b_hh = ctx.saved_tensors
        layer: FastGRULayer = ctx.layer
        B, T, I = x.shape
        H = w_hh.shape[1]
        if mask is not None:
            grad_out = grad_out * mask
        # Everything stays batch-first (B, T, ...): the per-example products below then
        # read each example's rows in place, with no transposed copies of x, the states
        # or the gate gradients.
        h_prev = torch.cat([h0.unsqueeze(1), h_seq[:, :-1]], dim=1)  # (B, T, H)
        if B == 0:
            dgi = x.new_zeros((0, T, 3 * H))
            dgh = dgi
            dh0 = h0.new_zeros(h0.shape)
        else:
            dgi, dgh, dh0 = gate_gradients(grad_out, x, h_prev, w_ih, w_hh, b_ih, b_hh)
        grad_x = torch.matmul(dgi, w_ih) if ctx.needs_input_grad[0] else None
        grad_h0 = dh0 if ctx.needs_input_grad[1] else None
        if layer.collecting():
            # Opacus will ask for per-example gradients next; it overwrites .grad
            # anyway, so the summed weight gradients are skipped.
            layer.stash(grad_out, dgi, dgh, x, h_prev)
            sums = [None, None, None, None]
        else:
            flat_gi, flat_gh = dgi.reshape(-1, 3 * H), dgh.reshape(-1, 3 * H)
            sums = [
                flat_gi.t() @ x.reshape(-1, I),
                flat_gh.t() @ h_prev.reshape(-1, H),
                flat_gi.sum(0) if b_ih is not None else None,
                flat_gh.sum(0) if b_hh is not None else None,
            ]
        return (grad_x, grad_h0, None, None, *sums)


def _gate_gradients(grad_out, x, h_prev, w_ih, w_hh, b_ih, b_hh):
    """The gradients of the gate pre-activations, ``dgi`` and ``dgh`` (B, T, 3H), and
    ``dL/dh0`` (B, H), from the output gradient and the saved states. Rows (examples)
    never mix: every operation is row by row, or a product with the shared weights."""
    B, T, _ = x.shape
    H = w_hh.shape[1]
    # Recompute every gate at once from the saved states: no time loop.
    gi = torch.matmul(x, w_ih.t())
    gh = torch.matmul(h_prev, w_hh.t())
    if b_ih is not None:
        gi += b_ih
        gh += b_hh
    gi_r, gi_z, gi_n = gi.chunk(3, dim=2)
    gh_r, gh_z, gh_n = gh.chunk(3, dim=2)
    r = torch.sigmoid(gi_r + gh_r)
    z = torch.sigmoid(gi_z + gh_z)
    n = torch.tanh(gi_n + r * gh_n)
    # d(pre-activation of gate) = dh * coefficient, with h = (1-z) n + z h_prev.
    a = (1 - z) * (1 - n * n)  # dh -> d(pre-activation of n)
    coef = torch.stack([a * gh_n * r * (1 - r), (h_prev - n) * z * (1 - z), a * r], dim=2)  # (B,T,3,H)
    dgh, dh_all, dh0 = _recurrence_loop(grad_out, coef, z, w_hh)
    dgh = dgh.view(B, T, 3 * H)
    dgi = torch.cat([dgh[:, :, : 2 * H], dh_all * a], dim=2)
    return dgi, dgh, dh0


def _recurrence_loop(grad_out: torch.Tensor, coef: torch.Tensor, z: torch.Tensor, w_hh: torch.Tensor):
    """The only sequential part of the backward: ``dL/dh_{t-1} = dh_t * z_t + dgh_t @ W_hh``
    from the last step to the first. Returns the gate gradients ``dgh`` (B, T, 3, H),
    ``dh`` at every step (B, T, H) and ``dL/dh0`` (B, H). Each step reads and writes one
    strided (B, .) slice; BLAS takes the row stride. Rows (examples) never mix."""
    B, T, H = grad_out.shape
    dgh = torch.empty((B, T, 3, H), dtype=grad_out.dtype, device=grad_out.device)
    dh_all = torch.empty((B, T, H), dtype=grad_out.dtype, device=grad_out.device)
    carry = torch.zeros((B, H), dtype=grad_out.dtype, device=grad_out.device)
    for t in range(T - 1, -1, -1):
        dh = dh_all[:, t]
        torch.add(grad_out[:, t], carry, out=dh)
        step = dgh[:, t]
        torch.mul(coef[:, t], dh.unsqueeze(1), out=step)
        carry = torch.addmm(dh * z[:, t], step.reshape(B, 3 * H), w_hh)
    return dgh, dh_all, carry


class RowGraphs:
    """A function of per-example rows, replayed from CUDA graphs on a GPU.

    On a GPU the layer's backward is ~4 tiny kernels per time step plus ~30 for the gates,
    and their launches, not the arithmetic, set the step's time. A CUDA graph launches
    them all at once. A graph is fixed to its shapes, and DP-SGD's Poisson batches vary
    in size, so rows are padded up to a few buckets (:meth:`bucket`): one graph per
    bucket and shape, captured the first time it is needed. Padding is safe because the
    function never mixes rows: a padded row's stale values reach only its own outputs,
    which are cut off before anything reads them (before the per-example gradients,
    clipping or noise). Outputs are copied out of the graph's buffers, since the next
    replay (the next layer's backward, say) overwrites them.

    ``fn(*rows, *shared)``: ``rows`` have the examples on dimension 0; ``shared`` (the
    weights; None allowed) are the same for every row; it returns tensors with the
    examples on dimension 0.
    """

    def __init__(self, fn) -> None:
        self.fn = fn
        self.graphs: dict[tuple, SimpleNamespace] = {}

    @staticmethod
    def bucket(rows: int) -> int:
        """Rows rounded up: to a multiple of 32 up to 512, then to a multiple of an eighth
        of the next power of two (under a quarter of padding; few distinct shapes per run)."""
        if rows <= 512:
            return max(32, -(-rows // 32) * 32)
        step = (1 << (rows - 1).bit_length()) // 8
        return -(-rows // step) * step

    def __call__(self, rows: tuple, shared: tuple) -> tuple:
        n = rows[0].shape[0]
        key = (self.bucket(n), tuple(r.shape[1:] for r in rows), tuple(None if s is None else s.shape for s in shared),
               rows[0].dtype, rows[0].device)
        entry = self.graphs.get(key) or self._capture(key, rows, shared)
        for buffer, tensor in zip(entry.rows, rows):
            buffer[:n].copy_(tensor)
        for buffer, tensor in zip(entry.shared, shared):
            if buffer is not None:
                buffer.copy_(tensor)
        entry.graph.replay()
        return tuple(out[:n].clone() for out in entry.outputs)

    def _capture(self, key: tuple, rows: tuple, shared: tuple) -> SimpleNamespace:
        padded, device = key[0], rows[0].device
        e = SimpleNamespace(
            rows=[torch.zeros((padded, *r.shape[1:]), dtype=r.dtype, device=device) for r in rows],
            shared=[None if s is None else s.detach().clone() for s in shared],
        )
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up off the capture: cuBLAS handle and workspace
            self.fn(*e.rows, *e.shared)
        torch.cuda.current_stream(device).wait_stream(side)
        e.graph = torch.cuda.CUDAGraph()
        # thread_local: the backward runs on autograd's device thread, not the caller's.
        with torch.cuda.graph(e.graph, capture_error_mode="thread_local"):
            e.outputs = self.fn(*e.rows, *e.shared)
        self.graphs[key] = e
        return e


_GRAPHED = RowGraphs(_gate_gradients)
# FEDGRU_CUDA_GRAPHS=0 turns the graphs off (the plain code runs on the GPU too).
CUDA_GRAPHS = os.environ.get("FEDGRU_CUDA_GRAPHS", "1") != "0"
# FEDGRU_CUDNN_FLAT=0: leave the weights where they are (cuDNN then copies them every call).
CUDNN_FLAT = os.environ.get("FEDGRU_CUDNN_FLAT", "1") != "0"


def gate_gradients(grad_out, x, h_prev, w_ih, w_hh, b_ih, b_hh):
    """:func:`_gate_gradients`, from a CUDA graph on a GPU (:class:`RowGraphs`)."""
    if x.is_cuda and CUDA_GRAPHS and not torch.cuda.is_current_stream_capturing():
        return _GRAPHED((grad_out, x, h_prev), (w_ih, w_hh, b_ih, b_hh))
    return _gate_gradients(grad_out, x, h_prev, w_ih, w_hh, b_ih, b_hh)


class FastGRULayer(nn.Module):
    """One GRU layer; its per-example gradients come from :class:`_GRULayerFunction`."""

    def __init__(
        self, input_size: int, hidden_size: int, bias: bool, batch_first: bool, device=None, dtype=None, groups: int = 1
    ):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.input_size, self.hidden_size, self.batch_first = input_size, hidden_size, batch_first
        self.groups = groups  # sequences per example sharing these weights (see FastDPGRU)
        self.weight_ih = nn.Parameter(torch.empty(3 * hidden_size, input_size, **kw))
        self.weight_hh = nn.Parameter(torch.empty(3 * hidden_size, hidden_size, **kw))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(3 * hidden_size, **kw))
            self.bias_hh = nn.Parameter(torch.empty(3 * hidden_size, **kw))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self._stash: list[tuple] = []
        self._flat_ptrs: tuple[int, ...] = ()

    def weights(self) -> list[torch.Tensor]:
        return [self.weight_ih, self.weight_hh] + ([self.bias_ih, self.bias_hh] if self.bias_ih is not None else [])

    def flatten_for_cudnn(self) -> None:
        """Lay the weights out in one buffer, in cuDNN's order, as ``nn.GRU`` does.

        Otherwise cuDNN's forward copies them into a fresh buffer at every call (and
        warns about it): a handful of extra launches per step, which is what a GPU step of
        this size waits on. The parameters stay the same objects (their storage moves),
        so optimizers and Opacus keep their references. Done again whenever the weights
        move (``.to()``, say); a no-op on CPU. ``FEDGRU_CUDNN_FLAT=0`` turns it off.
        """
        weights = self.weights()
        ptrs = tuple(w.data_ptr() for w in weights)
        if ptrs == self._flat_ptrs or not CUDNN_FLAT:
            return
        if not all(w.is_cuda and w.dtype == weights[0].dtype and torch.backends.cudnn.is_acceptable(w)
                   for w in weights) or len(set(ptrs)) != len(ptrs) or not torch._use_cudnn_rnn_flatten_weight():
            return
        import torch.backends.cudnn.rnn as cudnn_rnn

        with torch.cuda.device_of(weights[0]), torch.no_grad():
            torch._cudnn_rnn_flatten_weight(weights, len(weights), self.input_size, cudnn_rnn.get_cudnn_mode("GRU"),
                                            self.hidden_size, 0, 1, True, False)
        self._flat_ptrs = tuple(w.data_ptr() for w in weights)

    def collecting(self) -> bool:
        """True while Opacus holds activations of this layer, i.e. will ask for grads."""
        return bool(getattr(self, "activations", None))

    def stash(self, *tensors) -> None:
        self._stash.append(tensors)

    def take_stash(self) -> tuple:
        if not self._stash:
            raise RuntimeError(
                "FastDPGRU: Opacus asked for per-example gradients before the layer's "
                "backward ran. Call FastDPGRU (not FastGRULayer) from your model."
            )
        return self._stash.pop()

    def forward(self, x: torch.Tensor, h0: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        # Inputs come in the container's layout so Opacus finds the batch on its
        # batch dimension: x (B,T,I) & h0 (B,H) if batch_first, else (T,B,I) & (1,B,H);
        # grouped: x (B,G,T,I) & h0 (B,G,H), run as B*G rows.
        if x.is_cuda:
            self.flatten_for_cudnn()
        if self.groups > 1:
            B, G, T, _ = x.shape
            rows = _GRULayerFunction.apply(
                x.reshape(B * G, T, -1), h0.reshape(B * G, -1), mask, self,
                self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh,
            )
            return rows.reshape(B, G, T, -1)
        if not self.batch_first:
            x = x.transpose(0, 1)
            h0 = h0.squeeze(0)
        out = _GRULayerFunction.apply(x, h0, mask, self, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        return out if self.batch_first else out.transpose(0, 1)


@register_grad_sampler(FastGRULayer)
def _fast_gru_grad_sampler(layer: FastGRULayer, activations, backprops: torch.Tensor) -> dict:
    """Per-example gradients from the gate gradients the layer's backward stored.

    Opacus passes ``backprops``, the gradient of the layer output (batch first),
    multiplied by the batch size when the loss is a mean. The stored gate gradients
    come from the unscaled output gradient, so the same factor is applied here.
    """
    grad_out, dgi, dgh, x, h_prev = layer.take_stash()
    # Rows are (example, group), batch-first; an example's gradient sums over its
    # groups and time steps, which are contiguous rows: (B, 3H, G*T) @ (B, G*T, in).
    # Without groups this is the plain sum over time.
    R, T, K = dgi.shape
    B = R // layer.groups
    # The factor, measured per example (the same for all, up to rounding): one measured
    # over the whole batch would let one example whose output gradient overflows (a
    # crafted model) turn every example's gradient into NaN, or into 0 once cleaned, and so
    # move the clipped sum by far more than C. Tensors, not Python floats: reading them on
    # the host would stall a GPU each step.
    ours, theirs = grad_out.reshape(B, -1), backprops.reshape(grad_out.shape).reshape(B, -1)
    denom = (ours * ours).sum(1)
    scale = torch.where(denom > 0, (theirs * ours).sum(1) / denom.clamp_min(1e-30), torch.ones_like(denom))
    gi, gh = dgi.reshape(B, -1, K), dgh.reshape(B, -1, K)
    out = {
        layer.weight_ih: torch.bmm(gi.transpose(1, 2), x.reshape(B, -1, x.shape[-1])).mul_(scale.view(B, 1, 1)),
        layer.weight_hh: torch.bmm(gh.transpose(1, 2), h_prev.reshape(B, -1, h_prev.shape[-1])).mul_(scale.view(B, 1, 1)),
    }
    if layer.bias_ih is not None:
        out[layer.bias_ih] = gi.sum(1).mul_(scale.view(B, 1))
        out[layer.bias_hh] = gh.sum(1).mul_(scale.view(B, 1))
    return _hand_over(layer, out)


def _hand_over(layer: FastGRULayer, grads: dict) -> dict:
    """Give Opacus the per-example gradients without its zero-filled copy.

    For each parameter Opacus allocates a zeroed ``(max_batch_len, ...)`` buffer, copies
    the returned gradient into it and later moves the buffer to ``p.grad_sample``
    (``create_or_accumulate_grad_sample``). For a full batch seen once per backward,
    which is always the case here, our tensor already *is* that buffer: store it where
    Opacus would and return only what still needs Opacus's own path. Measured: about a
    tenth of a DP step at B=256 (simulations/bench_dp_gru.py).
    """
    rest = {}
    for param, grad in grads.items():
        if not hasattr(param, "_current_grad_sample") and grad.shape[0] == getattr(layer, "max_batch_len", -1):
            param._current_grad_sample = grad
        else:
            rest[param] = grad
    return rest


_PARAM_NAMES = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


class FastDPGRU(nn.Module):
    """Drop-in for ``torch.nn.GRU`` (same arguments, same state_dict) that works under
    ``opacus.PrivacyEngine.make_private`` at close to ``nn.GRU``'s speed.

    ``forward(input, hx=None, lengths=None) -> (output, h_n)``; ``lengths`` is optional.
    ``bidirectional=True`` and ``proj_size > 0`` are not supported.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device=None,
        dtype=None,
        *,
        groups: int = 1,
    ):
        super().__init__()
        if bidirectional:
            raise ValueError(
                "FastDPGRU does not support bidirectional=True. Run a second FastDPGRU on "
                "the time-reversed input and concatenate, or use opacus.layers.DPGRU."
            )
        if proj_size:
            raise ValueError("FastDPGRU does not support proj_size (nn.GRU has none either).")
        if num_layers < 1:
            raise ValueError("num_layers must be at least 1")
        if not 0 <= dropout < 1:
            raise ValueError("dropout must be in [0, 1)")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bias, batch_first, float(dropout)
        if groups < 1 or (groups > 1 and not batch_first):
            raise ValueError("groups must be >= 1, and grouped input needs batch_first=True")
        self.bidirectional = False
        self.groups = groups
        self.layers = nn.ModuleList(
            FastGRULayer(input_size if k == 0 else hidden_size, hidden_size, bias, batch_first, device, dtype, groups)
            for k in range(num_layers)
        )
        self.reset_parameters()
        self._register_state_dict_hook(_to_gru_names)
        self._register_load_state_dict_pre_hook(_from_gru_names, with_module=True)

    def reset_parameters(self) -> None:
        """nn.GRU's initialisation: U(-1/sqrt(H), 1/sqrt(H)) for every parameter."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def __getattr__(self, name: str):
        # nn.GRU-style attribute access: gru.weight_ih_l0 -> layers[0].weight_ih
        if "_l" in name:
            base, _, idx = name.rpartition("_l")
            if base in _PARAM_NAMES and idx.isdigit():
                layers = super().__getattr__("layers")
                if int(idx) < len(layers):
                    return getattr(layers[int(idx)], base)
        return super().__getattr__(name)

    @property
    def all_weights(self) -> list[list[nn.Parameter]]:
        return [[p for p in (l.weight_ih, l.weight_hh, l.bias_ih, l.bias_hh) if p is not None] for l in self.layers]

    def forward(self, input: torch.Tensor, hx: torch.Tensor | None = None, lengths: torch.Tensor | None = None):
        """``(output, h_n)`` as ``nn.GRU`` returns them.

        With ``groups=G > 1`` the input is ``(B, G, T, I)``: G sequences per example
        (one per clinical variable, say) that share the weights; ``output`` is
        ``(B, G, T, H)`` and ``h_n`` is ``(num_layers, B, G, H)``.
        """
        grouped = self.groups > 1
        unbatched = input.dim() == 2 and not grouped
        if unbatched:
            input = input.unsqueeze(0 if self.batch_first else 1)
            if hx is not None:
                hx = hx.unsqueeze(1)
        want_dim = 4 if grouped else 3
        if input.dim() != want_dim:
            raise ValueError(f"FastDPGRU(groups={self.groups}) expects a {want_dim}-D input, got {input.dim()}-D")
        if grouped and input.shape[1] != self.groups:
            raise ValueError(f"input has {input.shape[1]} groups, FastDPGRU expects {self.groups}")
        b_dim, t_dim = (0, 1) if self.batch_first else (1, 0)
        B, T = input.shape[b_dim], input.shape[-2 if grouped else t_dim]
        if input.shape[-1] != self.input_size:
            raise ValueError(f"input has {input.shape[-1]} features, FastDPGRU expects {self.input_size}")
        mask = last = None
        if lengths is not None:
            lengths = torch.as_tensor(lengths, device=input.device).long()
            if lengths.shape != (B,):
                raise ValueError("lengths must be a 1-D tensor with one entry per sequence")
            if B and (int(lengths.min()) < 1 or int(lengths.max()) > T):
                raise ValueError(f"every length must be between 1 and the padded length {T}")
            last = lengths - 1
            if grouped:
                lengths = lengths.repeat_interleave(self.groups)
            steps = torch.arange(T, device=input.device)
            mask = (steps.unsqueeze(0) < lengths.unsqueeze(1)).unsqueeze(2).to(input.dtype)  # (rows, T, 1)
        state_shape = (self.num_layers, B, self.groups, self.hidden_size) if grouped else (self.num_layers, B, self.hidden_size)
        if hx is None:
            hx = input.new_zeros(state_shape)
        elif hx.shape != state_shape:
            raise ValueError(f"hx must have shape {state_shape}, got {tuple(hx.shape)}")
        grads_on = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        x = input
        finals = []
        for k, layer in enumerate(self.layers):
            h0 = hx[k]
            if grads_on and not h0.requires_grad:
                # A grad-requiring input makes Opacus's hook wait for this layer's backward.
                h0 = h0.detach().requires_grad_(True)
            h0 = h0 if self.batch_first else h0.unsqueeze(0)
            out = layer(x, h0, mask=mask)  # keyword: Opacus records positional inputs only
            finals.append(self._last_state(out, last))
            x = out
            if self.dropout and self.training and k < self.num_layers - 1:
                x = nn.functional.dropout(x, self.dropout, training=True)
        h_n = torch.stack(finals, dim=0)
        if unbatched:
            out = out.squeeze(0 if self.batch_first else 1)
            h_n = h_n.squeeze(1)
        return out, h_n

    def _last_state(self, out: torch.Tensor, last: torch.Tensor | None) -> torch.Tensor:
        # h_n is read off the layer output, so its gradient reaches Opacus as well.
        seq = out if self.batch_first else out.transpose(0, 1)  # (B, [G,] T, H), time second to last
        if last is None:
            return seq[..., -1, :]
        index = torch.arange(seq.shape[0], device=seq.device)
        return seq[index, :, last] if self.groups > 1 else seq[index, last]

    def extra_repr(self) -> str:
        groups = f", groups={self.groups}" if self.groups > 1 else ""
        return (
            f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, bias={self.bias}, "
            f"batch_first={self.batch_first}, dropout={self.dropout}{groups}"
        )


def _to_gru_names(module: FastDPGRU, state_dict, prefix: str, local_metadata):
    for k in range(module.num_layers):
        for base in _PARAM_NAMES:
            old = f"{prefix}layers.{k}.{base}"
            if old in state_dict:
                state_dict[f"{prefix}{base}_l{k}"] = state_dict.pop(old)
    return state_dict


def _from_gru_names(module: FastDPGRU, state_dict, prefix: str, local_metadata, strict, missing, unexpected, errors):
    for k in range(module.num_layers):
        for base in _PARAM_NAMES:
            new = f"{prefix}{base}_l{k}"
            if new in state_dict:
                state_dict[f"{prefix}layers.{k}.{base}"] = state_dict.pop(new)
