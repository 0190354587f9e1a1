"""Secure aggregation's protocol (client.secagg, server.secagg) without Flower: the sum
comes out exact with and without hospitals dropping out, the coordinator learns nothing
else from what the protocol gives it, and a hospital refuses every message the protocol
does not allow."""

from __future__ import annotations

import re

import numpy as np
import pytest
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

from client.secagg import Participant, SecAggRefusal
from common.secagg import MODULUS, from_ring, least_threshold, mask, pair_seed, pair_sign, unb64
from server.secagg import Revealed, UnmaskFailed, unmasked_sum

ROUND = 7


def run_protocol(vectors: dict[int, np.ndarray], threshold: int, min_honest: int = 2,
                 drop_before_collect: tuple[int, ...] = (), drop_before_unmask: tuple[int, ...] = ()):
    """One honest round; returns (sum in the ring, what the coordinator holds)."""
    nodes = sorted(vectors)
    people = {n: Participant.setup(n, ROUND, nodes, threshold, min_honest) for n in nodes}
    keys = {n: (p.pk1, p.pk2) for n, p in people.items()}
    outbox = {n: p.share_keys(keys) for n, p in people.items()}
    # the state travels through bytes between stages, as it does through the node's state
    people = {n: Participant.from_bytes(p.to_bytes()) for n, p in people.items()}
    shared = [n for n in nodes if n not in drop_before_collect]
    masked = {}
    for n in shared:
        inbox = {src: box[n] for src, box in outbox.items() if src in shared and n in box}
        people[n].receive(inbox)
        if n not in drop_before_unmask:
            masked[n] = people[n].masked(vectors[n])
    survivors = sorted(masked)
    revealed = []
    for n in survivors:
        revealed += [Revealed(kind, owner, unb64(share)) for kind, owner, share in people[n].unmask(survivors)]
    masked_sum = sum(masked.values())
    total = unmasked_sum(masked_sum, survivors, shared, revealed, {n: tuple(unb64(k) for k in keys[n]) for n in nodes},
                         threshold, ROUND)
    return total, masked, revealed, survivors


def vectors_of(nodes, size=50, seed=0):
    rng = np.random.default_rng(seed)
    return {n: rng.integers(-10_000, 10_000, size) for n in nodes}


def test_the_sum_comes_out_exact():
    vectors = vectors_of([11, 22, 33, 44])
    total, masked, _, _ = run_protocol(vectors, threshold=3)
    assert np.array_equal(from_ring(total), sum(vectors.values()))
    for n, m in masked.items():  # what each hospital sends looks nothing like its vector
        assert not np.any(from_ring(m) == vectors[n]) or np.mean(from_ring(m) == vectors[n]) < 0.05
        assert m.min() >= 0 and m.max() < MODULUS


def test_a_hospital_that_drops_out_before_sending_its_vector_leaves_the_others_sum():
    vectors = vectors_of([11, 22, 33, 44])
    total, _, revealed, survivors = run_protocol(vectors, threshold=3, drop_before_unmask=(33,))
    assert survivors == [11, 22, 44]
    assert np.array_equal(from_ring(total), vectors[11] + vectors[22] + vectors[44])
    # the absent hospital's mask key was rebuilt, never its seed; no survivor's mask key was revealed
    kinds = {(r.kind, r.owner) for r in revealed}
    assert ("sk", 33) in kinds and ("b", 33) not in kinds
    assert not any(k == "sk" and o != 33 for k, o in kinds)


def test_a_hospital_that_got_the_keys_but_never_shared_stops_the_round_and_a_new_setup_leaves_it_out():
    vectors = vectors_of([11, 22, 33, 44, 55])
    with pytest.raises(SecAggRefusal, match="shares from 3 of the 4 other hospitals"):
        run_protocol(vectors, threshold=3, drop_before_collect=(22,))
    without = {n: v for n, v in vectors.items() if n != 22}
    total, _, _, survivors = run_protocol(without, threshold=3, drop_before_unmask=(55,))
    assert survivors == [11, 33, 44]
    assert np.array_equal(from_ring(total), vectors[11] + vectors[33] + vectors[44])


def test_a_coordinator_that_passes_on_only_some_shares_cannot_isolate_a_vector():
    """The attack a review found (n = 5, t = 3, no hospital on the coordinator's side):
    pass hospital 1 only the shares of 2 and 3, so its pair masks are with them alone; then
    tell 4 and 5 that 2 and 3 dropped (their mask keys and 1's seed come back) and read 1's
    vector. Hospital 1 refuses to mask with fewer than every hospital that got the keys."""
    nodes = [1, 2, 3, 4, 5]
    people = {k: Participant.setup(k, ROUND, nodes, 3, 2) for k in nodes}
    keys = {k: (p.pk1, p.pk2) for k, p in people.items()}
    boxes = {k: p.share_keys(keys) for k, p in people.items()}
    with pytest.raises(SecAggRefusal, match="masks only with all of them"):
        people[1].receive({src: boxes[src][1] for src in (2, 3)})


def test_below_the_threshold_the_sum_cannot_be_unmasked():
    vectors = vectors_of([11, 22, 33])
    total, masked, revealed, survivors = run_protocol(vectors, threshold=2)
    with pytest.raises(UnmaskFailed):
        unmasked_sum(sum(masked.values()), survivors, survivors, revealed[:1], {}, 2, ROUND)


def test_one_hospitals_masked_vector_stays_hidden_from_everything_the_coordinator_holds():
    """With every share the protocol gives it, the coordinator can remove 11's own mask,
    but 11's pair masks with the others stay: 11's vector is not recoverable alone."""
    vectors = vectors_of([11, 22, 33], seed=3)
    _, masked, revealed, survivors = run_protocol(vectors, threshold=2)
    b11 = combine_shares([r.share for r in revealed if (r.kind, r.owner) == ("b", 11)][:2])
    without_own = from_ring(masked[11] - mask(b11, 50, ROUND, b"self"))
    assert np.mean(without_own == vectors[11]) < 0.05


def participants(n=4, threshold=3, min_honest=2):
    nodes = list(range(1, n + 1))
    people = {k: Participant.setup(k, ROUND, nodes, threshold, min_honest) for k in nodes}
    return people, {k: (p.pk1, p.pk2) for k, p in people.items()}


@pytest.mark.parametrize("nodes,threshold,min_honest,why", [
    ([1, 2, 3, 4], 2, 2, "two disjoint groups"),
    ([1, 2, 3, 4], 5, 2, "at most all"),
    ([1, 2, 3], 2, 4, "min_honest"),
    # 3 hospitals' shares could unmask a sum of 4 without this one, which counts on 5
    ([1, 2, 3, 4, 5], 3, 5, "secure_threshold >= 5"),
    ([2, 3, 4], 2, 2, "not among"),
    ([1, 1, 2, 3], 3, 2, "twice"),
])
def test_setup_refuses_what_the_protocol_does_not_allow(nodes, threshold, min_honest, why):
    with pytest.raises(SecAggRefusal, match=why):
        Participant.setup(1, ROUND, nodes, threshold, min_honest)


def test_a_hospital_refuses_changed_keys_and_a_stage_out_of_order():
    people, keys = participants()
    me = people[1]
    with pytest.raises(SecAggRefusal, match="own public keys"):
        Participant.from_bytes(me.to_bytes()).share_keys({**keys, 1: keys[2]})
    with pytest.raises(SecAggRefusal, match="order"):
        Participant.from_bytes(me.to_bytes()).receive({})
    with pytest.raises(SecAggRefusal, match="order"):
        Participant.from_bytes(me.to_bytes()).unmask([1, 2, 3])


def test_a_hospital_never_reveals_both_secrets_of_one_hospital_and_unmasks_once():
    people, keys = participants(n=4, threshold=3, min_honest=3)
    boxes = {k: p.share_keys(keys) for k, p in people.items()}
    for k, p in people.items():
        p.receive({src: box[k] for src, box in boxes.items() if src != k})
        p.masked(np.arange(5))
    me = people[1]
    with pytest.raises(SecAggRefusal, match="at least 3"):
        Participant.from_bytes(me.to_bytes()).unmask([1, 2])  # too few in the sum for min_honest
    with pytest.raises(SecAggRefusal, match="distinct"):
        Participant.from_bytes(me.to_bytes()).unmask([2, 3, 4])  # this hospital left out: its seed would be kept back
    with pytest.raises(SecAggRefusal, match="once per round"):
        me.masked(np.arange(5))
    answer = me.unmask([1, 2, 4])
    owners = [owner for _, owner, _ in answer]
    assert sorted(owners) == [1, 2, 3, 4] and len(set(owners)) == 4
    assert {(kind, owner) for kind, owner, _ in answer if kind == "sk"} == {("sk", 3)}
    with pytest.raises(SecAggRefusal, match="order"):
        me.unmask([1, 2, 3, 4])


def _split_unmask(threshold: int, max_colluding: int = 0):
    """A coordinator that breaks the protocol, with hospital 5 on its side, goes after
    hospital 1's vector: it tells 1 and 2 that everyone sent a vector (they reveal their
    shares of 1's mask seed) and 3 and 4 that hospital 1 dropped out (they reveal their
    shares of 1's mask key). Hospital 5 hands over its whole state. Returns what the
    coordinator rebuilds for hospital 1 (None when it lacks the shares) and 1's vector."""
    nodes = [1, 2, 3, 4, 5]
    people = {k: Participant.setup(k, ROUND, nodes, threshold, 2, max_colluding=max_colluding) for k in nodes}
    keys = {k: (p.pk1, p.pk2) for k, p in people.items()}
    boxes = {k: p.share_keys(keys) for k, p in people.items()}
    vectors = vectors_of(nodes)
    masked = {}
    for k, p in people.items():
        p.receive({src: box[k] for src, box in boxes.items() if src != k})
        masked[k] = p.masked(vectors[k])
    seed_shares = [unb64(share) for k in (1, 2) for kind, owner, share in people[k].unmask(nodes)
                   if (kind, owner) == ("b", 1)]
    key_shares = [unb64(share) for k in (3, 4) for kind, owner, share in people[k].unmask([2, 3, 4, 5])
                  if (kind, owner) == ("sk", 1)]
    colluder = people[5]
    seed_shares.append(unb64(colluder.received["1"][0]))
    key_shares.append(unb64(colluder.received["1"][1]))
    if min(len(seed_shares), len(key_shares)) < threshold:
        return None, vectors[1]
    size = vectors[1].size
    read = masked[1] - mask(combine_shares(seed_shares[:threshold]), size, ROUND, b"self")
    sk2 = bytes_to_private_key(combine_shares(key_shares[:threshold]))
    for other in nodes[1:]:
        seed = pair_seed(generate_shared_key(sk2, bytes_to_public_key(unb64(keys[other][1]))))
        read = read - pair_sign(1, other) * mask(seed, size, ROUND, b"pair")
    return from_ring(np.mod(read, MODULUS)), vectors[1]


def test_a_coordinator_with_one_hospital_on_its_side_reads_a_vector_at_a_bare_majority_threshold():
    """Why ``max_colluding`` exists: at t = 3 of 5 (more than half, the default rule), the
    split above gives the coordinator hospital 1's vector exactly, with only 1's own noise
    in it; each honest hospital answered one unmask, as the protocol lets it."""
    read, vector = _split_unmask(threshold=3)
    assert np.array_equal(read, vector)


def test_a_hospital_that_allows_one_colluder_refuses_that_threshold_and_at_the_least_it_accepts_the_split_fails():
    with pytest.raises(SecAggRefusal, match=r"max_colluding.*at least 4 \(privacy.secure_threshold\)"):
        Participant.setup(1, ROUND, [1, 2, 3, 4, 5], 3, 2, max_colluding=1)
    read, _ = _split_unmask(threshold=4, max_colluding=1)
    assert read is None  # 2 honest seed shares + the colluder's, 2 + 1 key shares: 3 each, 4 needed
    assert least_threshold(5, 1) == 4 and least_threshold(4, 0) == 3 and least_threshold(3, 2) == 3
    with pytest.raises(SecAggRefusal, match="no threshold"):  # 3 colluders of 3 participants: nothing holds
        Participant.setup(1, ROUND, [1, 2, 3], 3, 2, max_colluding=3)


def test_forged_shares_are_refused():
    people, keys = participants()
    boxes = {k: p.share_keys(keys) for k, p in people.items()}
    inbox = {src: box[1] for src, box in boxes.items() if src != 1}
    inbox[2] = inbox[3]  # the coordinator passes 3's shares off as 2's
    with pytest.raises(SecAggRefusal, match="node 2"):
        people[1].receive(inbox)


# ---------------------------------------------------------------------------------------
# Signed round keys (client.peer_keys): with peer_keys in its policy a hospital takes part
# only with the hospitals it lists, so a coordinator cannot stand in for one of them.
# ---------------------------------------------------------------------------------------

def _identity():
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    line = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    return key, line


IDENTITIES = {name: _identity() for name in ("north", "south", "east", "intruder")}
NAMES = {1: "north", 2: "south", 3: "east"}


def signed_participants(run="run-a", server_round=ROUND, names=NAMES, listed=("north", "south", "east")):
    nodes = sorted(names)
    peer_keys = {n: IDENTITIES[n][1] for n in listed}
    people = {k: Participant.setup(k, server_round, nodes, 2, 2, run_id=run, name=names[k],
                                   signing_key=IDENTITIES[names[k]][0], peer_keys=peer_keys) for k in nodes}
    return people, {k: tuple(p.my_keys().split(":")) for k, p in people.items()}


def test_signed_keys_of_listed_hospitals_give_the_exact_sum():
    people, keys = signed_participants()
    assert all(len(k) == 4 for k in keys.values())
    boxes = {k: p.share_keys(keys) for k, p in people.items()}
    vectors = vectors_of(sorted(people), size=20, seed=5)
    masked = {}
    for k, p in people.items():
        p.receive({src: box[k] for src, box in boxes.items() if src != k})
        masked[k] = p.masked(vectors[k])
    assert people[1].peers == {"2": "south", "3": "east"}
    revealed = [Revealed(kind, owner, unb64(s)) for k, p in people.items() for kind, owner, s in p.unmask(sorted(people))]
    public = {k: (unb64(v[0]), unb64(v[1])) for k, v in keys.items()}
    total = unmasked_sum(sum(masked.values()), sorted(people), sorted(people), revealed, public, 2, ROUND)
    assert np.array_equal(from_ring(total), sum(vectors.values()))


def _coordinator_keys(node: int, run="run-a", server_round=ROUND, signer=None, name="south", session="train"):
    """Fresh round keys the coordinator made itself, passed off as ``node``'s, signed by ``signer``."""
    from client.peer_keys import sign
    from common.secagg import keys_to_sign

    fake = Participant.setup(node, server_round, [1, 2, 3], 2, 2)
    if signer is None:
        return (fake.pk1, fake.pk2)
    return (fake.pk1, fake.pk2, name, sign(signer, keys_to_sign(run, server_round, session, node, fake.pk1, fake.pk2)))


def _replayed_from_session(node: int, session: str):
    """``node``'s genuine keys and signature, made by the hospital itself for another
    session of the same run and round (the final validation shares the last training
    round's number), which a coordinator kept and plays back."""
    elsewhere = Participant.setup(node, ROUND, [1, 2, 3], 2, 2, run_id="run-a", name=NAMES[node],
                                  signing_key=IDENTITIES[NAMES[node]][0], session=session)
    return tuple(elsewhere.my_keys().split(":"))


@pytest.mark.parametrize("case", ["unsigned", "signed by an unlisted key", "another hospital's signature",
                                  "signed for another round", "signed for another run",
                                  "signed for another session of the round", "one hospital twice",
                                  "this hospital's own name"])
def test_keys_a_coordinator_put_in_a_hospitals_place_are_refused(case):
    people, keys = signed_participants()
    me = people[1]
    forged = dict(keys)
    if case == "unsigned":
        forged[2] = _coordinator_keys(2)
    elif case == "signed by an unlisted key":
        forged[2] = _coordinator_keys(2, signer=IDENTITIES["intruder"][0], name="south")
    elif case == "another hospital's signature":
        forged[2] = keys[2][:2] + (keys[2][2], keys[3][3])  # south's keys with east's signature
    elif case == "signed for another round":
        forged[2] = _coordinator_keys(2, server_round=ROUND - 1, signer=IDENTITIES["south"][0])
    elif case == "signed for another run":
        forged[2] = _coordinator_keys(2, run="run-b", signer=IDENTITIES["south"][0])
    elif case == "signed for another session of the round":
        forged[2] = _replayed_from_session(2, "evaluate val final")
    elif case == "one hospital twice":
        # south's genuine keys for node 2, and south's own signature on keys it made for node 3:
        # a hospital with two nodes would count twice towards min_honest
        forged[3] = _coordinator_keys(3, signer=IDENTITIES["south"][0], name="south")
    else:
        forged[2] = _coordinator_keys(2, signer=IDENTITIES["north"][0], name="north")
    why = "twice" if case in ("one hospital twice", "this hospital's own name") else "no valid signature"
    with pytest.raises(SecAggRefusal, match=why):
        Participant.from_bytes(me.to_bytes()).share_keys(forged)
    # refused before anything was encrypted: the same participant still answers the honest keys
    assert Participant.from_bytes(me.to_bytes()).share_keys(keys)


def test_a_listed_hospitals_genuine_signature_is_needed_even_for_keys_with_none():
    people, keys = signed_participants(listed=("north", "south"))  # east is not on north's list
    with pytest.raises(SecAggRefusal, match="node 3"):
        people[1].share_keys(keys)
    people, keys = signed_participants()
    with pytest.raises(SecAggRefusal, match="no valid signature"):  # every signature stripped on the way
        people[1].share_keys({k: own[:2] for k, own in keys.items()})


def test_a_hospital_asked_for_other_settings_than_the_others_is_noticed_in_its_shares():
    # the coordinator asks node 3 for half the noise: 1 and 2 see it in 3's encrypted shares
    people, keys = participants(n=3, threshold=2)
    boxes = {k: p.share_keys(keys, '{"noise_variance": 100.0}' if k != 3 else '{"noise_variance": 50.0}')
             for k, p in people.items()}
    with pytest.raises(SecAggRefusal, match="node 3 was asked for other round settings"):
        people[1].receive({src: box[1] for src, box in boxes.items() if src != 1})
    with pytest.raises(SecAggRefusal, match="node 1 was asked"):
        people[3].receive({src: box[3] for src, box in boxes.items() if src != 3})


@pytest.mark.parametrize("text", ["a", "QUJD:REVG:x", "QUJD:REVG:name\nwith:U0lH", "QUJD:REVG:bad name:U0lH",
                                  "QUJD:REVG::U0lH", "QUJD:REVG:north:not base64!", "QUJD:RE*G", "QUJD:REVG:a:b:c"])
def test_the_coordinator_drops_round_keys_that_another_hospital_could_not_parse(text):
    # passed on whole to every hospital: one malformed answer would make them all refuse
    from server.secagg import parse_round_keys

    with pytest.raises(ValueError):
        parse_round_keys(text)


def test_the_coordinator_passes_signed_and_unsigned_round_keys_on_whole():
    from server.secagg import key_lines, parse_round_keys

    people, keys = signed_participants()
    own = {k: parse_round_keys(p.my_keys()) for k, p in people.items()}
    assert own == keys
    assert parse_round_keys("QUJD:REVG") == ("QUJD", "REVG")
    # any name `fedgru hospital init` accepts (the same rule: common.messages.is_hospital_name)
    assert parse_round_keys("QUJD:REVG:zürich-2_a:U0lH")[2] == "zürich-2_a"
    assert key_lines(own).splitlines()[0] == "1:" + people[1].my_keys()


@pytest.mark.parametrize("odd,told", [(3, dict(participants=[1, 2, 3, 4], threshold=4)),  # another threshold
                                       (4, dict(participants=[1, 2, 3, 4, 5], threshold=3))])  # a participant more
def test_a_hospital_told_other_participants_or_another_threshold_is_noticed_in_its_shares(odd, told):
    nodes = [1, 2, 3, 4]
    people = {k: Participant.setup(k, ROUND, nodes, 3, 2) for k in nodes if k != odd}
    people[odd] = Participant.setup(odd, ROUND, told["participants"], told["threshold"], 2)
    keys = {k: (p.pk1, p.pk2) for k, p in people.items()}
    boxes = {k: p.share_keys(keys) for k, p in people.items()}
    with pytest.raises(SecAggRefusal, match=f"node {odd} was asked"):
        people[1].receive({src: box[1] for src, box in boxes.items() if src != 1})


# ---------------------------------------------------------------------------------------
# The coordinator's own check of signed round keys (run-config hospital-keys): one
# hospital's bad keys leave that hospital out, not the round.
# ---------------------------------------------------------------------------------------

def _admitted(names=("north", "south", "east")):
    from common.signatures import public_key_of

    return {n: public_key_of(IDENTITIES[n][1]) for n in names}


@pytest.mark.parametrize("case, why", [
    ("honest", None),
    ("unsigned", "not signed"),
    ("signed as another name", "signed as 'east'"),
    ("not admitted", "no public key among the admitted"),
    ("signed for another round", "do not carry a valid signature"),
    ("signed for another session", "do not carry a valid signature"),
    ("signed by another key", "do not carry a valid signature"),
    ("name already taken", "already takes part"),
])
def test_the_coordinator_admits_only_round_keys_an_admitted_hospital_signed_for_this_round(case, why):
    from server.secagg import signature_problem

    _, keys = signed_participants()
    own, said, taken, admitted, session = keys[2], "south", set(), _admitted(), "train"
    if case == "unsigned":
        own = own[:2]
    elif case == "signed as another name":
        own = own[:2] + ("east", own[3])
    elif case == "not admitted":
        admitted = _admitted(("north", "east"))
    elif case == "signed for another round":
        own = _coordinator_keys(2, server_round=ROUND - 1, signer=IDENTITIES["south"][0])
    elif case == "signed for another session":
        own = _replayed_from_session(2, "train")
        session = "evaluate test final"
    elif case == "signed by another key":
        own = _coordinator_keys(2, signer=IDENTITIES["intruder"][0], name="south")
    elif case == "name already taken":
        taken = {"south"}
    found = signature_problem(admitted, "run-a", ROUND, session, 2, own, said, taken)
    if why is None:
        assert found is None
    else:
        assert found is not None and re.search(why, found)


def test_a_secure_round_leaves_out_only_the_hospital_whose_keys_are_badly_signed():
    from types import SimpleNamespace

    from flwr.app import ConfigRecord

    from common import messages as M
    from common import secagg as S
    from server.records import TrainPhase
    from server.secure_round import SecureRounds

    _, keys = signed_participants()
    keys[3] = _coordinator_keys(3, signer=IDENTITIES["intruder"][0], name="east")  # east's keys, someone else's signature
    names = {1: "north", 2: "south", 3: "east"}
    co = SimpleNamespace(hospital_keys=_admitted(), run_id="run-a", _phase=TrainPhase(),
                         _view=lambda nid: SimpleNamespace(name=names[nid]))
    # setup answers as _keys reads them (a reply's status record)
    replies = {nid: SimpleNamespace(content={M.STATUS: ConfigRecord({S.MY_KEYS: ":".join(own), S.REQUIRED_VARIANCE: 4.0})})
               for nid, own in keys.items()}
    found, required = SecureRounds(co)._keys(ROUND, replies)
    assert sorted(found) == [1, 2] and found[1] == keys[1] and required == {1: 4.0, 2: 4.0}
    assert [(d.hospital, d.node_id) for d in co._phase.dropped] == [("east", 3)]
    assert "valid signature of 'east'" in co._phase.dropped[0].reason
    # without admitted keys the coordinator passes every parsable answer on (the hospitals check them)
    co.hospital_keys, co._phase = {}, TrainPhase()
    assert sorted(SecureRounds(co)._keys(ROUND, replies)[0]) == [1, 2, 3]


def test_the_admitted_hospitals_keys_are_read_with_errors_naming_the_file(tmp_path):
    from server.secagg import load_hospital_keys

    with pytest.raises(ValueError, match="is not a folder"):
        load_hospital_keys(tmp_path / "missing")
    with pytest.raises(ValueError, match="holds no <name>.pub"):
        load_hospital_keys(tmp_path)
    (tmp_path / "north.pub").write_text(IDENTITIES["north"][1] + "\n")
    (tmp_path / "south.pub").write_text(IDENTITIES["south"][1] + "\n")
    assert sorted(load_hospital_keys(tmp_path)) == ["north", "south"]
    (tmp_path / "east.pub").write_text("not a key\n")
    with pytest.raises(ValueError, match=r"east\.pub: is not an OpenSSH public key"):
        load_hospital_keys(tmp_path)


def test_one_key_registered_under_two_names_is_refused(tmp_path):
    """Hospitals refuse one peer key under two names (client.commands.add_peer); the
    coordinator's own check should too, or one hospital signs as two participants."""
    from client.folder import make_supernode_keypair
    from server.secagg import load_hospital_keys

    pub = make_supernode_keypair(tmp_path, "north")[1]
    keys = tmp_path / "hospitals"
    keys.mkdir()
    (keys / "north.pub").write_text(pub.read_text())
    (keys / "south.pub").write_text(pub.read_text())
    with pytest.raises(ValueError):
        load_hospital_keys(keys)
