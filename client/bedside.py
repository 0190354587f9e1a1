"""At the bedside: a hospital scores its own patients with a saved model bundle.

- :func:`hourly_risks`: the risk after each hour, reading only what was observed up to
  that hour (``fedgru predict --hourly``);
- :func:`explain_stay`: why this patient (``fedgru explain``; ``common.explain``);
- :func:`monitor_page`: a stay's risk hour by hour with the decision threshold and the
  observations that moved it most (``fedgru monitor``).

Everything here runs on the hospital's own data and shows patient values to the
hospital's own staff; none of it is sent anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common.bundle import Bundle, monitor_readings
from common.data.dataset import Dataset
from common.document import Image, Section, Table, to_html
from common.explain import (
    Explanation,
    denormalise,
    describe,
    exact_contributions,
    explain,
    format_value,
    integrated_gradients,
    is_exact,
    signed,
)
from common.files import patient_output


def hourly_risks(bundle: Bundle, ds: Dataset, batch: int = 512) -> np.ndarray:
    """(N, T) risk of the positive class after each hour (binary tasks)."""
    if bundle.spec.n_outputs != 1:
        raise ValueError("hourly risks are for binary tasks (one logit)")
    model = bundle.model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(ds), batch):
            x = torch.as_tensor(ds.X[i : i + batch], dtype=torch.float32)
            s = torch.as_tensor(ds.S[i : i + batch], dtype=torch.float32)
            out.append(torch.sigmoid(model.hourly_logits(x, s)[..., 0]).double().numpy())
    return np.concatenate(out) if out else np.zeros((0, ds.X.shape[1]))


def charted(X: np.ndarray, features) -> np.ndarray | None:
    """(N, T, V) whether each variable was charted in each hour of ``X``: from the
    observed-mask channels, else from the hours-since-last channels (0 where charted);
    None for a config with neither (values carried forward do not say which hour had one)."""
    V = len(features.variables)
    if features.observed_mask:
        return X[:, :, V:2 * V] > 0.5
    if features.time_since_last:
        return X[:, :, V:2 * V] == 0
    return None


def observed_hours(ds: Dataset, features) -> np.ndarray:
    """(N,) each stay's last hour of the window with an observation (1-based), 0 for a
    stay with none (descriptors alone). A stay still in the ICU has no hours after it; a
    finished one had nothing charted there. Read from the observed-mask channels, else
    from the hours-since-last channels (0 where observed); a config with neither carries
    values forward, so a stay with any value counts as observed to the window's end."""
    seen = charted(ds.X, features)
    if seen is None:
        seen = np.zeros(ds.X.shape[:2] + (1,), dtype=bool)
        seen[:, -1, 0] = (ds.X[:, :, :len(features.variables)] != 0).any(axis=(1, 2))
    any_seen = seen.any(axis=2)  # (N, T)
    last = any_seen.shape[1] - np.argmax(any_seen[:, ::-1], axis=1)
    return np.where(any_seen.any(axis=1), last, 0).astype(np.int64)


def stay_index(ds: Dataset, stay_id: str) -> int:
    hits = np.flatnonzero(ds.stay_ids.astype(str) == str(stay_id))
    if hits.size == 0:
        raise KeyError(stay_id)
    return int(hits[0])


def explain_stay(bundle: Bundle, ds: Dataset, stay_id: str) -> Explanation:
    i = stay_index(ds, stay_id)
    return explain(bundle.model, ds.X[i], ds.S[i], bundle.config.features, str(stay_id))


MIN_JUMP = 0.01  # the least change of risk in an hour the monitor lists as a jump
MIN_MOVE = 0.005  # the least change of a variable's contribution (log-odds) listed behind a jump
NO_MOVER = "no value observed that hour moved it: the hours passing since the last values did"


@dataclass
class Jump:
    """An hour at which the risk moved, and the observations behind it."""

    hour: int
    before: float
    after: float
    movers: list[tuple[str, str, float]]  # (variable, "value unit" seen that hour or "", change of its contribution)


def jumps(bundle: Bundle, ds: Dataset, i: int, risks: np.ndarray, top: int = 3, per_hour: int = 3) -> list[Jump]:
    """The ``top`` hours with the largest change of risk, each with the variables whose
    contribution to the logit changed most in that hour (exact for the per-variable
    model; integrated gradients otherwise)."""
    features = bundle.config.features
    V = len(features.variables)
    x = torch.as_tensor(ds.X[i : i + 1], dtype=torch.float32)
    s = torch.as_tensor(ds.S[i : i + 1], dtype=torch.float32)
    change = np.abs(np.diff(np.concatenate([[risks[0]], risks])))
    # a change below MIN_JUMP is not a jump (0.194 -> 0.186 was shown as one, labelled on the chart)
    hours = [int(h) for h in np.argsort(-change)[:top] if h > 0 and change[h] >= MIN_JUMP]
    if is_exact(bundle.model):
        parts, _ = exact_contributions(bundle.model, x, s, features, hourly=True)
        per_hour_parts = parts[0].numpy()  # (T, V + D)
        deltas = {h: per_hour_parts[h, :V] - per_hour_parts[h - 1, :V] for h in hours}
    else:
        deltas = {}
        for h in hours:
            now, _ = integrated_gradients(bundle.model, x, s, features, hour=h + 1)
            before, _ = integrated_gradients(bundle.model, x, s, features, hour=h)
            deltas[h] = (now - before)[0, :V].numpy()
    was_charted = charted(ds.X[i : i + 1], features)
    out = []
    for h in sorted(hours):
        movers = []
        for v in np.argsort(-np.abs(deltas[h])):
            spec = features.variables[v]
            seen = (was_charted[0, h, v] if was_charted is not None
                    else h == 0 or ds.X[i, h, v] != ds.X[i, h - 1, v])
            # only what was observed that hour, as the page's column says: a variable never charted
            # moved the risk too ("GCS -0.00") through the hours passing, not through a value
            if seen and abs(deltas[h][v]) >= MIN_MOVE and len(movers) < per_hour:
                value = format_value(denormalise(spec, float(ds.X[i, h, v])), spec.unit)
                movers.append((spec.name, value, float(deltas[h][v])))
        out.append(Jump(h + 1, float(risks[h - 1]), float(risks[h]), movers))
    return out


def variables_read(ds, bundle) -> str:
    """The charted variables the model reads, and (names only) those this export charts
    that it does not: a lactate of 21 mmol/L played no part in a risk from a model that
    does not read lactate, and a clinician should not assume it did."""
    read = [v.name for v in bundle.config.features.variables]
    descriptors = [s.name for s in bundle.config.features.static]
    unread = sorted(ds.summary.read.unknown_parameters) if ds.summary else []
    text = f"this model reads {len(read)} charted variables: {', '.join(read)}"
    if descriptors:
        text += f", and {len(descriptors)} admission descriptors: {', '.join(descriptors)}"
    # A descriptor charted again during the stay (PhysioNet's Weight) is read at admission
    # only: "Weight plays no part" beside explain's "Weight, 118 kg: -0.11" told a
    # clinician two opposite things (a new user's try, 2026-12-06).
    again = [name for name in unread if name in descriptors]
    unread = [name for name in unread if name not in descriptors]
    if unread:
        text += f"; {len(unread)} others charted in this export play no part in its risks: {', '.join(unread)}"
    if again:
        text += (f"; {', '.join(again)} {'is' if len(again) == 1 else 'are'} read at admission only: "
                 "the values charted later play no part")
    return text


def monitor_page(bundle: Bundle, ds: Dataset, stay_ids: list[str], out: Path, thresholds: np.ndarray,
                 latched: bool = False) -> str:
    """Write an HTML page (plots embedded) of each stay's hourly risk against the risk that
    raises a flag at each hour (``thresholds``: one per hour; the run's own, read for each
    hour so that the same share of patients is flagged at every hour, and with
    ``latched`` moved up by the run's margin: the flag then stays on, ``common.onset``);
    return a text summary."""
    import tempfile

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sections, lines = [], []
    out.parent.mkdir(parents=True, exist_ok=True)
    # The page embeds its plots: they are drawn in a folder of their own, gone once the page is written
    plots = tempfile.TemporaryDirectory(prefix="fedgru-monitor-")
    decision = bundle.info.get("threshold")  # what `fedgru predict` flags at, on the last hour's risk alone
    full_thresholds = thresholds
    readings = monitor_readings(bundle.info, thresholds if latched else None)  # the run's, the same for every stay
    for stay_id in stay_ids:
        i = stay_index(ds, stay_id)
        one = ds.subset(np.array([i]))
        last = int(observed_hours(one, bundle.config.features)[0])
        if not last:
            sections.append(Section(f"Stay {stay_id}", [
                "No observation in the window, only descriptors: no risk is shown (the descriptors alone, age and "
                "sex, are not a reading of this stay)."]))
            lines.append(f"stay {stay_id}: no observation in the window, not scored")
            continue
        whole = hourly_risks(bundle, one)[0]
        window, risks = len(whole), whole[:last]  # up to its last observation: no hour after it is made up
        thresholds = full_thresholds[:last]
        found = jumps(bundle, ds, i, risks)
        hours = np.arange(1, len(risks) + 1)
        first = next((int(h) for h, r, t in zip(hours, risks, thresholds) if r >= t), None)
        fig, ax = plt.subplots(figsize=(9.5, 3.6))
        if first is not None and latched:  # the flag stays on from its first hour
            ax.axvspan(first - 0.5, len(risks) + 0.5, color="#cc0000", alpha=0.08, lw=0, label="flagged")
        ax.plot(hours, risks, "-o", ms=3, color="#3465a4", label="risk after each hour")
        same = bool(np.allclose(thresholds, thresholds[-1]))
        ax.step(hours, thresholds, where="mid", color="#cc0000", ls="--", lw=1,
                label=(f"flag at {thresholds[-1]:.3f}" if same else "flag level at this hour")
                + (" (stays on once raised)" if latched else ""))
        for jump in found:
            label = ", ".join(name for name, _, _ in jump.movers[:2])
            if label:
                ax.annotate(label, (jump.hour, jump.after), textcoords="offset points", xytext=(0, 10), fontsize=7, ha="center")
        ax.set_xlabel("hour since admission")
        ax.set_ylabel("risk of the outcome")
        ax.set_ylim(0, max(1e-3, min(1.0, max(risks.max(), thresholds.max()) * 1.25)))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)  # beside: off the curve
        ax.set_title(f"stay {stay_id}")
        fig.tight_layout()
        png = Path(plots.name) / f"{stay_id}.png"
        fig.savefig(png, dpi=110)
        plt.close(fig)
        rows = [[j.hour, f"{j.before:.3f} -> {j.after:.3f}",
                 "; ".join(f"{n}{' ' + v if v else ''} ({signed(d)})" for n, v, d in j.movers) or NO_MOVER]
                for j in found]
        flag_text = ((f"flagged from hour {first} on" if latched else f"first flagged at hour {first}") if first
                     else "never flagged")
        sections.append(Section(f"Stay {stay_id}", [
            Image(png, f"risk of stay {stay_id} after each hour"),
            f"Risk at hour {len(risks)}: {risks[-1]:.3f} (the monitor's flag level at that hour "
            f"{thresholds[-1]:.3f}; {flag_text})."
            + (f" Hour {last} is this stay's last observation; the window runs to hour {window}: no later hour is "
               "shown." if last < window else "")
            + ("" if same else " Each hour has its own threshold, read so that the same share of patients is "
                                "flagged at every hour: an early risk is judged against early risks.")
            + (" A flag stays on once raised (shaded): the line is each hour's threshold moved up by the run's "
               "margin, read from a DP release, aiming at a set share of patients flagged at some hour of the window."
               + (f" {readings}" if readings else "") if latched else "")
            + (f" `fedgru predict` decides on the risk at hour {window} alone, at {float(decision):.3f}: this "
               f"stay is {'flagged' if whole[-1] >= float(decision) else 'not flagged'} there"
               + (" (it reads the stay as finished at its last observation)." if last < window else ".")
               if latched and decision is not None else ""),
            Table(["hour", "risk", "what moved it (observed that hour; change of its contribution to the log-odds)"], rows,
                  empty=f"The risk did not change by {MIN_JUMP} or more in any hour."),
        ]))
        predicted = (f"; plain predict: {'flagged' if whole[-1] >= float(decision) else 'not flagged'} at "
                     f"{float(decision):.3f}" if latched and decision is not None else "")
        lines.append(f"stay {stay_id}: risk {risks[0]:.3f} at hour 1 -> {risks[-1]:.3f} at hour {len(risks)}"
                     + (" (its last observation)" if last < window else "") + f", {flag_text}{predicted}")
        lines += [f"  hour {j.hour}: {j.before:.3f} -> {j.after:.3f}: "
                  + (", ".join(f"{n} {signed(d)}" for n, _, d in j.movers) or NO_MOVER) for j in found]
    # what the risk reads, on the page a clinician keeps open (it went to the console only: a lactate the
    # model does not read plays no part in any risk shown here)
    read = variables_read(ds, bundle)
    sections.append(Section("What these risks read", [read[0].upper() + read[1:] + "."]))
    try:
        with patient_output(out) as handle:  # patients' risks: 0600, whole or not at all
            handle.write(to_html("fedgru monitor", sections))
    finally:
        plots.cleanup()
    return "\n".join(lines)


def explanation_text(e: Explanation, top: int) -> str:
    lines = [f"stay {e.stay_id}: risk {e.risk:.3f} (log-odds {signed(e.logit, 3)}); contributions to the log-odds "
             f"({e.method}):"]
    shown = e.top(top)
    lines += [f"  {describe(c)}" for c in shown]
    rest = e.contributions[len(shown):]
    lines.append((f"  the other {len(rest)}: {signed(sum(c.contribution for c in rest))}; " if rest else "  ")
                 + f"bias {signed(e.bias)}")
    return "\n".join(lines)

