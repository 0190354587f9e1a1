"""Run reports: ``report.md`` with PNG plots, written from a run folder's JSON files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402

METRIC_COLUMNS = [
    ("auroc", "AUROC"), ("auprc", "AUPRC"), ("accuracy", "accuracy"), ("sensitivity", "sensitivity"),
    ("specificity", "specificity"), ("f1", "F1"), ("brier", "Brier"), ("event1_score", "event-1"), ("n", "n"),
]

PHYSIONET_CITATION = (
    "Data: PhysioNet/Computing in Cardiology Challenge 2012 (Open Data Commons Attribution 1.0). "
    "Silva I, Moody G, Scott DJ, Celi LA, Mark RG. Predicting In-Hospital Mortality of ICU Patients: "
    "The PhysioNet/Computing in Cardiology Challenge 2012. Comput Cardiol 2012;39:245-248."
)


def _load(run_dir: Path, name: str):
    path = run_dir / name
    return json.loads(path.read_text()) if path.is_file() else None


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return "n/a" if not math.isfinite(value) else f"{value:.{digits}f}"
    return str(value)


def _table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def _finish(fig, ax, path: Path, ylabel: str, title: str) -> None:
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_auroc(metrics: dict, path: Path) -> bool:
    rounds = metrics.get("rounds", [])
    if not rounds:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [r["round"] for r in rounds]
    ax.plot(xs, [r["pooled_val"].get("auroc") or float("nan") for r in rounds], "k-o", lw=2, label="pooled")
    names = sorted({n for r in rounds for n in r["hospitals"]})
    for name in names:
        ys = [((r["hospitals"].get(name) or {}).get("val") or {}).get("auroc") or float("nan") for r in rounds]
        ax.plot(xs, ys, "--", alpha=0.7, label=name)
    _finish(fig, ax, path, "validation AUROC", "Validation AUROC per round")
    return True


def plot_epsilon(metrics: dict, privacy: dict, path: Path) -> bool:
    rounds = metrics.get("rounds", [])
    if not rounds or not privacy or not privacy.get("dp_enabled"):
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [r["round"] for r in rounds]
    for name in sorted(privacy["hospitals"]):
        ys = [(r["hospitals"].get(name) or {}).get("epsilon") or float("nan") for r in rounds]
        ax.plot(xs, ys, "-o", ms=3, label=name)
    delta = next(iter(privacy["hospitals"].values()), {}).get("delta")
    title = f"Privacy spent per hospital (delta = {delta:g})" if delta else "Privacy spent per hospital"
    _finish(fig, ax, path, "cumulative epsilon", title)
    return True


def write_report(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    metrics = _load(run_dir, "metrics.json") or {}
    privacy = _load(run_dir, "privacy.json") or {}
    partition = _load(run_dir, "partition.json")
    cfg_path = run_dir / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text()) if cfg_path.is_file() else {}
    lines = [f"# fedgru run report: {cfg.get('run', {}).get('name', '')}", ""]
    lines.append(f"Run `{metrics.get('run_id', '?')}`, folder `{run_dir}`.")
    if "wall_seconds" in metrics:
        lines.append(f"Wall time: {metrics['wall_seconds']:.1f} s for {len(metrics.get('rounds', []))} rounds.")
    lines.append("")
    if cfg:
        task, tr, pr, st = cfg["task"], cfg["training"], cfg["privacy"], cfg["strategy"]
        lines += [
            "## Settings",
            f"- Task: `{task['label_column']}` with classes {', '.join(task['classes'])}",
            f"- Data: `{cfg['data']['path']}` ({cfg['data']['format']}); partition `{cfg['partition']['scheme']}`",
            f"- Model: GRU layers {cfg['model']['gru_hidden']}, head {cfg['model']['head_hidden']}, "
            f"dropout {cfg['model']['dropout']} ({cfg['model']['gru_impl']} GRU)",
            f"- Local training: {tr['local_epochs']} epoch(s)/round, expected batch {tr['batch_size']}, "
            f"{tr['optimizer']} lr {tr['lr']}",
            f"- Aggregation: {st['name']}",
            "- DP-SGD: " + (
                f"on; clipping norm {pr['max_grad_norm']}, "
                + (f"noise multiplier {pr['noise_multiplier']}" if pr["noise_multiplier"] > 0 else f"target epsilon {pr['target_epsilon']} for the whole run")
                + f", delta {pr['delta']:g}, {pr['accountant'].upper()} accountant"
                if pr["enabled"] else "off"
            ),
            "",
        ]
    if partition:
        rows = partition["hospitals"]
        if rows:
            keys = list(rows[0].keys())
            lines += ["## Hospitals", _table(keys, [[r[k] for k in keys] for r in rows]), ""]
    test = metrics.get("test")
    if test:
        lines += ["## Test results (final model)", ""]
        header = ["hospital"] + [label for _, label in METRIC_COLUMNS]
        rows = [["**pooled**"] + [test["pooled"].get(k) for k, _ in METRIC_COLUMNS]]
        for name in sorted(test["hospitals"]):
            rows.append([name] + [test["hospitals"][name].get(k) for k, _ in METRIC_COLUMNS])
        lines += [_table(header, rows), ""]
        lines.append(
            "Pooled metrics are computed from the score summaries all hospitals released "
            "(AUROC/AUPRC from score histograms; differences from exact values come only from pairs in the same bin)."
        )
        lines.append("")
    if plot_auroc(metrics, run_dir / "auroc.png"):
        lines += ["## Validation AUROC per round", "", "![AUROC per round](auroc.png)", ""]
    if privacy:
        lines += ["## Privacy", "", f"Guarantee: {privacy.get('guarantee', '')}.", ""]
        if privacy.get("dp_enabled"):
            header = ["hospital", "epsilon", "delta", "accountant", "rounds", "steps", "noise multiplier", "clipping norm", "sample rate"]
            rows = []
            for name, h in sorted(privacy["hospitals"].items()):
                hist = h["history"]
                rows.append([
                    name, h["epsilon"], f"{h['delta']:g}", h["accountant"], h["rounds_trained"],
                    sum(e["steps"] for e in hist), h["noise_multiplier"], h["max_grad_norm"],
                    hist[-1]["sample_rate"] if hist else None,
                ])
            lines += [_table(header, rows), ""]
            if plot_epsilon(metrics, privacy, run_dir / "epsilon.png"):
                lines += ["![epsilon per round](epsilon.png)", ""]
        lines += ["### Releases not covered by DP", ""]
        for r in privacy.get("non_dp_releases", []):
            lines.append(f"- **{r['field']}** ({r['when']}): {r['reveals']}")
        lines.append("")
    if partition and partition.get("data_summary"):
        s = partition["data_summary"]
        lines += [
            "## Data summary",
            f"- Stays read: {s['stays_read']}, used: {s['stays_used']}, without outcome: {s['stays_without_outcome']}, "
            f"with a missing label: {s['stays_with_missing_label']}",
            f"- Class counts: {s['class_counts']}",
            f"- Stays with no observation in the window: {s['read']['stays_without_observations']}",
            f"- Values set to missing (outside plausibility range): {s['preprocess']['out_of_range']}",
            f"- Observations after the window: {s['preprocess']['after_window']}",
            f"- Unknown descriptors: {s['preprocess']['static_unknown']}",
            "",
        ]
    if cfg and cfg.get("data", {}).get("format") == "physionet2012":
        lines += ["---", PHYSIONET_CITATION, ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
