"""A hospital's side of secure aggregation (``common.secagg`` describes the protocol).

:class:`Participant` holds one round's secrets (its two key pairs, its mask seed ``b``
and the shares others sent it) between the four exchanges; it is saved in the node's
own state (``to_bytes``), which never leaves the hospital. Each stage checks the
coordinator's message before answering and refuses (:class:`SecAggRefusal`) what the
protocol does not allow, whatever the coordinator says:

- too few participants or hospitals in the sum for the policy's ``min_honest``;
- a threshold that two disjoint groups could each reach (``2 t <= n``; with the policy's
  ``max_colluding`` hospitals on the coordinator's side, ``2 t <= n + max_colluding``), or below
  ``min_honest`` (t hospitals can unmask a sum without this one, so t is the fewest
  hospitals a sum can hold);
- its own public keys changed, keys repeated, or participants that were not announced;
- with ``peer_keys`` in its policy (``client.peer_keys``): another participant's round keys
  without a valid signature of a hospital the policy lists, or one hospital under two nodes;
- shares from a hospital that was asked for other round settings than this one (the
  participants, the threshold and the whole share-keys message: experiment, splits, scale,
  keys, noise variance): each hospital's encrypted shares carry a digest of what it was
  asked, so a coordinator cannot ask one hospital for less noise than the rest;
- shares passed on from only some of the hospitals that got the round's keys (the
  coordinator could then call exactly those dropped to the others and unmask this one);
- an unmask that names a hospital as both present and absent, arrives twice, or leaves
  fewer than ``max(t, min_honest)`` hospitals in the sum (it would leave this hospital's
  vector with too little of the others' noise).

For every other hospital it reveals either the share of its mask seed (it sent a vector)
or of its mask key (it did not), never both: with both, the coordinator could remove that
hospital's every mask. None of these checks reads patient data, so a refusal reads the
same whatever the data (``tests/test_secagg.py``).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field

import numpy as np
from flwr.common.secure_aggregation.crypto.shamir import create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, encrypt, generate_shared_key
from flwr.common.secure_aggregation.secaggplus_utils import share_keys_plaintext_concat, share_keys_plaintext_separate
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)

from common.secagg import (
    TRAINING_SESSION,
    Stage,
    b64,
    keys_to_sign,
    least_threshold,
    mask,
    pair_seed,
    pair_sign,
    to_ring,
    unb64,
)
from common.signatures import public_key_of, verifies

from .peer_keys import SigningKey, sign

DIGEST_BYTES = 32  # the round settings' SHA-256 digest that leads every encrypted share


def fresh_secret() -> bytes:
    """A new 32-byte secret from the operating system's entropy (tests make it repeatable)."""
    return os.urandom(32)


class SecAggRefusal(Exception):
    """The coordinator asked for something the protocol (or the policy) does not allow."""


@dataclass
class Participant:
    """One hospital's state in one round of secure aggregation."""

    node_id: int
    server_round: int
    participants: list[int]
    threshold: int
    min_honest: int
    stage: str = Stage.SETUP.value  # the last stage answered
    sk1: str = ""  # encryption key pair (base64 of PEM bytes)
    sk2: str = ""  # mask agreement key pair
    pk1: str = ""
    pk2: str = ""
    public_keys: dict[str, list[str]] = field(default_factory=dict)  # node -> [pk1, pk2]
    own_b_share: str = ""
    own_sk_share: str = ""
    b: str = ""  # the private mask seed
    received: dict[str, list[str]] = field(default_factory=dict)  # src -> [b share, sk share]
    senders: list[int] = field(default_factory=list)  # U2: hospitals whose shares reached this one (and itself)
    vector_sent: bool = False
    # Signed round keys (client.peer_keys): the run they are bound to, this hospital's name
    # and signature, and the policy's peers (name -> OpenSSH public key; {}: keys unsigned
    # and unchecked, the coordinator trusted to pass them on unchanged)
    run_id: str = ""
    session: str = TRAINING_SESSION  # what the keys are for within the round (common.secagg.keys_to_sign)
    name: str = ""
    signature: str = ""
    peer_keys: dict[str, str] = field(default_factory=dict)
    peers: dict[str, str] = field(default_factory=dict)  # node -> the listed hospital its keys are signed by
    agreed: str = ""  # hex digest of the round's settings as the coordinator put them to this hospital

    # -- stage 1 -------------------------------------------------------------------
    @classmethod
    def setup(cls, node_id: int, server_round: int, participants: list[int], threshold: int, min_honest: int,
              run_id: str = "", name: str = "", signing_key: SigningKey | None = None,
              peer_keys: dict[str, str] | None = None, session: str = TRAINING_SESSION,
              max_colluding: int = 0) -> Participant:
        people = sorted(set(participants))
        n = len(people)
        if len(people) != len(participants):
            raise SecAggRefusal("the participant list names a hospital twice")
        if node_id not in people:
            raise SecAggRefusal("this hospital is not among the round's participants")
        if n < min_honest:
            raise SecAggRefusal(f"{n} participants; this hospital's policy counts on at least {min_honest} "
                                "hospitals' noise (policy min_honest)")
        if not (threshold <= n and threshold >= 2):
            raise SecAggRefusal(f"threshold {threshold} of {n}: it must be at least 2 and at most all participants")
        least = least_threshold(n, max_colluding)
        if least > n:
            raise SecAggRefusal(f"{n} participants: with the {max_colluding} hospitals this hospital allows to side "
                                "with the coordinator (policy max_colluding), no threshold keeps two groups from "
                                f"unmasking one hospital; it takes part with more than {max_colluding} participants")
        if threshold < least:
            # A coordinator that tells one group of hospitals that a hospital sent its vector
            # and another group that it dropped out gets its seed's shares from the first and
            # its mask key's from the second; hospitals in league with it give both. Two
            # groups of honest hospitals, each at least t minus the colluders, fit in n when
            # 2 t <= n + colluders: that hospital's vector would be read with its own noise only.
            raise SecAggRefusal(
                f"threshold {threshold} of {n}: two disjoint groups of hospitals could each reach it"
                + (f" with the help of the {max_colluding} this hospital allows to side with the coordinator "
                   "(policy max_colluding)" if max_colluding else "")
                + f", and unmask one hospital's vector; it must be at least {least} (privacy.secure_threshold)")
        if threshold < min_honest:
            # t hospitals' shares unmask a sum without this one's help, and each of them is in
            # it: below min_honest, a sum of fewer hospitals than it counts on could be read
            raise SecAggRefusal(f"threshold {threshold}: this hospital counts on {min_honest} hospitals' noise "
                                "(policy min_honest), so every unmasking must need at least that many (set "
                                f"privacy.secure_threshold >= {min_honest})")
        me = cls(node_id, server_round, people, threshold, min_honest)
        sk1, pk1 = generate_key_pairs()
        sk2, pk2 = generate_key_pairs()
        me.sk1, me.pk1 = b64(private_key_to_bytes(sk1)), b64(public_key_to_bytes(pk1))
        me.sk2, me.pk2 = b64(private_key_to_bytes(sk2)), b64(public_key_to_bytes(pk2))
        me.run_id, me.session, me.name, me.peer_keys = run_id, session, name, dict(peer_keys or {})
        if signing_key is not None:
            me.signature = sign(signing_key, keys_to_sign(run_id, server_round, session, node_id, me.pk1, me.pk2))
        return me

    def my_keys(self) -> str:
        """The setup reply's keys: ``pk1:pk2``, with ``:name:signature`` when signed."""
        return f"{self.pk1}:{self.pk2}:{self.name}:{self.signature}" if self.signature else f"{self.pk1}:{self.pk2}"

    # -- stage 2 -------------------------------------------------------------------
    def share_keys(self, public_keys: dict[int, tuple[str, ...]], settings: str = "") -> dict[int, str]:
        """Shares of ``b`` and of the mask key, each encrypted for its hospital.
        ``public_keys``: node -> (pk1, pk2) or (pk1, pk2, name, signature); ``settings``:
        what the coordinator asked of this hospital (``common.secagg.agreed_settings``),
        sent to every other hospital with the shares for it to compare."""
        self._expect(Stage.SETUP, Stage.SHARE_KEYS)
        if not set(public_keys) <= set(self.participants) or len(public_keys) < self.threshold:
            raise SecAggRefusal("the public keys name hospitals that are not participants, or fewer than the threshold")
        if any(len(v) not in (2, 4) for v in public_keys.values()):
            raise SecAggRefusal("each hospital's keys must be pk1:pk2 or pk1:pk2:name:signature")
        if tuple(public_keys.get(self.node_id, ()))[:2] != (self.pk1, self.pk2):
            raise SecAggRefusal("the coordinator changed this hospital's own public keys")
        flat = [k for keys in public_keys.values() for k in keys[:2]]
        if len(set(flat)) != len(flat):
            raise SecAggRefusal("two public keys are the same")
        if self.peer_keys:
            self.peers = self._authenticated(public_keys)
        self.public_keys = {str(k): list(v[:2]) for k, v in public_keys.items()}
        self.agreed = self._digest(settings)
        b = fresh_secret()
        self.b = b64(b)
        holders = sorted(public_keys)
        b_shares = create_shares(b, self.threshold, len(holders))
        sk_shares = create_shares(unb64(self.sk2), self.threshold, len(holders))
        out: dict[int, str] = {}
        for holder, b_share, sk_share in zip(holders, b_shares, sk_shares):
            if holder == self.node_id:
                self.own_b_share, self.own_sk_share = b64(b_share), b64(sk_share)
                continue
            key = self._channel_key(holder)
            plain = bytes.fromhex(self.agreed) + share_keys_plaintext_concat(self.node_id, holder, b_share, sk_share)
            out[holder] = b64(encrypt(key, plain))
        return out

    # -- stage 3 -------------------------------------------------------------------
    def receive(self, ciphertexts: dict[int, str]) -> None:
        """Decrypt and keep the shares others sent this hospital (before its vector is made)."""
        self._expect(Stage.SHARE_KEYS, Stage.COLLECT)
        others = set(int(k) for k in self.public_keys) - {self.node_id}
        if not set(ciphertexts) <= others or self.node_id in ciphertexts:
            raise SecAggRefusal("shares arrived from hospitals that sent no public keys")
        if set(ciphertexts) != others:
            # This hospital's pair masks are with those whose shares reached it. A coordinator
            # that passed on only some could later call exactly those "dropped" to the others
            # and collect their mask keys with this hospital's seed: its vector, unmasked. Every
            # hospital that got the round's keys (the same set for all: the shares' digest
            # covers it) must have sent shares; if one did not, the setup runs again without it.
            raise SecAggRefusal(f"shares from {len(ciphertexts)} of the {len(others)} other hospitals that got this "
                                "round's keys; this hospital masks only with all of them")
        for src, text in ciphertexts.items():
            try:
                plain = decrypt(self._channel_key(src), unb64(text))
            except Exception:  # noqa: BLE001 - any failure to decrypt is the same refusal
                raise SecAggRefusal(f"the shares said to be from node {src} do not decrypt with its key") from None
            digest, plain = plain[:DIGEST_BYTES], plain[DIGEST_BYTES:]
            got_src, got_dst, b_share, sk_share = share_keys_plaintext_separate(plain)
            if (got_src, got_dst) != (src, self.node_id):
                raise SecAggRefusal(f"the shares said to be from node {src} name another sender or recipient")
            if digest.hex() != self.agreed:
                raise SecAggRefusal(f"node {src} was asked for other round settings (participants, threshold, or the "
                                    "share-keys message: experiment, splits, scale, keys, noise) than this hospital: "
                                    "the coordinator must ask every hospital alike")
            self.received[str(src)] = [b64(b_share), b64(sk_share)]
        self.senders = sorted([*ciphertexts, self.node_id])

    def masked(self, vector: np.ndarray) -> np.ndarray:
        """``vector`` (integers) plus this hospital's masks, in Z_{2^32}."""
        if self.stage != Stage.COLLECT.value or not self.senders or self.vector_sent:
            raise SecAggRefusal("a masked vector is made once per round, after the shares arrived")
        out = to_ring(vector) + mask(unb64(self.b), vector.size, self.server_round, b"self")
        sk2 = bytes_to_private_key(unb64(self.sk2))
        for other in self.senders:
            if other == self.node_id:
                continue
            seed = pair_seed(generate_shared_key(sk2, bytes_to_public_key(unb64(self.public_keys[str(other)][1]))))
            out = out + pair_sign(self.node_id, other) * mask(seed, vector.size, self.server_round, b"pair")
        self.vector_sent = True
        return to_ring(out)

    # -- stage 4 -------------------------------------------------------------------
    def unmask(self, survivors: list[int]) -> list[tuple[str, int, str]]:
        """For each hospital that sent a vector, its ``b`` share; for each that did not,
        its mask-key share; never both."""
        self._expect(Stage.COLLECT, Stage.UNMASK)
        present = set(survivors)
        if len(present) != len(survivors) or not present <= set(self.senders) or self.node_id not in present:
            raise SecAggRefusal("the survivors must be distinct hospitals that shared keys, this one among them")
        if len(present) < max(self.threshold, self.min_honest):
            raise SecAggRefusal(f"{len(present)} hospitals in the sum; this hospital counts on at least "
                                f"{max(self.threshold, self.min_honest)} (policy min_honest and the threshold)")
        out = []
        for node in self.senders:
            b_share, sk_share = ((self.own_b_share, self.own_sk_share) if node == self.node_id
                                 else self.received[str(node)])
            out.append(("b", node, b_share) if node in present else ("sk", node, sk_share))
        return out

    # -- helpers -------------------------------------------------------------------
    def _digest(self, settings: str) -> str:
        whole = json.dumps({"run": self.run_id, "round": self.server_round, "participants": self.participants,
                            "threshold": self.threshold, "settings": settings}, sort_keys=True)
        return hashlib.sha256(whole.encode()).hexdigest()

    def _authenticated(self, public_keys: dict[int, tuple[str, ...]]) -> dict[str, str]:
        """Node -> the listed hospital whose signature each other participant's keys carry;
        a refusal for any that carries none, or a hospital named twice (or as this one)."""
        peers: dict[str, str] = {}
        for node, keys in sorted(public_keys.items()):
            if node == self.node_id:
                continue
            name, signature = keys[2:] if len(keys) == 4 else ("", "")
            public = self.peer_keys.get(name)
            if public is None or not verifies(public_key_of(public), keys_to_sign(
                    self.run_id, self.server_round, self.session, node, keys[0], keys[1]), signature):
                raise SecAggRefusal(
                    f"node {node}'s keys carry no valid signature of a hospital this hospital's policy lists "
                    "(policy peer_keys): a coordinator could otherwise put keys of its own in a hospital's place")
            if name == self.name or name in peers.values():
                raise SecAggRefusal(f"hospital '{name}' takes part twice (or as this hospital) in one round")
            peers[str(node)] = name
        return peers

    def _expect(self, previous: Stage, now: Stage) -> None:
        if self.stage != previous.value:
            raise SecAggRefusal(f"'{now.value}' came after '{self.stage}'; the protocol's order is setup, "
                                "share-keys, collect, unmask, once each per round")
        self.stage = now.value

    def _channel_key(self, other: int) -> bytes:
        pk1 = bytes_to_public_key(unb64(self.public_keys[str(other)][0]))
        return generate_shared_key(bytes_to_private_key(unb64(self.sk1)), pk1)

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Participant:
        return cls(**json.loads(data.decode()))
