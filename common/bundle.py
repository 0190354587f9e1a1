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
    return float(margin) if _finite(margin) else None


def _finite(value) -> bool:
    """A number a bundle may say: not a bool, finite, within a float's range (a pickled
    whole number of 400 digits is not one, and must not crash a page)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


MAX_HOUR_DIGITS = 4  # a bundle's hour keys: whole hours, far past any window


def _hour(key) -> int | None:
    """A bundle's hour key ("6") as a whole number; None for anything else (markup, escapes,
    a number too long to convert)."""
    ok = isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= MAX_HOUR_DIGITS
    return int(key) if ok else None


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
        if _hour(hour) is None or not _finite(risk):
            continue
        bounds = _interval(intervals.get(hour))
        words.append(f"after hour {_hour(hour)} {risk:.3f}" + (f" ({bounds[0]:.3f}-{bounds[1]:.3f})" if bounds else ""))
    return ", ".join(words)


def monitor_readings(info: dict, levels: np.ndarray | None = None) -> str:
    """What a bundle's run read from DP releases for its monitor, with the intervals it
    printed (a bundle of a run before them: the readings alone); "" where it read none.
    The flag levels a user sees are these moved by the margin: numbers with noise in them,
    not settings to copy. ``levels``: the flag level at each hour that the caller flags
    at (:func:`monitor_levels`), said with the bundle's intervals for them; None: not said."""
    from .intervals import INTERVAL_LEVEL, THRESHOLD_COVERAGE_SHORT

    checkpoints = checkpoint_words(info.get("checkpoint_thresholds"), info.get("checkpoint_intervals"))
    margin, interval = onset_margin(info), _interval(info.get("onset_margin_interval"))
    if not checkpoints and margin is None:
        return ""
    parts = [f"each hour's threshold {checkpoints}"] if checkpoints else []
    if margin is not None:
        parts.append(f"the margin {margin:.2f}" + (f" ({interval[0]:.2f} to {interval[1]:.2f})" if interval else "")
                     + " in log-odds")
        flag_levels = _flag_levels(info, levels) if levels is not None else ""
        if flag_levels:
            parts.append(f"so the flag levels (each hour's threshold moved up by the margin) {flag_levels}")
    text = f"The run read its monitor from DP releases: {'; '.join(parts)}"
    if "(" not in text:  # no interval printed: nothing to explain
        return text + "."
    level = info.get("interval_level")
    level = float(level) if _finite(level) and 0 < level < 1 else INTERVAL_LEVEL
    return (f"{text} (in brackets, nominal {level:.0%} intervals for the releases' noise and their reading, not "
            f"ranges of patients' risks; {THRESHOLD_COVERAGE_SHORT}, and the run's report says whether its settings "
            "were those).")


def _flag_levels(info: dict, levels: np.ndarray) -> str:
    """The flag levels the caller flags at (``levels``, one per hour), at the hours whose
    intervals the bundle holds, with them ("after hour 1 0.546 (0.410-0.680), ..."); "" for a
    bundle of a run before them. An hour whose level its interval does not hold is left out:
    the bundle's intervals are not about the levels flagged at (another window, a hostile
    or damaged bundle)."""
    intervals = info.get("flag_level_intervals")
    if not isinstance(intervals, dict):
        return ""
    at = {}
    for key, value in intervals.items():
        hour, bounds = _hour(key), _interval(value)
        if hour is None or bounds is None or not 1 <= hour <= len(levels):
            continue
        level = float(levels[hour - 1])
        if bounds[0] - 5e-4 <= level <= bounds[1] + 5e-4:  # as printed, to 3 digits
            at[key] = level
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
    if isinstance(per_hour, list) and per_hour and len(per_hour) == hours:
        if not all(_finite(t) and 0 <= t <= 1 for t in per_hour):
            raise DataError("model bundle", FORGED_THRESHOLDS)
        return np.asarray(per_hour, dtype=np.float64)
    return np.full(hours, bundle_threshold(info))


FORGED_THRESHOLDS = ("its thresholds are not risks between 0 and 1: the bundle is damaged or was not written by a "
                     "fedgru run; ask the coordinator for the run's model.pt")


def bundle_threshold(info: dict) -> float:
    """The decision threshold the run saved in its bundle (0.5 where it saved none, as a
    multi-class run); a value that is not a risk is refused (a damaged or forged bundle),
    not flagged at."""
    threshold = info.get("threshold")
    if threshold is None:
        return 0.5
    if not (_finite(threshold) and 0 <= threshold <= 1):
        raise DataError("model bundle", FORGED_THRESHOLDS)
    return float(threshold)
