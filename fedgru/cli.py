"""The ``fedgru`` command: one entry point, each subcommand in the folder of its role.

    fedgru simulate  [--config FILE] [--out DIR] [--rounds N] [--set key=value ...] [--verbose]
    fedgru evaluate  --model RUN/model.pt --data PATH --outcomes FILE [--format F] [--subgroups] [--threshold T] [--json] [--csv FILE]
    fedgru predict   --model RUN/model.pt --data PATH --out risks.csv|- [--format F] [--hourly] [--threshold T]
    fedgru explain   --model RUN/model.pt --data PATH --stay ID [--stay ID ...] [--top K] [--json]
    fedgru monitor   --model RUN/model.pt --data PATH --stay ID [--stay ID ...] [--out FILE.html] [--threshold T]
    fedgru baseline  [--config FILE] --kind central|central-dp|local [--epsilon E] [--out DIR]
    fedgru report    RUN_DIR
    fedgru plan      --epsilon E | --noise-multiplier S  --rounds R --batch-size B --examples N [--delta D] [--local-epochs K] [--json]
    fedgru hospital  init --out DIR --name NAME --data PATH --outcomes FILE --max-epsilon E [--config FILE]
    fedgru hospital  data|approve|serve|show --hospital-dir DIR
    fedgru hospital  peer --hospital-dir DIR --name OTHER --key OTHER.pub
    fedgru deploy    init --out DIR --hospital NAME=KEY.pub ... [--host HOST --port PORT]
    fedgru deploy    local --out DIR [--hospitals N] [--rounds R] [--set key=value ...]
    fedgru status    [--federation NAME] [--config FILE] [--set key=value ...] [--app DIR] [--rounds N]
    fedgru audit     [--config FILE] [--set key=value ...] [--hospital NAME] [--canaries M] [--json] [--out DIR]

Each command's every option, with its default: fedgru COMMAND --help.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common.config import ConfigError, load_config
from common.data.records import DataError
from common.files import to_json
from common.metrics import format_number
from common.paths import project_root
from fedgru.bedside import cmd_explain, cmd_monitor, cmd_predict
from fedgru.evaluate import cmd_evaluate


def _config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML experiment config (default: configs/default.yaml)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, e.g. --set training.lr=0.01 (repeatable)",
    )


def at_least_one(what: str):
    """An argparse type: a whole number of ``what``, at least 1 (``--rounds 0`` is not "the config's")."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{value} {what}: it takes at least 1")
        return value

    return parse


def _load(args) -> object:
    path = Path(args.config) if args.config else project_root() / "configs" / "default.yaml"
    overrides = list(args.overrides)
    if getattr(args, "rounds", None) is not None:
        overrides.append(f"run.rounds={args.rounds}")
    return load_config(path, overrides)


def cmd_simulate(args) -> int:
    from simulations.simulate import default_run_dir, simulate

    cfg = _load(args)
    if cfg.model.init_from:  # a start that cannot be used is an error before anything starts
        from server.start_model import load_start_model

        load_start_model(cfg)
    run_dir = Path(args.out).resolve() if args.out else default_run_dir(cfg)
    from simulations.faults import parse_fault

    faults = {}
    for item in args.fault:
        hospital, _, kind = item.partition("=")
        if not kind:
            raise ConfigError(f"--fault {item!r} must look like HOSPITAL=KIND")
        try:
            parse_fault(kind)
        except ValueError as exc:  # before anything starts
            raise ConfigError(f"--fault {item!r}: {exc}") from None
        faults[hospital] = kind
    gpus = None if args.gpus_per_hospital in (None, "auto") else float(args.gpus_per_hospital)
    try:
        simulate(cfg, run_dir, cpus_per_hospital=args.cpus_per_hospital, faults=faults, gpus_per_hospital=gpus,
                 ray_address=args.ray_address, verbose=args.verbose)
    finally:
        if (run_dir / "metrics.json").is_file():  # the results on stdout (progress went to stderr)
            from server.report import RunFolder, summary_text

            print(summary_text(RunFolder.load(run_dir)))
    return 0


def _print_summary(run_dir: Path, out=None) -> None:
    from server.report import write_report

    print(file=out or sys.stdout)
    print(write_report(run_dir), file=out or sys.stdout)


def cmd_report(args) -> int:
    from server.report import write_report

    run_dir = Path(args.run_dir)
    if not (run_dir / "metrics.json").is_file():
        raise DataError(str(run_dir), "is not a fedgru run folder (no metrics.json)")
    print(write_report(run_dir))
    return 0


def cmd_plan(args) -> int:
    from common.privacy import InfeasibleTarget, plan

    for flag, value in (("--rounds", args.rounds), ("--batch-size", args.batch_size), ("--examples", args.examples)):
        if value < 1:
            raise ConfigError(f"{flag} must be at least 1")
    if not 0 < args.delta < 1 or args.local_epochs <= 0:
        raise ConfigError("--delta must be in (0, 1) and --local-epochs positive")
    try:
        p = plan(
            args.examples, args.batch_size, args.local_epochs, args.rounds, args.delta, args.accountant,
            target_epsilon=args.epsilon, noise_multiplier=args.noise_multiplier,
        )
    except InfeasibleTarget as exc:
        raise ConfigError(f"{exc}. Nearest feasible: {_feasible(args, exc)}") from None
    if args.json:
        print(json.dumps({"noise_multiplier": p.noise_multiplier, "sample_rate": p.sample_rate,
                          "steps_per_round": p.steps_per_round, "epsilon_per_round": p.epsilon_per_round}))
        return 0
    if args.batch_size >= args.examples:
        print(f"note: the batch ({args.batch_size}) is not smaller than the {args.examples} examples: every step "
              "uses each of them (sample rate 1), with no amplification by sampling")
    print(f"{args.examples} training examples, expected batch {args.batch_size}: sample rate {p.sample_rate:.4f}, "
          f"{p.steps_per_round} noisy steps per round, {p.steps_per_round * args.rounds} in {args.rounds} rounds")
    if args.epsilon is not None:
        print(f"noise multiplier for epsilon {args.epsilon} at delta {args.delta:g} ({args.accountant}): {format_number(p.noise_multiplier)}")
    print(f"{'round':>5}  epsilon (delta {args.delta:g}, {args.accountant})")
    for r, eps in enumerate(p.epsilon_per_round, start=1):
        print(f"{r:>5}  {format_number(eps)}")
    if args.epsilon is not None:
        print(_ceiling_note(args, p))
    return 0


def _ceiling_note(args, p) -> str:
    """What a hospital with ``hospital init``'s default policy does with this plan: it
    refuses a round that costs more than half its budget (policy.max_epsilon_per_round),
    so a short run trains with more noise than the plan (a new user's 3-round plan said
    3.31 where the deployed hospitals used 3.83, "its per-round ceiling"). Read from the
    hospital's own noise fit (``client.noise.fit_noise``), so plan answers as it will."""
    from client.noise import fit_noise
    from client.policy import PolicyRefusal, default_policy
    from common.ledger import Ledger
    from common.privacy import plan

    policy = default_policy(args.epsilon, args.delta, args.epsilon)
    ceiling, first = policy.max_epsilon_per_round, p.epsilon_per_round[0]
    said = (f"a hospital with `fedgru hospital init`'s default policy and budget {args.epsilon:g} refuses a round that "
            f"costs more than {ceiling:g} (policy.max_epsilon_per_round): round 1 here costs {format_number(first)}")
    if first <= ceiling + 1e-9:
        return said + ", within it"
    cfg = load_config(None, [f"run.rounds={args.rounds}", f"training.batch_size={args.batch_size}",
                             f"training.local_epochs={args.local_epochs}", "training.sample_rate=0",
                             "privacy.noise_multiplier=0", f"privacy.target_epsilon={args.epsilon}",
                             f"privacy.delta={args.delta}"])
    try:
        fit = fit_noise(cfg, policy, args.examples, args.accountant, Ledger("plan", args.delta), args.epsilon)
    except PolicyRefusal as exc:
        return said + f", and it refuses this plan: {exc}"
    after = plan(args.examples, args.batch_size, args.local_epochs, args.rounds, args.delta, args.accountant,
                 noise_multiplier=fit.noise_multiplier).epsilon_per_round[-1]
    return (said + f": such a hospital trains with noise multiplier {format_number(fit.noise_multiplier)} instead "
            f"(\"{fit.set_by}\"), ending at epsilon {format_number(after)} after {args.rounds} rounds")


def _feasible(args, exc) -> str:
    """The nearest settings that fit an infeasible target: the least certifiable epsilon,
    the other accountant where it certifies the target, a larger delta."""
    import math

    from common.privacy import InfeasibleTarget, plan

    options = [f"--epsilon {math.ceil(exc.floor * 100) / 100:g}"]
    other = "prv" if args.accountant == "rdp" else "rdp"
    try:
        sigma = plan(args.examples, args.batch_size, args.local_epochs, args.rounds, args.delta, other,
                     target_epsilon=args.epsilon).noise_multiplier
        options.append(f"--accountant {other} (noise multiplier {format_number(sigma)})")
    except InfeasibleTarget:
        pass
    return ", or ".join(options) + ", or a larger --delta"


def cmd_hospital(args) -> int:
    from client import commands
    from client.folder import FolderError

    try:
        if args.action == "init":
            print(commands.init(
                Path(args.out), args.name, args.data, args.outcomes, args.max_epsilon, args.delta, args.eval_epsilon,
                args.format or "physionet2012", args.id_column, args.label_column, args.device, _load(args),
            ))
        elif args.action == "data":
            cfg = _load(args) if (args.config or args.overrides) else None
            print(commands.register_data(Path(args.hospital_dir), args.data, args.outcomes, args.format, args.id_column,
                                         args.label_column, cfg, args.recount))
        elif args.action == "approve":
            print(commands.approve(Path(args.hospital_dir), Path(args.app) if args.app else None, args.note))
        elif args.action == "peer":
            print(commands.add_peer(Path(args.hospital_dir), args.name, Path(args.key)))
        elif args.action == "serve":
            commands.serve(Path(args.hospital_dir), args.runtime_api, args.poll, args.task_timeout)
        else:
            print(commands.show(Path(args.hospital_dir), as_json=args.json))
    except FolderError as exc:
        raise ConfigError(str(exc)) from None
    return 0


def cmd_deploy(args) -> int:
    if args.action == "local":
        return _deploy_local(args)
    from server.deploy import init_deployment

    keys = {}
    for item in args.hospital:
        name, _, key = item.partition("=")
        if not key:
            raise ConfigError(f"--hospital {item!r} must look like NAME=PATH/TO/NAME.pub")
        keys[name] = Path(key)
    try:
        text = init_deployment(Path(args.out), keys, host=args.host, port=args.port)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    print(text)
    print(f"\nWrote the keys, certificates and these commands to {args.out} (COMMANDS.md, flwr-config.toml).")
    return 0


def _deploy_local(args) -> int:
    from simulations.deploy_local import deploy_local

    try:
        result = deploy_local(Path(args.config) if args.config else None, list(args.overrides), args.hospitals,
                              Path(args.out).resolve(), args.rounds, progress=lambda text: print(text, file=sys.stderr))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    for step, seconds in result.seconds.items():
        print(f"  {step}: {seconds:.0f} s", file=sys.stderr)
    if result.run_dir is None or result.run_exit_code != 0:
        raise ConfigError(f"the deployed run did not finish (exit code {result.run_exit_code}); its logs are in "
                          f"{Path(args.out) / 'logs'}")
    summary = result.run_dir / "report.md"
    if summary.is_file():  # its first line names the run folder
        from server.report import RunFolder, summary_text

        print(summary_text(RunFolder.load(result.run_dir)))
    else:
        print(f"Run folder: {result.run_dir}")
    for name, shown in result.hospitals.items():
        groups = shown.get("groups", {})
        spent = ", ".join(f"{g} {v['epsilon']:.3f} of {v['budget']:g}" for g, v in groups.items())
        print(f"{name}: epsilon {spent}  (fedgru hospital show --hospital-dir {Path(args.out) / 'hospitals' / name} --json)")
    return 0


def cmd_status(args) -> int:
    """Who is connected to the federation, whether each runs this app version, and each
    one's answer to the config's plan with its remaining budgets: a ``flwr run`` of the
    app in status mode (no run folder, nothing trained or released)."""
    import os
    import subprocess

    _check_connection(args.federation)
    settings = " ".join(args.overrides)
    config = f'status=true rounds={args.rounds or 0} set="{settings}"' + (
        f' config-file="{Path(args.config).resolve()}"' if args.config else "")
    env = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    command = [str(Path(sys.executable).parent / "flwr"), "run", str(Path(args.app).resolve() if args.app else project_root()),
               args.federation, "--stream", "--run-config", config]
    return subprocess.run(command, env=env).returncode


def _check_connection(name: str) -> None:
    """The Flower CLI's connection ``name`` must exist before ``flwr run`` is called: without
    it, Flower writes a default ~/.flwr/config.toml and prints its own boxed error, which
    says nothing of where a fedgru connection comes from."""
    import os
    import tomllib

    path = Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr")) / "config.toml"
    try:
        connections = tomllib.loads(path.read_text()).get("superlink", {})
    except FileNotFoundError:
        connections = {}
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read ({exc})") from None
    if name not in connections:
        raise ConfigError(
            f"no Flower connection named '{name}' in {path}: `fedgru deploy init` writes one to its flwr-config.toml; "
            f"append that file there (mkdir -p {path.parent} && cat OUT/flwr-config.toml >> {path}), or name another "
            "with --federation (docs/deployment.md)")


def cmd_audit(args) -> int:
    from simulations.audit import format_result, run_audit
    from simulations.simulate import default_run_dir

    cfg = _load(args)
    run_dir = Path(args.out).resolve() if args.out else default_run_dir(cfg)
    try:
        result = run_audit(cfg, run_dir, hospital=args.hospital, canaries=args.canaries)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    # --json: stdout holds only the JSON object (the summary and the result in words go to stderr)
    out = sys.stderr if args.json else sys.stdout
    _print_summary(run_dir, out)
    print(file=out)
    print(format_result(result), file=out)
    if args.json:
        print(to_json(result, indent=None))
    return 0


def cmd_baseline(args) -> int:
    from simulations.baselines import run_baseline

    cfg = _load(args)
    result = run_baseline(cfg, args.kind, Path(args.out) if args.out else None, target_epsilon=args.epsilon)
    print(to_json(result))
    return 0


def _stay_arguments(p: argparse.ArgumentParser, stay_help: str) -> None:
    """The arguments of the commands that look at single stays with a saved model."""
    p.add_argument("--model", required=True, help="model bundle (runs/<run>/model.pt)")
    p.add_argument("--data", required=True, help="PhysioNet folder or .tar.gz, or long-format CSV")
    p.add_argument("--format", choices=["physionet2012", "long_csv"], help="data format (default: from the path)")
    p.add_argument("--stay", action="append", required=True, help=stay_help)


def _hospital_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hospital-dir", required=True, help="the hospital's folder (made by fedgru hospital init)")


def _export_arguments(p: argparse.ArgumentParser, required: bool) -> None:
    """The arguments of ``hospital init`` and ``hospital data`` that name a hospital's export."""
    p.add_argument("--data", required=required, help="its stays (PhysioNet folder/.tar.gz or long CSV)")
    p.add_argument("--outcomes", required=required, help="its outcomes file (Outcomes-*.txt or stay_id,label CSV)")
    p.add_argument("--format", choices=["physionet2012", "long_csv"],
                   help="the data's format (default physionet2012, or as registered)")
    p.add_argument("--id-column", default="", help="the outcomes file's stay id column, if not the config's")
    p.add_argument("--label-column", default="", help="the outcomes column with the task's label, if named otherwise")


def _command(sub, name: str, help: str) -> argparse.ArgumentParser:
    """A subcommand whose --help starts with what it does (its line in fedgru --help)."""
    return sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedgru", description=__doc__.replace("``", ""),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _command(sub, "simulate", help="run a federated simulation (Flower simulation runtime)")
    _config_arg(p)
    p.add_argument("--out", help="run folder (default: <run.out_dir>/<timestamp>)")
    p.add_argument("--rounds", type=at_least_one("rounds"), help="override run.rounds")
    p.add_argument("--cpus-per-hospital", type=int, default=1, help="CPU cores per simulated hospital (default 1)")
    p.add_argument("--gpus-per-hospital", default="auto", metavar="SHARE",
                   help="each simulated hospital's share of a GPU, e.g. 0.25 (default auto: one GPU shared equally "
                        "when training.device allows CUDA and a GPU is present; 0: CPU only)")
    p.add_argument("--ray-address", help="run the hospitals on an existing Ray cluster: 'auto' or HEAD_HOST:PORT "
                                         "(default: a Ray instance on this machine)")
    p.add_argument(
        "--fault", action="append", default=[], metavar="HOSPITAL=KIND",
        help="fault drill: make a hospital misbehave (nan, inf, huge_count, crash, crash_mid_round; KIND@N: from "
             "training round N on, evaluations spared); repeatable",
    )
    p.add_argument("--verbose", action="store_true", help="show everything Flower and Ray log (default: progress only)")
    p.set_defaults(fn=cmd_simulate)

    p = _command(sub, "evaluate", help="score labelled stays with a saved model and print metrics")
    p.add_argument("--model", required=True, help="model bundle (runs/<run>/model.pt)")
    p.add_argument("--data", required=True, help="PhysioNet folder or .tar.gz, or long-format CSV")
    p.add_argument("--outcomes", required=True, help="outcomes file (PhysioNet Outcomes-*.txt or stay_id,label CSV)")
    p.add_argument("--format", choices=["physionet2012", "long_csv"], help="data format (default: from the path)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--threshold", type=float,
                   help="binary tasks: flag a patient at this risk or more (default: the one the run chose)")
    p.add_argument("--subgroups", action="store_true",
                   help="also a table of the groups of patients (evaluation.subgroups): AUROC, sensitivity, "
                        "specificity and observed/predicted, exact: nothing leaves")
    p.add_argument("--csv", metavar="FILE",
                   help="also write every metric with its interval, for the whole export and (with --subgroups) "
                        "each group, one row each, to FILE ('-': stdout, instead of the text)")
    p.set_defaults(fn=cmd_evaluate)

    p = _command(sub, "predict", help="write per-stay risk scores to a CSV")
    p.add_argument("--model", required=True, help="model bundle (runs/<run>/model.pt)")
    p.add_argument("--data", required=True, help="PhysioNet folder or .tar.gz, or long-format CSV")
    p.add_argument("--format", choices=["physionet2012", "long_csv"], help="data format (default: from the path)")
    p.add_argument("--out", required=True, help="CSV to write ('-': stdout)")
    p.add_argument("--hourly", action="store_true",
                   help="one row per stay and hour: the risk after each hour, from what was observed up to it")
    p.add_argument("--threshold", type=float,
                   help="binary tasks: flag a patient at this risk or more (default: the run's decision threshold; "
                        "with --hourly the run's threshold for each hour moved up by its margin, a flag kept once "
                        "raised; --threshold T judges every hour at T alone, on and off)")
    p.set_defaults(fn=cmd_predict)

    p = _command(sub, "explain", help="why the model gives a stay its risk: contributions per variable and descriptor")
    _stay_arguments(p, "a stay id (repeatable)")
    p.add_argument("--top", type=at_least_one("contributions"), default=8,
                   help="contributions to print, largest first (default 8; more than the model's inputs prints all)")
    p.add_argument("--json", action="store_true", help="print only JSON: one line per stay with every contribution")
    p.set_defaults(fn=cmd_explain)

    p = _command(sub, "monitor", help="a stay's risk hour by hour, with the threshold and what moved it (HTML)")
    _stay_arguments(p, "a stay id (repeatable: one chart each)")
    p.add_argument("--out", help="HTML file, one page for every --stay (default monitor-<first stay>.html)")
    p.add_argument("--threshold", type=float,
                   help="flag at this risk at every hour, on and off, without the run's margin (default: the run's "
                        "threshold for each hour moved up by its margin, a flag kept once raised)")
    p.set_defaults(fn=cmd_monitor)

    p = _command(sub, "plan", help="noise multiplier for a target epsilon, or epsilon per round for a noise multiplier")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--epsilon", type=float, help="target epsilon for the whole planned run")
    target.add_argument("--noise-multiplier", type=float, help="a fixed noise multiplier (prints epsilon per round)")
    p.add_argument("--delta", type=float, default=1e-5, help="delta of every epsilon (default 1e-5)")
    p.add_argument("--rounds", type=at_least_one("rounds"), required=True, help="planned rounds")
    p.add_argument("--local-epochs", type=float, default=1.0, help="passes over the training examples per round (default: 1)")
    p.add_argument("--batch-size", type=int, required=True, help="expected (Poisson) batch size")
    p.add_argument("--examples", type=int, required=True, help="training examples at the hospital")
    p.add_argument("--accountant", choices=["rdp", "prv"], default="rdp", help="privacy accountant (default rdp)")
    p.add_argument("--json", action="store_true", help="print one JSON object only")
    p.set_defaults(fn=cmd_plan)

    p = _command(sub, "hospital", help="a hospital's own folder: policy, keys, ledger, approved app versions")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION",
                               title="actions (each has its own --help)")
    a = _command(actions, "init", help="make the hospital's folder: its policy, keys, ledger and data definition")
    a.add_argument("--out", required=True, help="the folder to create")
    a.add_argument("--name", required=True, help="the hospital's name (letters, digits, - and _)")
    _export_arguments(a, required=True)
    a.add_argument("--max-epsilon", type=float, required=True, help="the training patients' budget")
    a.add_argument("--eval-epsilon", type=float, help="the validation and test patients' budget (default: --max-epsilon)")
    a.add_argument("--delta", type=float, help="delta of every epsilon in the ledger (default: below 1/n)")
    a.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where it trains (default auto: its GPU if it has one)")
    _config_arg(a)
    a = _command(actions, "data", help="register a new export or data definition with the hospital's folder")
    _hospital_dir(a)
    _export_arguments(a, required=False)
    a.add_argument("--recount", action="store_true",
                   help="declare the export's split sizes anew (they are released with every training reply)")
    _config_arg(a)
    a = _command(actions, "approve", help="approve an app version: the hospital answers only the versions its staff "
                                          "approved")
    _hospital_dir(a)
    a.add_argument("--app", help="the project folder of the app version to approve (default: the installed one)")
    a.add_argument("--note", default="", help="who approved it and why")
    a = _command(actions, "peer", help="list another hospital for secure aggregation (policy.peer_keys)")
    _hospital_dir(a)
    a.add_argument("--name", required=True, help="the other hospital's name")
    a.add_argument("--key", required=True, help="the other hospital's public key file (its <name>.pub, from its staff)")
    a = _command(actions, "serve", help="run the hospital's app beside its SuperNode (it answers the coordinator)")
    _hospital_dir(a)
    a.add_argument("--runtime-api", default="127.0.0.1:9094",
                   help="the SuperNode's runtime API, its --host:--port (default 127.0.0.1:9094)")
    a.add_argument("--poll", type=float, default=0.2, help="seconds between polls for a task (default 0.2)")
    a.add_argument("--task-timeout", type=float, default=6 * 3600,
                   help="seconds after which a task still running is stopped (default 6 h)")
    a = _command(actions, "show", help="what each group of the hospital's patients has spent, per run, and the "
                                       "approved app versions")
    _hospital_dir(a)
    a.add_argument("--json", action="store_true", help="one JSON object (each group's epsilon, budgets, runs)")
    p.set_defaults(fn=cmd_hospital)

    p = _command(sub, "deploy", help="a real deployment: the coordinator's key material (init), or a whole one on "
                                      "this machine, run and taken down (local)")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION",
                               title="actions (each has its own --help)")
    a = _command(actions, "init", help="make the coordinator's CA, the SuperLink's certificate and the commands "
                                       "each side runs (COMMANDS.md)")
    a.add_argument("--out", required=True, help="folder for the key material and COMMANDS.md")
    a.add_argument("--hospital", action="append", required=True, metavar="NAME=KEY.pub",
                   help="a hospital and the public key it sent (repeat for each hospital)")
    a.add_argument("--host", default="127.0.0.1", help="the SuperLink's address as hospitals reach it "
                                                        "(default 127.0.0.1)")
    a.add_argument("--port", type=int, default=9093, help="the SuperLink's port (default 9093)")
    a = _command(actions, "local", help="a try-out: SuperLink, SuperNodes and hospitals on this machine over TLS, "
                                        "run and taken down")
    a.add_argument("--out", required=True, help="a new folder for everything (keys, hospitals, logs, the run)")
    a.add_argument("--hospitals", type=int, default=2, help="how many hospitals share the configured data (default 2)")
    a.add_argument("--rounds", type=at_least_one("rounds"), help="override run.rounds")
    _config_arg(a)
    p.set_defaults(fn=cmd_deploy)

    p = _command(sub, "status", help="the coordinator's view: connected hospitals, whether each runs this app version, "
                                      "each one's answer to the plan and its remaining budgets (no run, nothing spent)")
    p.add_argument("--federation", default="fedgru", help="the Flower connection in ~/.flwr/config.toml (default fedgru)")
    p.add_argument("--app", help="the project folder of the app (default: the installed fedgru)")
    p.add_argument("--rounds", type=at_least_one("rounds"), help="the plan's rounds (default: run.rounds of the config)")
    _config_arg(p)
    p.set_defaults(fn=cmd_status)

    p = _command(sub, "report", help="write report.md and a self-contained report.html for a run")
    p.add_argument("run_dir", help="a run folder (runs/<timestamp>)")
    p.set_defaults(fn=cmd_report)

    p = _command(sub, "audit", help="an empirical lower bound on a hospital's epsilon (one-run privacy audit)")
    _config_arg(p)
    p.add_argument("--hospital", help="the simulated hospital to audit (default: the first)")
    p.add_argument("--canaries", type=int, default=1000, help="gradient canaries, each included with probability 1/2 (default 1000)")
    p.add_argument("--out", help="run folder (default: <run.out_dir>/<timestamp>)")
    p.add_argument("--json", action="store_true", help="print only the result, as one JSON object (text to stderr)")
    p.set_defaults(fn=cmd_audit)

    p = _command(sub, "baseline", help="centralized or local-only training for comparison")
    _config_arg(p)
    p.add_argument("--kind", required=True, choices=["central", "central-dp", "local"],
                   help="central: pooled data, no DP; central-dp: pooled, DP-SGD; local: each hospital alone, DP-SGD")
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
    except BrokenPipeError:  # `fedgru predict --out - | head`: the reader has what it wanted
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
