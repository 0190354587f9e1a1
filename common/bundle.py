"""Model bundles: one ``model.pt`` that scores new patients without the training config.

A bundle holds the weights, the network shape and the whole experiment config (whose
``features``/``task``/``data`` sections are the preprocessing spec: variables,
normalisation constants, window, bins, descriptors and label set).
"""

from __future__ import annotations

import hashlib
import io
import math
import time
from pathlib import Path

import numpy as np
import torch

from .config import ExperimentConfig
from .data.dataset import Dataset, load_dataset
from .data.records import DataError
from .files import atomic_torch_save
from .model import GRUClassifier, ModelSpec
from .onset import raising_levels
from .training import predict_proba

BUNDLE_FORMAT = "fedgru-model/1"


def save_bundle(path: Path, state_dict: dict, spec: ModelSpec, cfg: ExperimentConfig, info: dict | None = None) -> None:
    bundle = {
        "format": BUNDLE_FORMAT,
        "weights": {k: torch.as_tensor(np.asarray(v)).clone() for k, v in state_dict.items()},
        "model_spec": spec.to_dict(),
        "config": cfg.to_dict(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "info": info or {},
    }
    atomic_torch_save(bundle, path)


class Bundle:
    def __init__(self, path: str | Path):
        path = Path(path)
        if path.is_dir():
            hint = f": its model is {path / 'model.pt'}" if (path / "model.pt").is_file() else ""
            raise DataError(str(path), f"is a folder, not a model bundle{hint}")
        if not path.is_file():
            raise DataError(str(path), "model bundle not found")
        content = path.read_bytes()  # read once: the hash is of the bytes whose weights are loaded
        self.sha256 = hashlib.sha256(content).hexdigest()
        try:
            raw = torch.load(io.BytesIO(content), map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - any unpickling failure means "not a bundle"
            raise DataError(str(path), "is not a fedgru model bundle (not a file torch can read: a run's model.pt "
                                       "is one)") from None
        if not isinstance(raw, dict) or raw.get("format") != BUNDLE_FORMAT:
            raise DataError(str(path), f"is not a fedgru model bundle (expected format {BUNDLE_FORMAT})")
        self.path = path
        self.config = ExperimentConfig.from_dict(raw["config"], origin=str(path), fill_defaults=True)
        self.config.data.max_stays = 0  # a training-time subset never limits scoring
        self.spec = ModelSpec(**raw["model_spec"])
        self.info = raw.get("info", {})
        self.model = GRUClassifier(self.spec, gru_impl="torch")  # scoring needs no per-example grads
        self.model.load_state_dict(raw["weights"], strict=True)
        self.model.eval()

    def load(self, data: str | Path, outcomes: str | Path | None, data_format: str | None = None) -> Dataset:
        fmt = data_format or guess_format(Path(data))
        cfg = self.config
        if outcomes is None:
            return load_dataset(cfg, data_path=data, outcomes_path=None, data_format=fmt, require_labels=False)
        id_column = cfg.data.id_column
        if fmt == "long_csv" and cfg.data.format != "long_csv":
            id_column = "stay_id"
        return load_dataset(cfg, data_path=data, outcomes_path=outcomes, data_format=fmt, id_column=id_column)

    def predict(self, ds: Dataset) -> np.ndarray:
        return predict_proba(self.model, ds.X, ds.S)


def guess_format(path: Path) -> str:
    if path.is_dir() or path.name.endswith((".tar.gz", ".tgz", ".tar")):
        return "physionet2012"
    if path.suffix.lower() == ".csv":
        return "long_csv"
    if not path.exists():
        raise DataError(str(path), "no such file or folder")
    raise DataError(
        str(path),
        "unknown format: give a PhysioNet folder or .tar.gz, or a long-format .csv "
        "(stay_id,time_hours,variable,value), or pass --format",
    )


def onset_margin(info: dict) -> float | None:
    """The run's monitor margin (``common.onset``; log-odds), or None (each hour flags alone)."""
    margin = info.get("onset_margin")
    return float(margin) if isinstance(margin, (int, float)) and math.isfinite(margin) else None


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _interval(value) -> list[float] | None:
    """A [low, high] pair of finite numbers, or None (anything else a bundle may hold)."""
    ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(_finite(v) for v in value)
    return [float(v) for v in value] if ok else None


def checkpoint_words(thresholds: dict, intervals: dict | None = None) -> str:
    """Each checkpoint hour's threshold, with its interval where it has one: "after hour 1
    0.332 (0.242-0.438), after hour 6 ..." (the run's summary, its report and the monitor
    say them alike). Keys: hours as text, as metrics.json and a bundle hold them; a key
    that is not a whole number, or a value that is not a finite number, is left out (a
    bundle's text reaches a hospital's page and terminal: nothing but hours and numbers)."""
    intervals = intervals if isinstance(intervals, dict) else {}
    words = []
    for hour, risk in (thresholds.items() if isinstance(thresholds, dict) else []):
        if not (isinstance(hour, str) and hour.isdigit() and hour.isascii() and _finite(risk)):
            continue
        bounds = _interval(intervals.get(hour))
        words.append(f"after hour {int(hour)} {risk:.3f}" + (f" ({bounds[0]:.3f}-{bounds[1]:.3f})" if bounds else ""))
    return ", ".join(words)


def monitor_readings(info: dict) -> str:
    """What a bundle's run read from DP releases for its monitor, with the intervals it
    printed (a bundle of a run before them: the readings alone); "" where it read none.
    The flag levels a user sees are these moved by the margin: numbers with noise in them,
    not settings to copy."""
    from .intervals import INTERVAL_LEVEL, THRESHOLD_COVERAGE_SHORT

    checkpoints = checkpoint_words(info.get("checkpoint_thresholds"), info.get("checkpoint_intervals"))
    margin, interval = onset_margin(info), _interval(info.get("onset_margin_interval"))
    if not checkpoints and margin is None:
        return ""
    parts = [f"each hour's threshold {checkpoints}"] if checkpoints else []
    if margin is not None:
        parts.append(f"the margin {margin:.2f}" + (f" ({interval[0]:.2f} to {interval[1]:.2f})" if interval else "")
                     + " in log-odds")
        levels = _flag_levels(info, margin)
        if levels:
            parts.append(f"so the flag levels (each hour's threshold moved up by the margin) {levels}")
    text = f"The run read its monitor from DP releases: {'; '.join(parts)}"
    if "(" not in text:  # no interval printed: nothing to explain
        return text + "."
    level = info.get("interval_level")
    level = float(level) if _finite(level) and 0 < level < 1 else INTERVAL_LEVEL
    return (f"{text} (in brackets, nominal {level:.0%} intervals for the releases' noise and their reading, not "
            f"ranges of patients' risks; {THRESHOLD_COVERAGE_SHORT}, and the run's report says whether its settings "
            "were those).")


def _flag_levels(info: dict, margin: float) -> str:
    """The flag levels at the hours whose intervals the bundle holds, with them ("after hour
    1 0.546 (0.410-0.680), ..."); "" for a bundle of a run before them (or none it can say)."""
    intervals = info.get("flag_level_intervals")
    per_hour = info.get("hour_thresholds")
    if not isinstance(intervals, dict) or not isinstance(per_hour, list) or not all(_finite(t) for t in per_hour):
        return ""
    levels = raising_levels(np.asarray(per_hour, dtype=np.float64), margin)
    at = {h: float(levels[int(h) - 1]) for h in intervals
          if isinstance(h, str) and h.isdigit() and h.isascii() and 1 <= int(h) <= len(levels)
          and _interval(intervals[h]) is not None}
    return checkpoint_words(at, intervals)


def monitor_levels(info: dict, thresholds: np.ndarray, own: bool = True) -> tuple[np.ndarray, bool]:
    """The risk after each hour at which the monitor raises a flag, and whether the flag
    then stays on: with the run's margin, each hour's threshold moved up by it, and on
    (``common.onset``); without one (an older bundle, or ``own`` False: thresholds the
    user set), each hour's threshold, on and off."""
    margin = onset_margin(info) if own else None
    return (thresholds, False) if margin is None else (raising_levels(thresholds, margin), True)


def hour_thresholds(info: dict, hours: int) -> np.ndarray:
    """The decision threshold after each hour (a risk per hour: (hours,)): the run's
    per-hour thresholds when it chose them (``info["hour_thresholds"]``, one per hour of
    the window), else its one threshold (``info["threshold"]``, 0.5 if none) at every hour."""
    per_hour = info.get("hour_thresholds")
    if per_hour and len(per_hour) == hours:
        return np.asarray(per_hour, dtype=np.float64)
    return np.full(hours, float(info.get("threshold") or 0.5))
