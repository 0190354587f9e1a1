"""Secure aggregation (SecAgg+): what the coordinator and the hospitals share.

The protocol is Bell, Bonawitz, Gascon, Lepoint & Raykova, "Secure Single-Server
Aggregation with (Poly)Logarithmic Overhead", CCS 2020 (SecAgg+), on top of Bonawitz et al.,
CCS 2017. In one round, over four exchanges (:class:`Stage`):

1. ``setup``: the coordinator names the round's participants and the reconstruction
   threshold ``t``; each hospital makes two fresh key pairs (one to encrypt shares, one to
   agree masks) and sends the public halves.
2. ``share-keys``: everyone's public keys go to everyone; each hospital draws a private
   mask seed ``b``, splits ``b`` and its mask secret key into ``t``-of-``n`` Shamir shares,
   and sends each other hospital its two shares, encrypted for it.
3. ``collect``: each hospital gets the shares addressed to it (from every hospital that
   got the keys, or it refuses: its pair masks must be with all of them), makes its
   vector (client side: reads data, clips, adds its share of the noise), masks it with
   ``PRG(b)`` and, for
   every other hospital ``v``, ``+-PRG(s_uv)`` (``s_uv`` agreed with ``v``: the pair's masks
   cancel in the sum), and sends the masked vector. This is the only message that
   depends on patients, and it is a DP release.
4. ``unmask``: the coordinator says who sent a masked vector; each hospital sends, for
   those, its share of their ``b``, and for those who did not, its share of their mask
   key, never both for one hospital. With ``t`` shares of each the coordinator removes
   every mask and is left with the sum, and nothing else.

The next round's ``setup`` travels with this round's ``unmask`` (fresh keys either way),
so a round after the first costs three exchanges; after a change in who takes part the
coordinator runs the whole setup again.

Against a coordinator that breaks the protocol: a deployed hospital signs its round keys
(``keys_to_sign``) with its long-term key, and with ``peer_keys`` in its policy accepts
only keys signed by the hospitals it lists (``client.peer_keys``); every encrypted share
starts with a digest of the settings its sender was asked for, so a hospital asked for
less noise than the others is seen by them (``client.secagg``).

The cryptographic primitives are Flower's (``flwr.common.secure_aggregation``: ECDH key
agreement with HKDF, Fernet encryption, Shamir sharing) and the ``cryptography`` package's
ChaCha20, which expands a 32-byte seed into masks. Flower's own mask generator
(``pseudo_rand_gen``) folds its seed to 32 bits and seeds numpy's Mersenne Twister: a
coordinator could try every seed, so fedgru does not use it.

This module holds what both sides compute alike: record keys, the stages, the modular
arithmetic, the mask generator and the encoding of a float vector as integers. The
hospital's side is ``client.secagg``; the coordinator's is ``server.secagg``.
"""

from __future__ import annotations

import base64
import hashlib
import json
from enum import Enum

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

MODULUS_BITS = 32
MODULUS = 2 ** MODULUS_BITS  # every masked vector and every sum lives in Z_{2^32}


class Stage(str, Enum):
    SETUP = "setup"
    SHARE_KEYS = "share-keys"
    COLLECT = "collect"
    UNMASK = "unmask"


# ConfigRecord fields, coordinator -> hospital ("secagg-" so none collides with common.messages)
STAGE = "secagg-stage"
PARTICIPANTS = "secagg-participants"  # node ids of the round's participants (setup), as a list of ints
THRESHOLD = "secagg-threshold"  # t: shares needed to rebuild a secret
NOISE_VARIANCE = "secagg-noise-variance"  # mu_h: each hospital's Skellam variance per coordinate
SCALE = "secagg-scale"  # integers per unit of clipped gradient
PUBLIC_KEYS = "secagg-public-keys"  # share-keys: "node:" + each participant's MY_KEYS, a line each
CIPHERTEXTS = "secagg-ciphertexts"  # collect: "src:ciphertext" lines addressed to this hospital
SURVIVORS = "secagg-survivors"  # unmask: node ids whose masked vectors arrived
NEXT_ROUND = "secagg-next-round"  # unmask: also the next round's setup (with PARTICIPANTS, THRESHOLD): one exchange fewer
# Reply fields, hospital -> coordinator
MY_KEYS = "secagg-my-keys"  # setup: "pk1:pk2" (base64), or "pk1:pk2:name:signature" from a hospital that signs them
SHARES_OUT = "secagg-shares"  # share-keys: "dst:ciphertext" lines
MASKED = "secagg-masked"  # collect: ArrayRecord key of the masked vector (uint32 values in int64)
REVEALED = "secagg-revealed"  # unmask: "kind:node:share" lines (kind b or sk)
REQUIRED_VARIANCE = "secagg-required-variance"  # setup: the least mu_h this hospital's policy and ledger accept


# What a hospital signs in setup: its round keys, bound to the run, the round, the session
# and its node, with a label of their own so a signature made for anything else never
# verifies here. The session matters because one round can hold several: the last
# training round, the final validation and the test share a round number, and without it
# a coordinator could replay a hospital's signed keys from one into another.
KEYS_SIGNATURE_LABEL = b"fedgru secure-aggregation round keys v2"
TRAINING_SESSION = "train"


def least_threshold(participants: int, max_colluding: int = 0) -> int:
    """The smallest reconstruction threshold ``t`` with ``2 t > n + max_colluding``: no two
    disjoint groups of honest hospitals, each helped by the colluders, reach it. A hospital
    refuses any lower threshold (``client.secagg``); the coordinator raises its own to the
    least its hospitals' policies accept (``server.secagg.default_threshold``)."""
    return (participants + max_colluding) // 2 + 1


def evaluation_session(splits: list[str], final: bool) -> str:
    """The session an evaluation's round keys are signed for: its splits, and whether it
    evaluates the final model or is a validation during training."""
    return "evaluate " + " ".join(splits) + (" final" if final else " progress")


def keys_to_sign(run_id: str, server_round: int, session: str, node_id: int, pk1: str, pk2: str) -> bytes:
    """The bytes a hospital signs for its round keys (``client.secagg``); ``session``:
    :data:`TRAINING_SESSION` or :func:`evaluation_session`."""
    fields = [KEYS_SIGNATURE_LABEL, run_id.encode(), str(server_round).encode(), session.encode(),
              str(node_id).encode(), pk1.encode(), pk2.encode()]
    return b"\n".join(len(f).to_bytes(4, "big") + f for f in fields)


def agreed_settings(config) -> str:
    """The share-keys message's whole config (the experiment, the run, the round, the
    splits asked for, the scale, everyone's keys, the noise variance), as canonical text.
    The coordinator sends every hospital of a round the same share-keys config, so every
    hospital's text is the same unless the coordinator asked one of them for something
    else, such as less noise (``client.secagg`` compares them through the shares)."""
    def plain(value):
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, bytes):
            return value.hex()
        return repr(value) if isinstance(value, float) else value

    return json.dumps({str(k): plain(v) for k, v in config.items()}, sort_keys=True)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text.encode(), validate=True)


def mask(seed: bytes, size: int, server_round: int, label: bytes) -> np.ndarray:
    """``size`` values uniform in Z_{2^32} (int64) from a 32-byte ``seed``: ChaCha20's
    keystream, its nonce bound to the round and the mask's kind so no two masks repeat."""
    if len(seed) != 32:
        raise ValueError("a mask seed is 32 bytes")
    nonce = hashlib.sha256(label + server_round.to_bytes(8, "little")).digest()[:16]
    stream = Cipher(algorithms.ChaCha20(seed, nonce), mode=None).encryptor().update(bytes(4 * size))
    return np.frombuffer(stream, dtype="<u4").astype(np.int64)


def pair_seed(shared_key: bytes) -> bytes:
    """A pair's mask seed from the key both agree by ECDH (Flower returns it base64-encoded)."""
    return base64.urlsafe_b64decode(shared_key)


def pair_sign(me: int, other: int) -> int:
    """The pair's masks cancel: the smaller node id adds, the larger subtracts."""
    return 1 if me < other else -1


def to_ring(values: np.ndarray) -> np.ndarray:
    return np.mod(values.astype(np.int64), MODULUS)


def from_ring(values: np.ndarray) -> np.ndarray:
    """Centred: [0, 2^32) -> [-2^31, 2^31)."""
    v = np.mod(values.astype(np.int64), MODULUS)
    return np.where(v >= MODULUS // 2, v - MODULUS, v)


def decode(ring_sum: np.ndarray, scale: float) -> np.ndarray:
    """The unmasked sum back in gradient units: centred, divided by ``scale`` (integers per
    unit of clipped gradient)."""
    return from_ring(ring_sum).astype(np.float64) / scale
