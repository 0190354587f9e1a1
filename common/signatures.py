"""Checking a hospital's signature with its long-term public key (the SuperNode key pair
``fedgru hospital init`` makes: ``<name>.key`` stays in the hospital, ``<name>.pub`` is
given to the coordinator and, for secure aggregation, to the other hospitals).

Both sides check signed round keys (``common.secagg.keys_to_sign``): a hospital with the
peers its policy lists (``client.secagg``), and the coordinator with the ``<name>.pub``
files it registered (``server.secagg.signature_problem``), so that one hospital's bad
keys leave it out of a round instead of making every careful hospital refuse it. Signing
is the hospital's alone (``client.peer_keys``).
"""

from __future__ import annotations

import base64

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey


def public_key_of(text: str) -> PublicKey:
    """A hospital's public key from its ``<name>.pub`` line (OpenSSH: ``ecdsa-sha2-nistp384
    AAAA...`` or ``ssh-ed25519 AAAA...``); ValueError for anything else."""
    try:
        key = serialization.load_ssh_public_key(text.strip().encode())
    except (ValueError, TypeError, IndexError, UnsupportedAlgorithm):
        raise ValueError("is not an OpenSSH public key line (the content of a hospital's <name>.pub)") from None
    if not isinstance(key, (ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey)):
        raise ValueError("must be an elliptic-curve or Ed25519 key (as `fedgru hospital init` makes)")
    return key


def verifies(key: PublicKey, data: bytes, signature: str) -> bool:
    """Whether ``signature`` (base64) is ``key``'s signature of ``data`` (ECDSA with
    SHA-384, or Ed25519)."""
    try:
        raw = base64.b64decode(signature.encode(), validate=True)
        if isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(raw, data)
        else:
            key.verify(raw, data, ec.ECDSA(hashes.SHA384()))
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True
