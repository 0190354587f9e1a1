"""``fedgru deploy init``: the key material and the exact commands for a real federation.

Writes into ``--out``:

    ca.crt, ca.key                 the federation's certificate authority (keep ca.key offline)
    superlink.crt, superlink.key   the SuperLink's TLS certificate and key
    hospitals/<name>/              what to hand to each hospital: <name>.key (its SuperNode
                                   authentication key), <name>.pub, ca.crt
    flwr-config.toml               the connection entry for the Flower CLI (~/.flwr/config.toml)
    COMMANDS.md                    the commands for the coordinator and for each hospital
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .keys import make_ca, make_server_cert, make_supernode_keypair

CONNECTION = "fedgru"


def _valid_name(name: str) -> str:
    if not name or not all(c.isalnum() or c in "-_" for c in name):
        raise ValueError(f"hospital name {name!r}: use letters, digits, '-' and '_' only")
    return name


def init_deployment(out: Path, hospitals: list[str], host: str = "127.0.0.1", port: int = 9093) -> str:
    """Create everything; return the commands as text (also saved to COMMANDS.md)."""
    names = [_valid_name(h.strip()) for h in hospitals if h.strip()]
    if len(set(names)) != len(names) or not names:
        raise ValueError("give at least one hospital, each name once")
    if (out / "ca.key").exists():
        raise ValueError(f"{out} already holds a federation (ca.key); choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    out = out.resolve()
    ca, ca_key = make_ca(out)
    cert, key = make_server_cert(out, ca, ca_key, list(dict.fromkeys([host, "localhost", "127.0.0.1"])))
    for name in names:
        folder = out / "hospitals" / name
        make_supernode_keypair(folder, name)
        shutil.copy(ca, folder / "ca.crt")
    (out / "flwr-config.toml").write_text(
        f'# Add to ~/.flwr/config.toml (or $FLWR_HOME/config.toml) on the researcher\'s machine.\n'
        f'[superlink.{CONNECTION}]\naddress = "{host}:{port}"\nroot-certificates = "{ca}"\n'
    )
    lines = [
        "# Commands for this federation",
        "",
        "## Coordinator: start the SuperLink (TLS on, only registered hospitals admitted, state kept on disk)",
        "",
        "    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 flower-superlink \\",
        f"        --ssl-ca-certfile {ca} --ssl-certfile {cert} --ssl-keyfile {key} \\",
        f"        --enable-supernode-auth --database {out / 'superlink.db'} \\",
        f"        --host 0.0.0.0 --port {port} --disable-runtime-dependency-installation",
        "",
        "## Coordinator: admit each hospital's public key (once), after adding flwr-config.toml to ~/.flwr/config.toml",
        "",
    ]
    lines += [f"    flwr supernode register {out / 'hospitals' / n / (n + '.pub')} {CONNECTION}" for n in names]
    lines += ["", "## Each hospital (see docs/deployment.md), with the folder hospitals/<name>/ copied over", ""]
    for n in names:
        lines += [
            f"### {n}",
            "",
            f"    fedgru ledger init --ledger /srv/fedgru/{n}-ledger.json --data /data/{n}/stays --outcomes /data/{n}/outcomes.csv --hospital {n}",
            f"    flower-supernode --superlink {host}:{port} --root-certificates ca.crt --auth-supernode-private-key {n}.key \\",
            f"        --node-config 'hospital=\"{n}\" data-path=\"/data/{n}/stays\" outcomes-path=\"/data/{n}/outcomes.csv\" "
            f"ledger-path=\"/srv/fedgru/{n}-ledger.json\" device=\"auto\"'",
            "",
        ]
    lines += [
        "## Researcher: start a run (resume a stopped one with --run-config 'resume=\"runs/<folder>\"')",
        "",
        f"    flwr run . {CONNECTION} --stream --run-config 'config-file=\"configs/default.yaml\"'",
        "",
    ]
    text = "\n".join(lines)
    (out / "COMMANDS.md").write_text(text)
    return text
