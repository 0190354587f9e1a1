"""Why the model gives a patient the risk it gives: contributions per variable and per
descriptor, in clinical units, at the end of the window or after each hour.

Every contribution is measured against a reference patient at the config's textbook
normal values (:func:`reference_patient`: each variable observed at its ``normal``, else
its ``center``, every hour, each continuous descriptor likewise), so a normal value contributes
about 0 and an abnormal one its difference from normal; the reference patient's own
logit is the ``bias``. (Measured against "nothing observed", a normal heart rate
contributed -0.47: being measured at all, not the value, was what it said.) For the
per-variable model with a linear head the logit is exactly a sum: each variable's
weights times its GRU's final state (and, with ``input_skip``, times its last input
channels), each descriptor's weights times its columns, plus the head's bias
(:func:`exact_contributions`, exact to rounding); the reference's terms are taken off
each. For any other model the contributions are Captum's integrated gradients
(Sundararajan, Taly & Yan, ICML 2017) from the reference patient, summed over each
variable's channels and hours. Either way the contributions and the bias sum to the
logit.

Values are shown in clinical units by undoing the config's normalisation (fixed
constants, so this needs nothing but the config); "last" is the last observation in
the window and the hour it was made.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .config import FeatureSection, StaticSpec, VariableSpec
from .data.preprocess import normalised_normal
from .model import GRUClassifier


@dataclass
class Contribution:
    name: str
    kind: str  # "variable" or "descriptor"
    contribution: float  # to the logit (log-odds of the risk)
    value: float | None  # the last observed value in clinical units (descriptor: its value); None: not observed
    unit: str
    hour: int | None  # the hour (1..T) of that last observation
    label: str = ""  # a categorical descriptor's value (its category's name); a yes/no variable's "yes" or "no"


@dataclass
class Explanation:
    stay_id: str
    logit: float
    risk: float
    bias: float  # the part of the logit no input explains (the head's bias, or the reference patient's logit)
    method: str
    contributions: list[Contribution] = field(default_factory=list)  # largest first

    def top(self, k: int) -> list[Contribution]:
        return self.contributions[:k]


def is_exact(model: GRUClassifier) -> bool:
    """A per-variable model with a linear single-logit head: contributions are exact."""
    return model.per_variable and model.spec.head_hidden == 0 and model.spec.n_outputs == 1


def _static_columns(features: FeatureSection) -> list[tuple[StaticSpec, slice]]:
    out, at = [], 0
    for spec in features.static:
        width = len(spec.categories) if spec.kind == "categorical" else 2
        out.append((spec, slice(at, at + width)))
        at += width
    return out


def reference_patient(features: FeatureSection, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """A patient at the textbook normal values the config writes: (steps, channels) and
    (static width,). Every variable observed at its reference value (``normal`` where
    the config gives one, else ``center``, which normalises to 0) at every step, but one
    the normal patient has no charted value of (``normal_uncharted``: as preprocessing
    writes a variable never observed, value 0, not observed, hours since growing); every
    continuous descriptor at its reference and known; a categorical descriptor, which has no normal, an even mix of its categories
    (so a category contributes how much it differs from their average)."""
    charted = np.asarray([not v.normal_uncharted for v in features.variables], np.float32)
    channels = [np.tile(np.asarray([normalised_normal(v) for v in features.variables], np.float32) * charted,
                        (steps, 1))]
    if features.observed_mask:
        channels.append(np.tile(charted, (steps, 1)))
    if features.time_since_last:  # uncharted: the hours since the window opened, as preprocessing counts them
        hours = (np.arange(1, steps + 1, dtype=np.float32) * features.bin_hours / features.delta_scale_hours)[:, None]
        channels.append((hours * (1 - charted)).astype(np.float32))
    static = []
    for spec in features.static:
        k = len(spec.categories)
        static.append(np.full(k, 1.0 / k, dtype=np.float32) if spec.kind == "categorical"
                      else np.asarray([normalised_normal(spec), 0.0], np.float32))  # its value, and known
    return np.concatenate(channels, axis=1), np.concatenate(static) if static else np.zeros(0, np.float32)


def contributions(model: GRUClassifier, x: torch.Tensor, s: torch.Tensor, features: FeatureSection,
                  hourly: bool = False, steps: int = 64) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Each variable's and descriptor's contribution to the logit against the reference
    patient: (B, V + D), or (B, T, V + D) after each hour; the reference's logit ((), or
    (T,) after each hour); and how they were computed."""
    x_ref, s_ref = reference_patient(features, x.shape[1])
    x_ref = torch.as_tensor(x_ref, device=x.device).unsqueeze(0)
    s_ref = torch.as_tensor(s_ref, device=s.device).unsqueeze(0)
    if is_exact(model):
        parts, _ = exact_contributions(model, x, s, features, hourly=hourly)
        ref_parts, bias = exact_contributions(model, x_ref, s_ref, features, hourly=hourly)
        base = ref_parts[0].sum(-1) + bias
        return parts - ref_parts, base, "exact: the per-variable model's linear head, against a normal patient"
    if hourly:
        raise ValueError("hourly contributions need the per_variable model with a linear head")
    parts, base = integrated_gradients(model, x, s, features, steps=steps, reference=(x_ref, s_ref))
    return parts, torch.tensor(base), "integrated gradients (Captum) from a normal patient"


def exact_contributions(model: GRUClassifier, x: torch.Tensor, s: torch.Tensor, features: FeatureSection,
                        hourly: bool = False) -> tuple[torch.Tensor, float]:
    """Per variable then per descriptor, what each adds to the logit: (B, V + D), or
    (B, T, V + D) after each hour; and the bias. Exact: they sum to the logit."""
    if not is_exact(model):
        raise ValueError("exact contributions need the per_variable model with a linear head (head_hidden 0, binary)")
    spec = model.spec
    V = spec.n_variables
    with torch.no_grad():
        inputs = model.head_inputs(x, s, hourly=hourly)  # (..., F)
        weight = model.head[-1].weight[0]
        bias = float(model.head[-1].bias[0])
        terms = inputs * weight  # (..., F)
        per_state = spec.gru_hidden[-1] * (2 if spec.pool == "last_mean" else 1)
        variables = terms[..., : V * per_state].reshape(*terms.shape[:-1], V, per_state).sum(-1)
        at = V * per_state
        static = terms[..., at : at + spec.n_static]
        if spec.input_skip:  # the step's own channels [values | masks | deltas]: each to its variable
            skip = terms[..., at + spec.n_static :]
            variables = variables + skip.reshape(*skip.shape[:-1], spec.n_channels // V, V).sum(-2)
        descriptors = torch.stack([static[..., cols].sum(-1) for _, cols in _static_columns(features)], dim=-1)
    return torch.cat([variables, descriptors], dim=-1), bias


def integrated_gradients(model: GRUClassifier, x: torch.Tensor, s: torch.Tensor, features: FeatureSection,
                         hour: int | None = None, steps: int = 64,
                         reference: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, float]:
    """Captum's integrated gradients of the logit (of the class with the highest risk, at
    ``hour`` or the end) from the reference patient (:func:`reference_patient` unless
    given), per variable (summed over its channels and hours) and per descriptor:
    (B, V + D), and the reference's logit."""
    from captum.attr import IntegratedGradients

    V = len(features.variables)
    T = x.shape[1]
    model = model.eval()

    def logit(xx, ss):
        out = model.hourly_logits(xx, ss)[:, (hour or T) - 1] if hour else model(xx, ss)
        return out[:, 0] if out.shape[1] == 1 else out.max(dim=1).values

    if reference is None:
        x_ref, s_ref = reference_patient(features, T)
        reference = (torch.as_tensor(x_ref, device=x.device).unsqueeze(0), torch.as_tensor(s_ref, device=s.device).unsqueeze(0))
    x_ref, s_ref = reference
    attributions = IntegratedGradients(logit).attribute(
        (x, s), baselines=(x_ref.expand_as(x), s_ref.expand_as(s)), n_steps=steps, internal_batch_size=256,
    )
    ax, a_static = (a.detach() for a in attributions)
    variables = ax.reshape(x.shape[0], T, x.shape[2] // V, V).sum(dim=(1, 2))
    descriptors = torch.stack([a_static[:, cols].sum(-1) for _, cols in _static_columns(features)], dim=-1)
    with torch.no_grad():
        base = float(logit(x_ref, s_ref)[0])
    return torch.cat([variables, descriptors], dim=-1), base


def denormalise(spec: VariableSpec | StaticSpec, value: float) -> float:
    """A normalised value back in clinical units (the config's constants)."""
    if getattr(spec, "binary", False):
        return float(value)
    if spec.log:
        raw = math.expm1(value * spec.scale + math.log1p(max(spec.center, 0.0)))
    else:
        raw = value * spec.scale + spec.center
    # The normalised values are float32 (about 7 digits): back in clinical units they came out as
    # 59.99999979 years or 1.06e-07 mL of urine. Six significant digits, and nothing below a millionth
    # of the variable's own scale, keep every digit a chart has.
    cleaned = float(f"{raw:.6g}")
    return 0.0 if abs(cleaned) < 1e-6 * max(1.0, abs(spec.center)) else cleaned


def last_observations(x: np.ndarray, features: FeatureSection) -> list[tuple[float | None, int | None]]:
    """Per variable: the last value observed in the window (clinical units) and its hour."""
    V = len(features.variables)
    out = []
    for v, spec in enumerate(features.variables):
        seen = np.flatnonzero(x[:, V + v] > 0.5) if features.observed_mask else np.flatnonzero(x[:, v] != 0)
        if seen.size == 0:
            out.append((None, None))
        else:
            out.append((denormalise(spec, float(x[seen[-1], v])), int(seen[-1]) + 1))
    return out


def descriptor_values(s: np.ndarray, features: FeatureSection) -> list[tuple[float | str | None, str]]:
    """Per descriptor: its value in clinical units (a category's label), or None if unknown."""
    out = []
    for spec, cols in _static_columns(features):
        block = s[cols]
        if spec.kind == "categorical":
            hit = np.flatnonzero(block > 0.5)
            if hit.size == 0:
                out.append((None, ""))
            else:
                category = f"{spec.categories[hit[0]]:g}"
                out.append((spec.labels.get(category, category), ""))
        else:
            out.append((None, spec.unit) if block[1] > 0.5 else (denormalise(spec, float(block[0])), spec.unit))
    return out


def explain(model: GRUClassifier, x: np.ndarray, s: np.ndarray, features: FeatureSection, stay_id: str) -> Explanation:
    """Contributions to one stay's logit at the end of the window, largest first."""
    xt = torch.as_tensor(x, dtype=torch.float32).unsqueeze(0)
    st = torch.as_tensor(s, dtype=torch.float32).unsqueeze(0)
    model = model.eval()
    with torch.no_grad():
        out = model(xt, st)
    logit = float(out[0, 0] if out.shape[1] == 1 else out[0].max())
    parts, _, method = contributions(model, xt, st, features)
    parts = parts[0].numpy()
    bias = logit - float(parts.sum())  # the normal patient's logit (and the integral's small error): the sum is the logit
    last = last_observations(x, features)
    described = descriptor_values(s, features)
    items = [
        Contribution(spec.name, "variable", float(parts[v]), last[v][0], spec.unit, last[v][1],
                     ("yes" if last[v][0] >= 0.5 else "no") if spec.binary and last[v][0] is not None else "")
        for v, spec in enumerate(features.variables)
    ]
    items += [
        Contribution(spec.name, "descriptor", float(parts[len(features.variables) + d]),
                     None if isinstance(value, str) else value, unit, None, value if isinstance(value, str) else "")
        for d, (spec, (value, unit)) in enumerate(zip(features.static, described))
    ]
    items.sort(key=lambda c: -abs(c.contribution))
    risk = 1 / (1 + math.exp(-logit))
    return Explanation(stay_id, logit, risk, bias, method, items)


def format_value(value: float, unit: str = "") -> str:
    """A clinical value as a chart shows it: 3 significant digits, whole numbers from 100
    ("2170 IU/L", not "2.17e+03 IU/L"; "145 mEq/L"), never an exponent; what undoing the
    normalisation leaves of a zero ("1.06e-07 mL") is 0."""
    if abs(value) < 1e-4:
        return f"0 {unit}".rstrip()
    digits = max(0, 2 - math.floor(math.log10(abs(value))))
    text = f"{round(value, digits):.{digits}f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return f"{text} {unit}".rstrip()


def signed(x: float, digits: int = 2) -> str:
    """"+0.42", and "+0.00" for a value that rounds to zero from below: "-0.00" reads as a
    contribution that lowers the risk."""
    rounded = round(float(x), digits)
    return f"{rounded + 0.0 if rounded else 0.0:+.{digits}f}"


def describe(c: Contribution) -> str:
    """'Lactate, last 4.1 mmol/L at hour 30: +0.42'."""
    if c.kind == "variable":  # a yes/no indicator (MechVent) says yes or no, not 1 or 0
        shown = c.label or (format_value(c.value, c.unit) if c.value is not None else "")
        seen = f"last {shown} at hour {c.hour}" if c.value is not None else "not observed"
    elif c.label:
        seen = c.label
    else:
        seen = format_value(c.value, c.unit) if c.value is not None else "unknown"
    return f"{c.name}, {seen}: {signed(c.contribution)}"



def contribution_sizes(model: GRUClassifier, X: np.ndarray, S: np.ndarray, features: FeatureSection,
                       clip: float, batch: int = 256) -> np.ndarray:
    """Each patient's vector of |contribution| per variable and descriptor, clipped to L2
    norm ``clip`` (so one patient moves a sum by at most ``clip``): (N, V + D)."""
    model = model.eval()
    device = next(model.parameters()).device  # a hospital may score on its GPU
    out = []
    for i in range(0, len(X), batch):
        x = torch.as_tensor(X[i : i + batch], dtype=torch.float32, device=device)
        s = torch.as_tensor(S[i : i + batch], dtype=torch.float32, device=device)
        real = x.shape[0]
        if real < batch:  # always ``batch`` rows: memory does not depend on how many patients there are
            x = torch.cat([x, x[:1].expand(batch - real, *x.shape[1:])])
            s = torch.cat([s, s[:1].expand(batch - real, *s.shape[1:])])
        parts = contributions(model, x, s, features, steps=32)[0][:real]
        # NaN or infinite parts (a model that overflows on this patient) count as 0: the row
        # stays within ``clip`` and the noisy sum finite whatever the model (as in DP-SGD's step)
        sizes = torch.nan_to_num(parts.abs(), nan=0.0, posinf=0.0)
        norms = sizes.norm(dim=1, keepdim=True).clamp_min(1e-12)
        out.append((sizes * torch.clamp(clip / norms, max=1.0)).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, len(features.variables) + len(features.static)))
