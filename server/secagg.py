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

from dataclasses import dataclass

import numpy as np
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

from common.messages import HOSPITAL_NAME_RULE, is_hospital_name
from common.secagg import mask, pair_seed, pair_sign, to_ring, unb64


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


def key_lines(public_keys: dict[int, tuple[str, ...]]) -> str:
    """The share-keys stage's field: "node:" and each hospital's own setup answer, a line each."""
    return "\n".join(":".join([str(node), *own]) for node, own in sorted(public_keys.items()))


def default_threshold(cfg, participants: int) -> int:
    """Shares that rebuild a secret: ``privacy.secure_threshold``, or a majority of the
    participants and at least the run's ``privacy.min_honest`` (a hospital refuses a
    threshold below its own: fewer hospitals could unmask a sum without it), at most all."""
    if cfg.privacy.secure_threshold:
        return cfg.privacy.secure_threshold
    return min(participants, max(participants // 2 + 1, cfg.privacy.min_honest))
