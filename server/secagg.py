"""The coordinator's side of secure aggregation (``common.secagg`` describes the protocol):
rebuild the secrets the hospitals' shares allow, remove every mask, keep only the sum.

:func:`unmasked_sum` is the whole computation and needs no Flower: from the masked
vectors of the hospitals that sent one (``survivors``), the shares the hospitals revealed
and everyone's public keys, it rebuilds each survivor's mask seed ``b`` and each absent
hospital's mask key (``t`` shares each), subtracts the survivors' own masks and the pair
masks the survivors shared with absent hospitals, and returns the sum in Z_{2^32}. The
individual masked vectors are dropped as soon as they are added up; the coordinator never
holds an unmasked individual vector.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

from common.messages import HOSPITAL_NAME_RULE, is_hospital_name
from common.secagg import keys_to_sign, least_threshold, mask, pair_seed, pair_sign, to_ring, unb64
from common.signatures import PublicKey, public_key_of, verifies


class UnmaskFailed(RuntimeError):
    """Too few shares to remove the masks: the round's sum cannot be known."""


@dataclass(frozen=True)
class Revealed:
    """One hospital's unmask answer: ``kind`` b (a survivor's seed) or sk (an absent
    hospital's mask key), whose secret, and the share."""

    kind: str
    owner: int
    share: bytes


def unmasked_sum(masked_sum: np.ndarray, survivors: list[int], shared: list[int], revealed: list[Revealed],
                 public_keys: dict[int, tuple[bytes, bytes]], threshold: int, server_round: int) -> np.ndarray:
    """The sum of the survivors' vectors in Z_{2^32}, from the sum of their masked vectors.

    ``shared``: the hospitals that sent shares (U2); ``survivors`` (U3) those of them whose
    masked vectors arrived. Raises :class:`UnmaskFailed` when any secret has fewer than
    ``threshold`` shares."""
    size = masked_sum.size
    absent = sorted(set(shared) - set(survivors))
    by_secret: dict[tuple[str, int], list[bytes]] = {}
    for r in revealed:
        by_secret.setdefault((r.kind, r.owner), []).append(r.share)
    total = to_ring(masked_sum)
    for u in survivors:
        shares = by_secret.get(("b", u), [])
        if len(shares) < threshold:
            raise UnmaskFailed(f"{len(shares)} shares of node {u}'s mask seed, {threshold} needed")
        total = total - mask(combine_shares(shares[:threshold]), size, server_round, b"self")
    for v in absent:
        shares = by_secret.get(("sk", v), [])
        if len(shares) < threshold:
            raise UnmaskFailed(f"{len(shares)} shares of absent node {v}'s mask key, {threshold} needed")
        sk2 = bytes_to_private_key(combine_shares(shares[:threshold]))
        for u in survivors:
            seed = pair_seed(generate_shared_key(sk2, bytes_to_public_key(public_keys[u][1])))
            # u added pair_sign(u, v) x mask(s_uv); take it away
            total = total - pair_sign(u, v) * mask(seed, size, server_round, b"pair")
    return to_ring(total)


def parse_revealed(lines: str) -> list[Revealed]:
    """A hospital's unmask reply, "kind:node:share" per line."""
    out = []
    for line in lines.splitlines():
        kind, owner, share = line.split(":", 2)
        if kind not in ("b", "sk"):
            raise ValueError(f"unknown share kind {kind!r}")
        out.append(Revealed(kind, int(owner), unb64(share)))
    return out


def parse_round_keys(text: str) -> tuple[str, ...]:
    """A hospital's setup answer: ``pk1:pk2``, or ``pk1:pk2:name:signature`` from a hospital
    that signs its keys for the others to check (``client.peer_keys``). The coordinator
    passes it on whole to every hospital, so it checks here that every hospital can parse it
    (base64 keys and signature, a name of letters, digits, '-' and '_'): one malformed answer
    would otherwise make every other hospital refuse the round. ValueError if not."""
    own = tuple(text.split(":"))
    if len(own) not in (2, 4):
        raise ValueError("round keys must be pk1:pk2 or pk1:pk2:name:signature")
    unb64(own[0]), unb64(own[1])
    if len(own) == 4:
        name, signature = own[2], own[3]
        if not is_hospital_name(name):
            raise ValueError(f"the hospital name: {HOSPITAL_NAME_RULE}")
        unb64(signature)
    return own


def load_hospital_keys(folder: str | Path) -> dict[str, PublicKey]:
    """The public keys of the hospitals the coordinator admitted (``fedgru deploy init``'s
    ``hospitals/`` folder, one ``<name>.pub`` each): hospital name -> key. ValueError
    naming the folder or the file for anything else, before the run starts."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ValueError(f"hospital-keys: {root} is not a folder (give the hospitals/ folder `fedgru deploy init` "
                         "wrote, with each hospital's <name>.pub)")
    keys, owners = {}, {}
    for path in sorted(root.glob("*.pub")):
        if not is_hospital_name(path.stem):
            raise ValueError(f"hospital-keys: {path.name}: the hospital name: {HOSPITAL_NAME_RULE}")
        try:
            keys[path.stem] = public_key_of(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ValueError(f"hospital-keys: {path}: {exc}") from None
        # one key under two names would let one hospital sign as two participants of a sum
        raw = keys[path.stem].public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH)
        if raw in owners:
            raise ValueError(f"hospital-keys: {path.name} holds the same key as {owners[raw]}.pub: one hospital, one key")
        owners[raw] = path.stem
    if not keys:
        raise ValueError(f"hospital-keys: {root} holds no <name>.pub file")
    return keys


def signature_problem(hospital_keys: dict[str, PublicKey], run_id: str, server_round: int, session: str,
                      node: int, own: tuple[str, ...], name: str, taken: set[str]) -> str | None:
    """Why the coordinator leaves ``node``'s round keys out of a round, or None: they must
    carry the signature, for this run, round, session and node, of the admitted hospital the node
    says it is (``name``), not yet taken by another node of the round (``taken``).

    The hospitals that list their peers (policy ``peer_keys``) check the same and refuse
    the whole round if any participant fails it; checked here first, one hospital's
    missing or stale signature leaves only that hospital out, and the round goes on from
    the others. A coordinator that skips the check only loses rounds: the hospitals'
    own check is what protects them."""
    if len(own) != 4:
        return "its round keys are not signed, and this coordinator admits only signed keys (run-config hospital-keys)"
    signed_as, signature = own[2], own[3]
    if signed_as != name:
        return f"its round keys are signed as '{signed_as}', but the node said it is '{name}'"
    key = hospital_keys.get(name)
    if key is None:
        return f"'{name}' has no public key among the admitted hospitals' (run-config hospital-keys)"
    if not verifies(key, keys_to_sign(run_id, server_round, session, node, own[0], own[1]), signature):
        return f"its round keys do not carry a valid signature of '{name}' for this run, round and session"
    if name in taken:
        return f"'{name}' already takes part in this round under another node"
    return None


def key_lines(public_keys: dict[int, tuple[str, ...]]) -> str:
    """The share-keys stage's field: "node:" and each hospital's own setup answer, a line each."""
    return "\n".join(":".join([str(node), *own]) for node, own in sorted(public_keys.items()))


def default_threshold(cfg, participants: int, policies: Iterable[tuple[int, int]] = ()) -> int:
    """Shares that rebuild a secret: ``privacy.secure_threshold``, or a majority of the
    participants and at least the run's ``privacy.min_honest`` (a hospital refuses a
    threshold below its own: fewer hospitals could unmask a sum without it), at most all.

    ``policies``: each participant's ``(min_honest, max_colluding)`` from its preflight
    answer. The threshold rises to the least each of them accepts (``least_threshold``),
    so a federation whose hospitals allow colluders needs no operator to find it; a
    hospital that no threshold of this many participants satisfies refuses the round
    itself, and does not take the others' tolerance of dropouts with it (a hospital whose
    policy the operator's ``privacy.secure_min_dropouts`` rules out is left out of the
    session before this: ``SecureRounds.session_nodes``)."""
    if cfg.privacy.secure_threshold:
        return cfg.privacy.secure_threshold
    threshold = max(participants // 2 + 1, cfg.privacy.min_honest)
    for policy in policies:
        if policy_least(participants, policy) <= participants:
            threshold = max(threshold, policy_least(participants, policy))
    return min(participants, threshold)


def policy_least(participants: int, policy: tuple[int, int]) -> int:
    """The least threshold a hospital with ``(min_honest, max_colluding)`` accepts."""
    min_honest, max_colluding = policy
    return max(least_threshold(participants, max_colluding), min_honest)

