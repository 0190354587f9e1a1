"""The ``fedgru`` command: one entry point, each subcommand in the folder of its role.

    fedgru simulate  --config FILE [--out DIR] [--rounds N] [--set key=value ...]
    fedgru evaluate  --model RUN/model.pt --data PATH --outcomes FILE [--json]
    fedgru predict   --model RUN/model.pt --data PATH --out risks.csv
    fedgru baseline  --config FILE --kind central|central-dp|local [--out DIR]
    fedgru report    RUN_DIR
    fedgru plan      --epsilon E | --noise-multiplier S  --delta D --rounds R --local-epochs K --batch-size B --examples N
    fedgru ledger    init|show --ledger FILE [--data PATH --outcomes FILE --hospital NAME]
    fedgru deploy    init --out DIR --hospitals a,b,c [--host HOST --port PORT]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common.config import ConfigError, auto_delta, load_config
from common.data.records import DataError
from common.files import to_json
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
    from server.report import write_report

    print()
    print(write_report(run_dir))


def cmd_report(args) -> int:
    from server.report import write_report

    run_dir = Path(args.run_dir)
    if not (run_dir / "metrics.json").is_file():
        raise DataError(str(run_dir), "is not a fedgru run folder (no metrics.json)")
    print(write_report(run_dir))
    return 0


def cmd_evaluate(args) -> int:
    from common.bundle import Bundle
    from common.metrics import exact_metrics, format_metrics

    bundle = Bundle(args.model)
    ds = bundle.load(args.data, args.outcomes, args.format)
    probs = bundle.predict(ds)
    threshold = _threshold(args, bundle)
    m = exact_metrics(ds.y, probs, threshold)
    if args.json:
        print(to_json(m, indent=None))
    else:
        flagged = f"  (flagged at risk >= {threshold:.3f})" if probs.shape[1] == 2 else ""
        print(f"{args.data}: {format_metrics(m)}{flagged}")
    return 0


def _threshold(args, bundle) -> float:
    """--threshold, else the one the run chose and saved in the bundle, else 0.5."""
    if args.threshold is not None:
        if not 0 < args.threshold < 1:
            raise ConfigError("--threshold must be a risk strictly between 0 and 1")
        return float(args.threshold)
    return float(bundle.info.get("threshold", 0.5))


def cmd_predict(args) -> int:
    import csv

    from common.bundle import Bundle
    from common.metrics import predicted_class

    bundle = Bundle(args.model)
    ds = bundle.load(args.data, None, args.format)
    probs = bundle.predict(ds)
    classes = bundle.config.task.classes
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as handle:
        writer = csv.writer(handle)
        if len(classes) == 2:
            flagged = predicted_class(probs, _threshold(args, bundle))  # the same rule as the metrics
            writer.writerow(["stay_id", f"risk_{classes[1]}", "flagged"])
            for sid, p, flag in zip(ds.stay_ids, probs[:, 1], flagged):
                writer.writerow([sid, f"{p:.6f}", int(flag)])
        else:
            writer.writerow(["stay_id", *(f"p_{c}" for c in classes), "predicted"])
            for sid, row in zip(ds.stay_ids, probs):
                writer.writerow([sid, *(f"{p:.6f}" for p in row), classes[int(row.argmax())]])
    print(f"wrote {len(ds.stay_ids)} risk scores to {out}")
    return 0


def cmd_plan(args) -> int:
    from common.privacy import plan

    if (args.epsilon is None) == (args.noise_multiplier is None):
        raise ConfigError("give either --epsilon (to get sigma) or --noise-multiplier (to get epsilon)")
    p = plan(
        args.examples, args.batch_size, args.local_epochs, args.rounds, args.delta, args.accountant,
        target_epsilon=args.epsilon, noise_multiplier=args.noise_multiplier,
    )
    if args.json:
        print(json.dumps({"noise_multiplier": p.noise_multiplier, "sample_rate": p.sample_rate,
                          "steps_per_round": p.steps_per_round, "epsilon_per_round": p.epsilon_per_round}))
        return 0
    print(f"{args.examples} training examples, expected batch {args.batch_size}: sample rate {p.sample_rate:.4f}, "
          f"{p.steps_per_round} noisy steps per round, {p.steps_per_round * args.rounds} in {args.rounds} rounds")
    if args.epsilon is not None:
        print(f"noise multiplier for epsilon {args.epsilon} at delta {args.delta:g} ({args.accountant}): {p.noise_multiplier:.4f}")
    print(f"{'round':>5}  epsilon (delta {args.delta:g}, {args.accountant})")
    for r, eps in enumerate(p.epsilon_per_round, start=1):
        print(f"{r:>5}  {eps:.4f}")
    return 0


def cmd_ledger(args) -> int:
    from common.ledger import Ledger, LedgerError
    from common.messages import Mechanism

    path = Path(args.ledger)
    if args.action == "init":
        from client.ledger_store import write_ledger
        from common.bundle import guess_format
        from common.data.dataset import fingerprint_files, load_dataset

        if path.exists():
            raise DataError(str(path), "a ledger already exists here; it is never overwritten")
        cfg = _load(args)
        fmt = args.format or guess_format(Path(args.data))
        ds = load_dataset(cfg, data_path=args.data, outcomes_path=args.outcomes, data_format=fmt)
        delta = float(args.delta) if args.delta != "auto" else auto_delta(len(ds))
        fingerprint = fingerprint_files(Path(args.data).resolve(), Path(args.outcomes).resolve())
        write_ledger(path, Ledger(args.hospital, fingerprint, delta, cfg.privacy.accountant))
        print(f"created an empty ledger for {args.hospital} at {path} (data {fingerprint[:16]}..., {len(ds)} stays, delta {delta:g})")
        return 0
    try:
        ledger = Ledger.from_json(path.read_text(), source=str(path)) if path.is_file() else None
    except LedgerError as exc:
        raise DataError(str(path), str(exc)) from None
    if ledger is None:
        raise DataError(str(path), "no ledger here")
    dp = [e for e in ledger.entries if e.mechanism == Mechanism.DP_SGD]
    print(f"ledger of {ledger.hospital}: data {ledger.fingerprint[:16]}..., delta {ledger.delta:g}")
    print(f"epsilon {ledger.epsilon('rdp'):.4f} (RDP), {ledger.epsilon('prv'):.4f} (PRV), over {len(dp)} DP-SGD rounds in {len(ledger.runs())} run(s)")
    for run in ledger.runs():
        rounds = [e for e in dp if e.run_id == run]
        other = [e for e in ledger.entries if e.run_id == run and e.mechanism != Mechanism.DP_SGD]
        print(f"  run {run}: {len(rounds)} DP-SGD rounds, {sum(e.steps for e in rounds)} steps, {len(other)} non-DP releases")
    return 0


def cmd_deploy(args) -> int:
    from server.deploy import init_deployment

    try:
        text = init_deployment(Path(args.out), args.hospitals.split(","), host=args.host, port=args.port)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    print(text)
    print(f"\nWrote the keys, certificates and these commands to {args.out} (COMMANDS.md, flwr-config.toml).")
    return 0


def cmd_baseline(args) -> int:
    from simulations.baselines import run_baseline

    cfg = _load(args)
    result = run_baseline(cfg, args.kind, Path(args.out) if args.out else None, target_epsilon=args.epsilon)
    print(to_json(result))
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
    p.add_argument("--threshold", type=float,
                   help="binary tasks: flag a patient at this risk or more (default: the one the run chose)")
    p.set_defaults(fn=cmd_evaluate)

    p = sub.add_parser("predict", help="write per-stay risk scores to a CSV")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--format", choices=["physionet2012", "long_csv"])
    p.add_argument("--out", required=True, help="CSV to write")
    p.add_argument("--threshold", type=float,
                   help="binary tasks: flag a patient at this risk or more (default: the one the run chose)")
    p.set_defaults(fn=cmd_predict)

    p = sub.add_parser("plan", help="noise multiplier for a target epsilon, or epsilon per round for a noise multiplier")
    p.add_argument("--epsilon", type=float, help="target epsilon for the whole planned run")
    p.add_argument("--noise-multiplier", type=float, help="a fixed noise multiplier (prints epsilon per round)")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--rounds", type=int, required=True)
    p.add_argument("--local-epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, required=True, help="expected (Poisson) batch size")
    p.add_argument("--examples", type=int, required=True, help="training examples at the hospital")
    p.add_argument("--accountant", choices=["rdp", "prv"], default="rdp")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_plan)

    p = sub.add_parser("ledger", help="a hospital's privacy ledger: create it once, show it any time")
    p.add_argument("action", choices=["init", "show"])
    p.add_argument("--ledger", required=True, help="ledger file (the SuperNode's ledger-path)")
    p.add_argument("--hospital", default="hospital", help="init: the hospital's name")
    p.add_argument("--data", help="init: the hospital's data (PhysioNet folder/.tar.gz or long CSV)")
    p.add_argument("--outcomes", help="init: the hospital's outcomes file")
    p.add_argument("--format", choices=["physionet2012", "long_csv"])
    p.add_argument("--delta", default="auto", help="init: delta for every epsilon in this ledger (default: below 1/n)")
    _config_arg(p)
    p.set_defaults(fn=cmd_ledger)

    p = sub.add_parser("deploy", help="create a CA, the SuperLink's certificate and each hospital's key")
    p.add_argument("action", choices=["init"])
    p.add_argument("--out", required=True, help="folder for the key material and COMMANDS.md")
    p.add_argument("--hospitals", required=True, help="comma-separated hospital names, e.g. a,b,c")
    p.add_argument("--host", default="127.0.0.1", help="the SuperLink's address as hospitals reach it")
    p.add_argument("--port", type=int, default=9093)
    p.set_defaults(fn=cmd_deploy)

    p = sub.add_parser("report", help="write report.md and a self-contained report.html for a run")
    p.add_argument("run_dir", help="a run folder (runs/<timestamp>)")
    p.set_defaults(fn=cmd_report)

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
