"""``fedgru deploy init``: the coordinator's key material and the exact commands for a
real federation.

Each hospital makes its own folder, policy and key pair (``fedgru hospital init``) and
sends only its public key; this writes into ``--out``:

    ca.crt, ca.key                 the federation's certificate authority (keep ca.key offline)
    superlink.crt, superlink.key   the SuperLink's TLS certificate and key
    hospitals/<name>.pub           the public keys the hospitals sent (registered by COMMANDS.md; the run
                                   checks secure aggregation's signed round keys against them)
    flwr-config.toml               the connection entry for the Flower CLI (~/.flwr/config.toml)
    COMMANDS.md                    the commands for the coordinator and for each hospital
"""

from __future__ import annotations

import shutil
from pathlib import Path

from common.messages import HOSPITAL_NAME_RULE, is_hospital_name
from common.version import app_version

from .keys import make_ca, make_server_cert

CONNECTION = "fedgru"


def _valid_name(name: str) -> str:
    if not is_hospital_name(name):
        raise ValueError(f"hospital name {name!r}: {HOSPITAL_NAME_RULE}")
    return name


FIRST_RUNTIME_PORT = 9094  # each hospital's SuperNode serves its app on its own port from here on


def init_deployment(out: Path, hospitals: dict[str, Path], host: str = "127.0.0.1", port: int = 9093) -> str:
    """Create everything; return the commands as text (also saved to COMMANDS.md).
    ``hospitals``: name -> the public key file (``<name>.pub``) that hospital sent."""
    if not hospitals:
        raise ValueError("give at least one hospital and its public key")
    seen: dict[str, str] = {}
    for name, key in hospitals.items():
        _valid_name(name)
        if not key.is_file():
            raise ValueError(f"{key}: not found (hospital {name}'s public key, the <name>.pub its staff sent)")
        text = key.read_text()
        if not text.startswith("ecdsa-sha2-"):
            raise ValueError(f"{key}: not the OpenSSH public key `fedgru hospital init` writes (<name>.pub)")
        material = " ".join(text.split()[:2])
        if material in seen:  # one hospital under two names would be counted twice towards min_honest
            raise ValueError(f"{key}: the same public key as hospital {seen[material]}'s; each hospital has its own")
        seen[material] = name
    if (out / "ca.key").exists():
        raise ValueError(f"{out} already holds a federation (ca.key); choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    out = out.resolve()
    ca, ca_key = make_ca(out)
    cert, key = make_server_cert(out, ca, ca_key, list(dict.fromkeys([host, "localhost", "127.0.0.1"])))
    for name, public in hospitals.items():
        (out / "hospitals").mkdir(exist_ok=True)
        shutil.copy(public, out / "hospitals" / f"{name}.pub")
    (out / "flwr-config.toml").write_text(
        f'# Appended to ~/.flwr/config.toml (or $FLWR_HOME/config.toml) on the researcher\'s machine: see COMMANDS.md.\n'
        f'[superlink.{CONNECTION}]\naddress = "{host}:{port}"\nroot-certificates = "{ca}"\n'
    )
    version = app_version(None)
    lines = [
        "# Commands for this federation",
        "",
        "Three roles: the coordinator (runs the SuperLink), each hospital (its SuperNode and",
        "`fedgru hospital serve`), and the researcher (starts runs with the Flower CLI; often the",
        "coordinator's own staff, on the coordinator's machine). Every side installs the same",
        f"reviewed app version ({version}) from a checkout of it:",
        "",
        "    python3 -m venv .venv && . .venv/bin/activate && pip install -c constraints.txt -e .",
        "",
        "`/srv/fedgru/<name>` below stands for wherever that hospital keeps the folder",
        "`fedgru hospital init` made.",
        "",
        "## Coordinator: start the SuperLink (TLS on, only registered hospitals admitted, state kept on disk)",
        "",
        "    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 flower-superlink \\",
        f"        --ssl-ca-certfile {ca} --ssl-certfile {cert} --ssl-keyfile {key} \\",
        f"        --enable-supernode-auth --database {out / 'superlink.db'} \\",
        f"        --host 0.0.0.0 --port {port} --disable-runtime-dependency-installation",
        "",
        "It runs in the foreground: run it under your service manager (or end the command with `&` and",
        "note its process id with `echo $!`); stop it with `kill <pid>`, never by name (other people's",
        "SuperLinks may run on the same host).",
        "",
        "## Coordinator: tell the Flower CLI where the SuperLink is (once)",
        "",
        f"    mkdir -p ~/.flwr && cat {out / 'flwr-config.toml'} >> ~/.flwr/config.toml",
        "",
        "## Coordinator: admit each hospital's public key (once)",
        "",
    ]
    lines += [f"    flwr supernode register {out / 'hospitals' / (n + '.pub')} {CONNECTION}" for n in hospitals]
    lines += [
        "",
        "## Each hospital (see docs/deployment.md)",
        "",
        f"The coordinator sends each hospital `{ca}` (the federation's CA certificate: public, but",
        "its fingerprint is worth checking by phone); the hospital copies it into its folder as `ca.crt`.",
        "Approve the app version its staff reviewed, start the SuperNode with no app of its own",
        "(`--isolation process`), and serve it the approved app only. The SuperNode and `hospital serve`",
        "both run in the foreground: two services (or two terminals), started in this order:",
        "",
    ]
    for i, n in enumerate(hospitals):
        runtime = FIRST_RUNTIME_PORT + i  # its own port: two hospitals may share a host in a try-out
        lines += [
            f"### {n}",
            "",
            f"    fedgru hospital approve --hospital-dir /srv/fedgru/{n} --note 'reviewed by ...'",
            f"    flower-supernode --superlink {host}:{port} --root-certificates /srv/fedgru/{n}/ca.crt \\",
            f"        --auth-supernode-private-key /srv/fedgru/{n}/{n}.key --isolation process --port {runtime} \\",
            f"        --node-config 'hospital-dir=\"/srv/fedgru/{n}\"'",
            f"    fedgru hospital serve --hospital-dir /srv/fedgru/{n} --runtime-api 127.0.0.1:{runtime}",
            "",
        ]
    lines += [
        "## Researcher: who is connected, and their answers to the plan (no run, nothing spent)",
        "",
        f"    fedgru status --federation {CONNECTION}",
        "",
        "## Researcher: start a run (resume a stopped one with --run-config 'resume=\"runs/<folder>\"')",
        "",
        "From the root of the same app checkout (`.` is the app). flwr-config.toml names the CA by its path",
        "on this machine: on another machine, copy ca.crt there and edit that path.",
        "",
        f"    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 flwr run . {CONNECTION} --stream \\",
        f"        --run-config 'config-file=\"configs/default.yaml\" hospital-keys=\"{out / 'hospitals'}\"'",
        "",
    ]
    text = "\n".join(lines)
    (out / "COMMANDS.md").write_text(text)
    return text
