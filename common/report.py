"""Run reports a clinical researcher and a privacy officer can read.

``write_report(run_dir)`` reads a run folder's JSON files and writes ``report.md``
(with PNG plots beside it) and ``report.html`` (one self-contained file, plots
embedded), and returns a short text summary. The privacy part states, per hospital:
epsilon under both RDP and PRV accounting at the hospital's delta, budget and what
remains, rounds, steps, noise multiplier, clipping norm and sample rate; which
releases are not covered by DP; the data fingerprint; and a plain-language statement
that the hospital's privacy officer can sign.
"""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass, field
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

RNG_NOTE = (
    "DP noise and Poisson sampling use torch's generator seeded from the operating system's entropy at "
    "each hospital. It is not a cryptographically secure generator: Opacus's secure mode needs torchcsprng, "
    "which does not install with current torch. Floating-point Gaussian sampling is also known to leak "
    "slightly more than the idealised mechanism; the epsilons above are those of the idealised mechanism."
)


# ----------------------------------------------------------------------------------
# A small document model rendered to Markdown and HTML
# ----------------------------------------------------------------------------------


@dataclass
class Table:
    header: list[str]
    rows: list[list]


@dataclass
class Image:
    path: Path
    caption: str


@dataclass
class Section:
    title: str
    blocks: list = field(default_factory=list)  # str (paragraph), list[str] (bullets), Table, Image


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "n/a"
        return f"{value:.{digits}g}" if abs(value) < 1e-3 and value != 0 else f"{value:.{digits}f}"
    return str(value)


def _markdown(title: str, sections: list[Section]) -> str:
    out = [f"# {title}", ""]
    for sec in sections:
        out += [f"## {sec.title}", ""]
        for block in sec.blocks:
            if isinstance(block, Table):
                out.append("| " + " | ".join(block.header) + " |")
                out.append("|" + "|".join("---" for _ in block.header) + "|")
                out += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in block.rows]
            elif isinstance(block, Image):
                out.append(f"![{block.caption}]({block.path.name})")
            elif isinstance(block, list):
                out += [f"- {item}" for item in block]
            else:
                out.append(str(block))
            out.append("")
    return "\n".join(out)


def _html(title: str, sections: list[Section]) -> str:
    esc = html.escape
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{esc(title)}</title><style>",
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}",
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}",
        "td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}img{max-width:100%}",
        ".statement{background:#f7f9fc;border-left:4px solid #3465a4;padding:0.6em 1em}",
        "</style></head><body>",
        f"<h1>{esc(title)}</h1>",
    ]
    for sec in sections:
        parts.append(f"<h2>{esc(sec.title)}</h2>")
        for block in sec.blocks:
            if isinstance(block, Table):
                parts.append("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in block.header) + "</tr>")
                for row in block.rows:
                    parts.append("<tr>" + "".join(f"<td>{esc(_fmt(c))}</td>" for c in row) + "</tr>")
                parts.append("</table>")
            elif isinstance(block, Image):
                data = base64.b64encode(block.path.read_bytes()).decode()
                parts.append(f"<figure><img alt='{esc(block.caption)}' src='data:image/png;base64,{data}'>"
                             f"<figcaption>{esc(block.caption)}</figcaption></figure>")
            elif isinstance(block, list):
                parts.append("<ul>" + "".join(f"<li>{esc(str(i))}</li>" for i in block) + "</ul>")
            else:
                text = str(block)
                cls = " class='statement'" if text.startswith("For each patient") else ""
                parts.append(f"<p{cls}>{esc(text)}</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


# ----------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------


def _finish(fig, ax, path: Path, ylabel: str, title: str) -> None:
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _val(value) -> float:
    return float("nan") if value is None else float(value)


def plot_auroc(metrics: dict, path: Path) -> bool:
    rounds = metrics.get("rounds", [])
    if not rounds:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [r["round"] for r in rounds]
    ax.plot(xs, [_val(r["pooled_val"].get("auroc")) for r in rounds], "k-o", lw=2, label="pooled")
    for name in sorted({n for r in rounds for n in r["hospitals"]}):
        ys = [_val(((r["hospitals"].get(name) or {}).get("val") or {}).get("auroc")) for r in rounds]
        ax.plot(xs, ys, "--", alpha=0.7, label=name)
    _finish(fig, ax, path, "validation AUROC", "Utility: validation AUROC per round")
    return True


def plot_epsilon(metrics: dict, privacy: dict, path: Path) -> bool:
    rounds = metrics.get("rounds", [])
    if not rounds or not privacy.get("dp_enabled"):
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [r["round"] for r in rounds]
    for name in sorted(privacy["hospitals"]):
        ys = [_val((r["hospitals"].get(name) or {}).get("epsilon")) for r in rounds]
        line = ax.plot(xs, ys, "-o", ms=3, label=name)[0]
        budget = privacy["hospitals"][name].get("budget")
        if budget:
            ax.axhline(budget, color=line.get_color(), ls=":", lw=1)
    _finish(fig, ax, path, "cumulative epsilon (dotted: budget)", "Privacy spent per hospital")
    return True


# ----------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------


def _load(run_dir: Path, name: str):
    path = run_dir / name
    return json.loads(path.read_text()) if path.is_file() else None


def officer_statement(name: str, h: dict, privacy: dict) -> str:
    """The plain-language paragraph a hospital's privacy officer can sign."""
    if not privacy.get("dp_enabled") or h.get("epsilon") is None:
        return (
            f"For each patient at hospital {name}: this run trained without differential privacy, so the "
            "model weights it released carry no formal privacy guarantee."
        )
    eps, delta = h["epsilon"], h["delta"]
    earlier = h.get("earlier_runs") or []
    scope = "during this run" + (f" and the {len(earlier)} earlier run(s) recorded in its ledger" if earlier else "")
    other = "PRV" if h["accountant"] == "rdp" else "RDP"
    other_eps = h.get("epsilon_prv") if other == "PRV" else h.get("epsilon_rdp")
    budget = h.get("budget")
    budget_text = f" The hospital's budget is epsilon = {_fmt(budget)}; {_fmt(h.get('remaining'))} remains." if budget else ""
    return (
        f"For each patient in the training data of hospital {name}, everything derived from that data that "
        f"{name} released {scope} (the model weights of every round) satisfies ({_fmt(eps)}, {delta:.0e})-"
        f"differential privacy ({h['accountant'].upper()} accounting; {other} accounting gives epsilon = "
        f"{_fmt(other_eps)}). In plain words: whether or not any one patient's record was used, the probability "
        f"of anything an outsider can observe changes by at most a factor of {math.exp(eps):.2f} (e to the power "
        f"epsilon), except with probability {delta:.0e}. The guarantee covers the patients of the training split only. "
        f"It does not cover the releases listed under 'Releases not covered by DP' (example counts, training loss, "
        f"and score summaries of the validation and test patients).{budget_text}"
    )


def build(run_dir: Path) -> tuple[str, list[Section], dict]:
    metrics = _load(run_dir, "metrics.json") or {}
    privacy = _load(run_dir, "privacy.json") or {}
    partition = _load(run_dir, "partition.json")
    baselines = _load(run_dir, "baselines.json")
    cfg_path = run_dir / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text()) if cfg_path.is_file() else {}
    title = f"fedgru run report: {cfg.get('run', {}).get('name', run_dir.name)}"
    sections: list[Section] = []

    intro = Section("Run", [f"Run `{metrics.get('run_id', '?')}`, folder `{run_dir}`."])
    if "wall_seconds" in metrics:
        intro.blocks.append(f"Wall time: {metrics['wall_seconds']:.1f} s for {len(metrics.get('rounds', []))} rounds.")
    sections.append(intro)

    if cfg:
        task, tr, pr, st, md = cfg["task"], cfg["training"], cfg["privacy"], cfg["strategy"], cfg["model"]
        dp = (
            f"on; clipping norm {pr['max_grad_norm']}, "
            + (f"noise multiplier {pr['noise_multiplier']}" if pr["noise_multiplier"] > 0 else f"target epsilon {pr['target_epsilon']} for the planned run (sigma calibrated once)")
            + f", delta {pr['delta']}, budget {pr['max_epsilon']} per hospital, {pr['accountant'].upper()} accountant drives decisions"
            if pr["enabled"] else "off"
        )
        fingerprints = sorted({h.get("data_fingerprint", "") for h in privacy.get("hospitals", {}).values()} - {""})
        sections.append(
            Section("Settings", [[
                f"Task: `{task['label_column']}`, classes {', '.join(task['classes'])}",
                f"Data: `{cfg['data']['path']}` ({cfg['data']['format']}); partition `{cfg['partition']['scheme']}`",
                "Data fingerprint (sha256 of the files): " + (", ".join(f[:16] + "..." for f in fingerprints) or "n/a"),
                f"Model: {md['architecture']} GRU layers {md['gru_hidden']}, head {md['head_hidden']}, dropout {md['dropout']} ({md['gru_impl']} GRU)",
                f"Local training: {tr['local_epochs']} epoch(s) per round, expected batch {tr['batch_size']}, {tr['optimizer']} lr {tr['lr']} ({tr['lr_schedule']})",
                f"Aggregation: {st['name']}; {cfg['run']['rounds']} rounds planned",
                f"DP-SGD: {dp}",
            ]])
        )

    if partition and partition.get("hospitals"):
        rows = partition["hospitals"]
        keys = list(rows[0].keys())
        sections.append(Section("Hospitals", [Table(keys, [[r[k] for k in keys] for r in rows])]))

    test = metrics.get("test")
    if test:
        header = ["hospital"] + [label for _, label in METRIC_COLUMNS]
        rows = [["pooled"] + [test["pooled"].get(k) for k, _ in METRIC_COLUMNS]]
        rows += [[n] + [test["hospitals"][n].get(k) for k, _ in METRIC_COLUMNS] for n in sorted(test["hospitals"])]
        sections.append(
            Section("Test results (final model)", [
                Table(header, rows),
                "Pooled metrics come from the score summaries the hospitals released; AUROC and AUPRC from score "
                "histograms, so they differ from exact values only through patients whose scores share a bin. "
                f"Accuracy, sensitivity, specificity, F1 and event-1 flag a patient at a risk of "
                f"{test.get('threshold', 0.5):.3f} or more (evaluation.threshold; 'auto' picks the best event-1 "
                "score on the pooled validation histograms). "
                + (f"The risks were recalibrated on the pooled validation histograms (Platt scaling: logit -> "
                   f"{test['calibration']['scale']:.3f} x logit {test['calibration']['shift']:+.3f}), which keeps "
                   "every patient's rank." if test.get("calibration") else ""),
            ])
        )
    if baselines:
        header = ["model", "pooled test AUROC", "pooled test AUPRC", "epsilon"]
        rows = []
        if test:
            eps = max((h.get("epsilon") or 0 for h in privacy.get("hospitals", {}).values()), default=None)
            rows.append(["federated (this run)", test["pooled"].get("auroc"), test["pooled"].get("auprc"), eps])
        for kind, b in baselines.items():
            e = b.get("epsilon")
            e = max(e.values()) if isinstance(e, dict) else e
            rows.append([kind, b["test"]["pooled"]["auroc"], b["test"]["pooled"]["auprc"], e])
        sections.append(Section("What federation buys (same splits)", [Table(header, rows)]))

    util = Section("Utility per round")
    if plot_auroc(metrics, run_dir / "auroc.png"):
        util.blocks.append(Image(run_dir / "auroc.png", "Validation AUROC per round"))
        sections.append(util)

    if privacy:
        sec = Section("Privacy", [f"Guarantee: {privacy.get('guarantee', '')}."])
        hospitals = privacy.get("hospitals", {})
        if privacy.get("dp_enabled"):
            header = ["hospital", "epsilon (RDP)", "epsilon (PRV)", "delta", "budget", "remaining", "rounds",
                      "steps", "noise multiplier", "clipping norm", "sample rate", "state"]
            rows = []
            for name, h in sorted(hospitals.items()):
                hist = h.get("history", [])
                rows.append([
                    name, h.get("epsilon_rdp"), h.get("epsilon_prv"), _fmt(h.get("delta")), h.get("budget"),
                    h.get("remaining"), h.get("rounds_trained"), sum(e["steps"] for e in hist),
                    h.get("noise_multiplier"), h.get("max_grad_norm"), hist[-1]["sample_rate"] if hist else None,
                    h.get("state"),
                ])
            sec.blocks.append(Table(header, rows))
            if plot_epsilon(metrics, privacy, run_dir / "epsilon.png"):
                sec.blocks.append(Image(run_dir / "epsilon.png", "Cumulative epsilon per round (dotted: budgets)"))
        sections.append(sec)
        level = privacy.get("hospital_level")
        if level:
            sections.append(Section("Second guarantee: hospital-level DP", [
                f"Each hospital's update was clipped to L2 norm {level['clipping_norm']} and the aggregate noised "
                f"(noise multiplier {level['noise_multiplier']}); over {level.get('releases', 0)} releases this gives "
                f"epsilon = {_fmt(level.get('epsilon'))} at delta = {_fmt(level.get('delta'))} ({level['accountant']}).",
                level["guarantee"],
            ]))
        sections.append(Section("Releases not covered by DP", [
            [f"{r['field']} ({r['when']}): {r['reveals']}" for r in privacy.get("non_dp_releases", [])]
        ]))
        statements = Section("Statements for each hospital's privacy officer")
        for name, h in sorted(hospitals.items()):
            statements.blocks.append(officer_statement(name, h, privacy))
        statements.blocks.append(RNG_NOTE)
        sections.append(statements)

    if partition and partition.get("data_summary"):
        s = partition["data_summary"]
        sections.append(Section("Data summary", [[
            f"Stays read: {s['stays_read']}, used: {s['stays_used']}, without outcome: {s['stays_without_outcome']}, "
            f"with a missing label: {s['stays_with_missing_label']}",
            f"Class counts: {s['class_counts']}",
            f"Stays with no observation in the window: {s['read']['stays_without_observations']}",
            f"Values set to missing (outside plausibility range): {s['preprocess']['out_of_range']}",
            f"Observations after the window: {s['preprocess']['after_window']}",
            f"Unknown descriptors: {s['preprocess']['static_unknown']}",
        ]]))
    if cfg and cfg.get("data", {}).get("format") == "physionet2012":
        sections.append(Section("Data source", [PHYSIONET_CITATION]))
    return title, sections, {"metrics": metrics, "privacy": privacy}


def summary_text(run_dir: Path, data: dict) -> str:
    from .metrics import format_metrics

    lines = [f"Run folder: {run_dir}"]
    test = data["metrics"].get("test")
    if test:
        lines.append(f"Pooled test: {format_metrics(test['pooled'])}  (flagged at risk >= {test.get('threshold', 0.5):.3f})")
    privacy = data["privacy"]
    if privacy.get("dp_enabled"):
        lines.append("Privacy spent (example-level DP, everything in each hospital's ledger):")
        for name, h in sorted(privacy["hospitals"].items()):
            if h.get("epsilon") is None:
                lines.append(f"  {name:20s} {h.get('state')}: {h.get('reason', 'no ledger reported')}")
                continue
            lines.append(
                f"  {name:20s} epsilon {h['epsilon']:.3f} (RDP {h['epsilon_rdp']:.3f}, PRV {h['epsilon_prv']:.3f}) "
                f"at delta {h['delta']:.0e}, budget {_fmt(h.get('budget'))}, {h['rounds_trained']} rounds, {h['state']}"
            )
    elif privacy:
        lines.append("Privacy: DP was off for this run; no epsilon applies.")
    lines.append(f"Report: {run_dir / 'report.md'} and {run_dir / 'report.html'}")
    return "\n".join(lines)


def write_report(run_dir: str | Path) -> str:
    """Write report.md and report.html; return the text summary."""
    run_dir = Path(run_dir)
    title, sections, data = build(run_dir)
    (run_dir / "report.md").write_text(_markdown(title, sections))
    (run_dir / "report.html").write_text(_html(title, sections))
    return summary_text(run_dir, data)
