"""Which hospitals a hospital takes part in secure aggregation with: signed round keys.

In secure aggregation every hospital makes fresh key pairs each round and the coordinator
passes them on (``common.secagg``). A coordinator that passes on key pairs of its own in
another hospital's place reads everything the hospital encrypts for that "hospital" (its
shares of its own mask seed and mask key) and can then remove all of its masks: it sees
the hospital's vector with only the hospital's own share of the noise. Bell et al. (CCS
2020) and Bonawitz et al. (CCS 2017, the malicious-server variant) close this with a
public-key infrastructure: each client signs its round keys with a long-term key the
others know. The checking of a signature is shared with the coordinator
(``common.signatures``); the signing is here.

Here the long-term key is the one each hospital already has: the SuperNode key pair that
``fedgru hospital init`` makes (``<name>.key``, ``<name>.pub``) and the coordinator
registers. A hospital's policy lists, under ``peer_keys``, the hospitals it accepts in a
sum and each one's public key (the line of its ``<name>.pub``), exchanged between the
hospitals' staff, not through the coordinator. With ``peer_keys`` set, every other
participant's round keys must carry a valid signature of a listed hospital, each hospital
once, or the hospital refuses the round before it encrypts anything. With ``peer_keys``
empty it trusts the coordinator to pass the keys on unchanged (honest but curious), which
``docs/deployment.md`` states.
"""

from __future__ import annotations

import base64
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

SigningKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


def load_signing_key(path: Path) -> SigningKey:
    """The hospital's own private key (``<name>.key``, OpenSSH private format)."""
    key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    if not isinstance(key, (ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey)):
        raise ValueError(f"{path}: must be an elliptic-curve or Ed25519 key")
    return key


def sign(key: SigningKey, data: bytes) -> str:
    """A signature of ``data`` (base64). Deterministic (Ed25519, and ECDSA with RFC 6979
    nonces): it depends on the key and the data only, so a signature never varies with
    anything else a hospital holds, and no weak random nonce can leak the key."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return base64.b64encode(key.sign(data)).decode()
    return base64.b64encode(key.sign(data, ec.ECDSA(hashes.SHA384(), deterministic_signing=True))).decode()
