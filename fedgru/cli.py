"""The ``fedgru`` command: one entry point, each subcommand in the folder of its role.

    fedgru simulate  --config FILE [--out DIR] [--rounds N] [--set key=value ...]
    fedgru evaluate  --model RUN/model.pt --data PATH --outcomes FILE [--json]
    fedgru predict   --model RUN/model.pt --data PATH --out risks.csv
    fedgru baseline  --config FILE --kind central|central-dp|local [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common.config import ConfigError, load_config
from common.data.records import DataError
from common.paths import project_root


def _config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML experiment config (default: configs/default.yaml)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, e.g. --set training.lr=0.01 (repeatable)",
    )


def _load(args) -> object:
    path = Path(args.config) if args.config else project_root() / "configs" / "default.yaml"
    overrides = list(args.overrides)
    if getattr(args, "rounds", None):
        overrides.append(f"run.rounds={args.rounds}")
    return load_config(path, overrides)


def cmd_simulate(args) -> int:
    from simulations.simulate import default_run_dir, simulate

    cfg = _load(args)
    run_dir = Path(args.out).resolve() if args.out else default_run_dir(cfg)
    faults = {}
    for item in args.fault:
        hospital, _, kind = item.partition("=")
        if not kind:
            raise ConfigError(f"--fault {item!r} must look like HOSPITAL=KIND")
        faults[hospital] = kind
    simulate(cfg, run_dir, cpus_per_hospital=args.cpus_per_hospital, faults=faults)
    _print_summary(run_dir)
    return 0


def _print_summary(run_dir: Path) -> None:
    from common.metrics import format_metrics

    metrics = json.loads((run_dir / "metrics.json").read_text())
    privacy = json.loads((run_dir / "privacy.json").read_text())
    print(f"\nRun folder: {run_dir}")
    if "test" in metrics:
        print(f"Pooled test: {format_metrics(metrics['test']['pooled'])}")
    if privacy.get("dp_enabled"):
        print("Privacy spent (whole run, example-level DP):")
        for name, h in sorted(privacy["hospitals"].items()):
            eps = h["epsilon"]
            print(f"  {name:20s} epsilon {eps:.3f} at delta {h['delta']:g} ({h['accountant']}, {h['rounds_trained']} rounds)")
    else:
        print("Privacy: DP was off for this run; no epsilon applies.")
    print(f"Report: {run_dir / 'report.md'}")


def cmd_evaluate(args) -> int:
    from common.bundle import Bundle
    from common.metrics import exact_metrics, format_metrics

    bundle = Bundle(args.model)
    ds = bundle.load(args.data, args.outcomes, args.format)
    probs = bundle.predict(ds)
    m = exact_metrics(ds.y, probs)
    if args.json:
        print(json.dumps({k: (None if isinstance(v, float) and v != v else v) for k, v in m.items()}))
    else:
        print(f"{args.data}: {format_metrics(m)}")
    return 0


def cmd_predict(args) -> int:
    import csv

    from common.bundle import Bundle

    bundle = Bundle(args.model)
    ds = bundle.load(args.data, None, args.format)
    probs = bundle.predict(ds)
    classes = bundle.config.task.classes
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as handle:
        writer = csv.writer(handle)
        if len(classes) == 2:
            writer.writerow(["stay_id", f"risk_{classes[1]}"])
            for sid, p in zip(ds.stay_ids, probs[:, 1]):
                writer.writerow([sid, f"{p:.6f}"])
        else:
            writer.writerow(["stay_id", *(f"p_{c}" for c in classes), "predicted"])
            for sid, row in zip(ds.stay_ids, probs):
                writer.writerow([sid, *(f"{p:.6f}" for p in row), classes[int(row.argmax())]])
    print(f"wrote {len(ds.stay_ids)} risk scores to {out}")
    return 0


def cmd_baseline(args) -> int:
    from simulations.baselines import run_baseline

    cfg = _load(args)
    result = run_baseline(cfg, args.kind, Path(args.out) if args.out else None, target_epsilon=args.epsilon)
    print(json.dumps(result, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedgru", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("simulate", help="run a federated simulation (Flower simulation runtime)")
    _config_arg(p)
    p.add_argument("--out", help="run folder (default: <run.out_dir>/<timestamp>)")
    p.add_argument("--rounds", type=int, help="override run.rounds")
    p.add_argument("--cpus-per-hospital", type=int, default=1, help="CPU cores per simulated hospital (default 1)")
    p.add_argument(
        "--fault", action="append", default=[], metavar="HOSPITAL=KIND",
        help="fault drill: make a hospital misbehave (nan, inf, huge_count, crash); repeatable",
    )
    p.set_defaults(fn=cmd_simulate)

    p = sub.add_parser("evaluate", help="score labelled stays with a saved model and print metrics")
    p.add_argument("--model", required=True, help="model bundle (runs/<run>/model.pt)")
    p.add_argument("--data", required=True, help="PhysioNet folder or .tar.gz, or long-format CSV")
    p.add_argument("--outcomes", required=True, help="outcomes file (PhysioNet Outcomes-*.txt or stay_id,label CSV)")
    p.add_argument("--format", choices=["physionet2012", "long_csv"], help="data format (default: from the path)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(fn=cmd_evaluate)

    p = sub.add_parser("predict", help="write per-stay risk scores to a CSV")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--format", choices=["physionet2012", "long_csv"])
    p.add_argument("--out", required=True, help="CSV to write")
    p.set_defaults(fn=cmd_predict)

    p = sub.add_parser("baseline", help="centralized or local-only training for comparison")
    _config_arg(p)
    p.add_argument("--kind", required=True, choices=["central", "central-dp", "local"])
    p.add_argument("--epsilon", type=float, default=None, help="DP target epsilon (default: privacy.target_epsilon)")
    p.add_argument("--out", help="write the result JSON here")
    p.set_defaults(fn=cmd_baseline)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except (ConfigError, DataError) as exc:
        print(f"fedgru {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
