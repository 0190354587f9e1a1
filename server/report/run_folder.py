"""A run folder, read as records (``server.records``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from common.config import ConfigError, ExperimentConfig

from ..records import AuditResult, BaselineResult, Partition, RunMetrics, RunPrivacy, load_record, load_records


@dataclass
class RunFolder:
    """Everything a run folder holds, as records (None where the run did not write it)."""

    path: Path
    config: ExperimentConfig | None
    metrics: RunMetrics
    privacy: RunPrivacy | None
    partition: Partition | None
    baselines: dict[str, BaselineResult] | None
    audit: AuditResult | None

    @classmethod
    def load(cls, run_dir: Path) -> RunFolder:
        return cls(
            path=run_dir,
            config=_load_config(run_dir / "config.yaml"),
            metrics=load_record(run_dir / "metrics.json", RunMetrics) or RunMetrics(run_id="?"),
            privacy=load_record(run_dir / "privacy.json", RunPrivacy),
            partition=load_record(run_dir / "partition.json", Partition),
            baselines=load_records(run_dir / "baselines.json", BaselineResult),
            audit=load_record(run_dir / "audit.json", AuditResult),
        )


def _load_config(path: Path) -> ExperimentConfig | None:
    if not path.is_file():
        return None
    try:
        return ExperimentConfig.from_dict(yaml.safe_load(path.read_text()), origin=str(path), fill_defaults=True)
    except ConfigError:
        return None  # a config of another version: the report goes on without the settings
