"""The fedgru command line and the README's promises about it."""

from __future__ import annotations

import json
import re

import pytest

from tests.conftest import ROOT


def test_plan_cli_prints_sigma_and_epsilons(capsys):
    from fedgru.cli import main

    assert main(["plan", "--epsilon", "1", "--delta", "1e-5", "--rounds", "4", "--local-epochs", "1", "--batch-size", "64", "--examples", "1000", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["steps_per_round"] == 16 and len(out["epsilon_per_round"]) == 4
    assert out["epsilon_per_round"][-1] == pytest.approx(1.0, abs=1e-3)


def test_readme_opens_with_the_two_commands_and_ci_runs_the_second():
    """The README's first lines: install + default simulation, then install + tests; CI
    runs exactly that second command, which sets up everything (Chromium included)."""
    text = (ROOT / "README.md").read_text().splitlines()
    commands = [line.strip() for line in text[:20] if line.startswith("    ")]
    assert len(commands) == 2
    assert commands[0].startswith("python3 -m venv .venv") and commands[0].endswith("fedgru simulate")
    assert "pip install -c constraints.txt" in commands[0]
    assert commands[1] == "bash .ci/run"
    ci = (ROOT / ".ci" / "run").read_text()
    assert "apt-get install" in ci and "chromium" in ci
    assert 'pip install --quiet -c constraints.txt -e ".[test]"' in ci and ci.rstrip().endswith("python -m pytest -n 2 --dist loadfile --no-loadscope-reorder")


def test_plan_answers_an_unreachable_target_with_the_limit_and_the_nearest_settings(capsys):
    """The issue's request (epsilon 0.1, 200 rounds of 2 epochs) ended in an Opacus
    traceback: RDP with Opacus's orders certifies nothing below about 0.103 at delta 1e-5."""
    from fedgru.cli import main

    code = main(["plan", "--epsilon", "0.1", "--delta", "1e-5", "--rounds", "200", "--local-epochs", "2",
                 "--batch-size", "256", "--examples", "404"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "epsilon 0.1 is below the least the RDP accountant can certify at delta 1e-05 with any noise (0.103)" in err
    assert "Nearest feasible: --epsilon 0.11, or --accountant prv (noise multiplier" in err
    assert main(["plan", "--epsilon", "0.11", "--delta", "1e-5", "--rounds", "200", "--local-epochs", "2",
                 "--batch-size", "256", "--examples", "404", "--json"]) == 0  # the nearest setting it names works


def test_plan_says_when_the_batch_is_not_smaller_than_the_data(capsys):
    from fedgru.cli import main

    assert main(["plan", "--epsilon", "1", "--delta", "1e-5", "--rounds", "3", "--batch-size", "500", "--examples", "404"]) == 0
    out = capsys.readouterr().out
    assert "note: the batch (500) is not smaller than the 404 examples" in out and "sample rate 1.0000" in out


def test_hospital_show_prints_each_groups_epsilon_as_json(hospital_data, tmp_path, capsys):
    from fedgru.cli import main
    from tests.conftest import make_hospital

    folder = make_hospital(tmp_path, *hospital_data, max_epsilon=1.0)
    assert main(["hospital", "show", "--hospital-dir", str(folder), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["hospital"] == "st-elsewhere" and set(shown["groups"]) == {"train", "val", "test"}
    assert all(g["epsilon"] == 0.0 and g["budget"] == 1.0 for g in shown["groups"].values()) and shown["runs"] == []


def test_deploy_init_gives_each_hospital_its_own_port_and_the_config_as_a_command(hospital_data, tmp_path):
    from server.deploy import init_deployment
    from tests.conftest import make_hospital

    keys = {}
    for name in ("st-a", "st-b", "st-c"):
        folder = make_hospital(tmp_path / "h", *hospital_data, name=name)
        keys[name] = folder / f"{name}.pub"
    text = init_deployment(tmp_path / "fed", keys)
    ports = [line.split("--runtime-api 127.0.0.1:")[1] for line in text.splitlines() if "--runtime-api" in line]
    assert ports == ["9094", "9095", "9096"]
    assert f"cat {tmp_path / 'fed' / 'flwr-config.toml'} >> ~/.flwr/config.toml" in text
    assert "pkill" not in text and "kill <pid>" in text and "fedgru status" in text


def test_hospital_show_text_lists_each_run_with_its_steps(hospital_data, tmp_path, capsys):
    """The text form once printed "{r['steps']} steps" literally: a run in the ledger must
    show its numbers."""
    from client.folder import HospitalFolder
    from client.ledger_store import FileLedgerStore
    from common.ledger import LedgerEntry
    from common.messages import Mechanism
    from fedgru.cli import main
    from tests.conftest import make_hospital

    path = make_hospital(tmp_path, *hospital_data, max_epsilon=1.0)
    folder = HospitalFolder(path, registered=False)
    with FileLedgerStore(folder.ledger_file, folder.secret("ledger")).transaction() as ledger:
        for r in (1, 2):
            ledger.record(LedgerEntry("run-7", r, Mechanism.DP_SGD, "weights", noise_multiplier=2.0, sample_rate=0.1,
                                      steps=10, max_grad_norm=1.0, examples=100))
    assert main(["hospital", "show", "--hospital-dir", str(path)]) == 0
    out = capsys.readouterr().out
    assert "run run-7: 2 DP-SGD rounds, 20 steps; 2 DP releases and 0 without DP" in out, out
    assert "{" not in out and "by the RDP accountant" in out and "by the PRV accountant" in out


def _actions(parser):
    """(name, parser) of every command and action under ``parser``, depth first."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, sub
                yield from ((f"{name} {inner}", p) for inner, p in _actions(sub))


def test_every_command_and_action_has_its_own_help_with_only_its_options():
    """A user's ``fedgru hospital show --help`` used to list init's budget and serve's
    polling too: each action is now its own parser, and every option says what it does."""
    from fedgru.cli import build_parser

    parsers = dict(_actions(build_parser()))
    assert {"hospital init", "hospital data", "hospital approve", "hospital peer", "hospital serve", "hospital show",
            "deploy init", "deploy local"} <= set(parsers)
    for name, p in parsers.items():
        assert p.description, f"fedgru {name} has no description"
        for action in p._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"fedgru {name} {action.option_strings[0]} has no help"
    options = {name: {o for a in p._actions for o in a.option_strings} for name, p in parsers.items()}
    assert "--max-epsilon" not in options["hospital show"] and "--runtime-api" not in options["hospital init"]
    assert "--hospital-dir" not in options["hospital init"] and "--key" in options["hospital peer"]
    assert "--hospitals" not in options["deploy init"] and "--port" not in options["deploy local"]


def test_a_missing_required_option_is_named_by_the_action(capsys):
    from fedgru.cli import main

    with pytest.raises(SystemExit) as stopped:
        main(["hospital", "init", "--out", "x", "--name", "x", "--data", "d", "--outcomes", "o"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "fedgru hospital init" in err and "--max-epsilon" in err


@pytest.mark.parametrize("fault,said", [("medical=boom", "unknown fault 'boom'; known: crash, crash_mid_round"),
                                        ("medical=crash@0", "after '@' comes the first training round"),
                                        ("medical", "must look like HOSPITAL=KIND")])
def test_a_fault_drill_that_cannot_run_is_an_error_before_anything_starts(fault, said, tmp_path, capsys):
    from fedgru.cli import main

    assert main(["simulate", "--out", str(tmp_path / "run"), "--fault", fault]) == 2
    assert said in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_hospital_init_says_how_many_runs_its_evaluation_budget_allows(hospital_data, tmp_path):
    """One run spends the config's val_epsilon and test_epsilon for good: with an equal
    budget a hospital can take part in one run that scores those stays, and init says so."""
    from client.commands import init
    from tests.conftest import hospital_cfg

    cfg = hospital_cfg("evaluation.val_epsilon=1.0", "evaluation.test_epsilon=1.0")
    said = init(tmp_path / "a", "a", str(hospital_data[0]), str(hospital_data[1]), 1.0, cfg=cfg)
    assert "spends epsilon 1 on validation and 1 on test stays in every run, so 1 allows 1 such run" in said
    gaussian = hospital_cfg("evaluation.val_epsilon=1.0", "evaluation.test_epsilon=1.0", "evaluation.onset_noise=gaussian")
    said = init(tmp_path / "b", "b", str(hospital_data[0]), str(hospital_data[1]), 1.0, eval_epsilon=3.0, cfg=gaussian)
    assert "so 3 allows 7 such runs" in said  # composed: 1, 1.46, 1.82, ..., 2.92 for 7 runs, 3.15 for 8
    # the default's Laplace onset histogram is the less noisy in one run and composes less well over many
    # (validation stays: 1, 1.61, 2.14, 2.62, 3.07), and init says what the Gaussian would allow
    said = init(tmp_path / "c", "c", str(hospital_data[0]), str(hospital_data[1]), 1.0, eval_epsilon=3.0, cfg=cfg)
    assert "so 3 allows 4 such runs" in said and "with evaluation.onset_noise gaussian, 7 such runs" in said


@pytest.mark.parametrize("extra,said", [({"max_epsilon": 0.0}, "--max-epsilon 0: a budget must be a positive number"),
                                        ({"delta": 0.5}, "--delta 0.5 must be below 1/n"),
                                        ({"name": "bad name"}, "hospital name 'bad name'")])
def test_hospital_init_refuses_bad_options_and_leaves_no_half_made_folder(hospital_data, tmp_path, extra, said):
    """A new user's --max-epsilon 0 left keys and a policy behind, named a file they never
    wrote, and blocked the retry ("already holds a hospital folder"); --delta 0.5 was
    accepted without a word. Now each is an error naming the option, nothing is left, and
    the retry with good options works."""
    from client.commands import init
    from client.folder import FolderError
    from tests.conftest import hospital_cfg

    args = {"name": "a", "max_epsilon": 1.0, **extra}
    with pytest.raises(FolderError, match=re.escape(said)):
        init(tmp_path / "h", args["name"], str(hospital_data[0]), str(hospital_data[1]), args["max_epsilon"],
             delta=args.get("delta"), cfg=hospital_cfg())
    assert not (tmp_path / "h").exists()
    assert "made the hospital folder" in init(tmp_path / "h", "a", str(hospital_data[0]), str(hospital_data[1]), 1.0,
                                              cfg=hospital_cfg())
    # a folder the user made beforehand (with a file of theirs) keeps only what was there
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("ours")
    with pytest.raises(FolderError):
        init(tmp_path / "mine", "bad name" if "name" in extra else "a", str(hospital_data[0]), str(hospital_data[1]),
             args["max_epsilon"], delta=args.get("delta"), cfg=hospital_cfg())
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def test_a_second_approval_with_a_note_is_kept_beside_the_first_and_names_the_version(hospital_data, tmp_path):
    """A new user's second `hospital approve --note ...` printed the same line and kept only
    the first, empty note; and nothing said which version a hash was."""
    from client.commands import approve, show
    from tests.conftest import ROOT, make_hospital

    folder = make_hospital(tmp_path, *hospital_data)
    first = approve(folder, ROOT, "")
    assert "fedgru 0." in first and "no --note" in first
    second = approve(folder, ROOT, "J. Doe,  privacy office")
    assert "approved before: this approval is recorded beside the earlier one" in second
    lines = [line for line in (folder / "approved-apps.txt").read_text().splitlines() if not line.startswith("#")]
    assert len(lines) == 2 and lines[0].split()[0] == lines[1].split()[0]
    assert lines[1].endswith("] J. Doe, privacy office") and "[fedgru 0." in lines[1]
    shown = show(folder)
    assert "approved app versions: 1" in shown and "J. Doe, privacy office" in shown


def test_status_without_the_federations_connection_says_where_it_comes_from(tmp_path, monkeypatch, capsys):
    """A new user's `fedgru status` let Flower write a default ~/.flwr/config.toml and print
    its own boxed error; now fedgru says which file lacks the connection and how to add it,
    and writes nothing."""
    from fedgru.cli import _check_connection, main

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr"))
    assert main(["status"]) == 2
    err = capsys.readouterr().err
    assert "no Flower connection named 'fedgru'" in err and "flwr-config.toml" in err
    assert not (tmp_path / "flwr").exists()
    (tmp_path / "flwr").mkdir()
    (tmp_path / "flwr" / "config.toml").write_text('[superlink.fedgru]\naddress = "127.0.0.1:9093"\n')
    _check_connection("fedgru")  # present: flwr run is called


def test_deploy_init_refuses_a_missing_key_file_and_one_key_under_two_names(hospital_data, tmp_path):
    """A new user's deploy init registered one key under two names (that hospital would
    count twice towards every min_honest) and called a missing file "not the OpenSSH key"."""
    from server.deploy import init_deployment
    from tests.conftest import make_hospital

    folder = make_hospital(tmp_path, *hospital_data)
    public = folder / "st-elsewhere.pub"
    with pytest.raises(ValueError, match="the same public key as hospital a's"):
        init_deployment(tmp_path / "fed", {"a": public, "b": public})
    with pytest.raises(ValueError, match="not found"):
        init_deployment(tmp_path / "fed", {"a": tmp_path / "missing.pub"})
    text = init_deployment(tmp_path / "fed", {"a": public})
    assert "reviewed app version (fedgru " in text and "two services (or two terminals)" in text


def test_plan_says_what_a_hospital_with_the_default_policy_does_with_a_short_run(capsys):
    """A new user's 3-round plan said noise 3.31, where each deployed hospital trained with
    3.83 ("its per-round ceiling": a round may cost at most half the budget)."""
    from fedgru.cli import main

    assert main(["plan", "--epsilon", "1", "--rounds", "3", "--batch-size", "256", "--examples", "1406"]) == 0
    out = capsys.readouterr().out
    assert "refuses a round that costs more than 0.5 (policy.max_epsilon_per_round): round 1 here costs 0.609" in out
    assert "trains with noise multiplier 3.83" in out and "ending at epsilon 0.83" in out


def test_hospital_init_that_fails_after_writing_removes_only_what_it_wrote(hospital_data, tmp_path, monkeypatch):
    """A failure half-way (here: registering the export) leaves the user's own folder as it
    was, so the retry is not refused with "already holds a hospital folder"."""
    import client.export
    from client.commands import init
    from tests.conftest import hospital_cfg

    def broken(*args, **kwargs):
        raise RuntimeError("the disk filled up")

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("ours")
    monkeypatch.setattr(client.export, "register", broken)
    with pytest.raises(RuntimeError):
        init(tmp_path / "mine", "a", str(hospital_data[0]), str(hospital_data[1]), 1.0, cfg=hospital_cfg())
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
    monkeypatch.undo()
    assert "made the hospital folder" in init(tmp_path / "mine", "a", str(hospital_data[0]), str(hospital_data[1]), 1.0,
                                              cfg=hospital_cfg())
