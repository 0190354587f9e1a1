"""A hospital's secure aggregation rounds (client.secure) against neighbouring data and a
hostile coordinator, with real hospital folders, the real ClientApp and set A's stays.

Two peers (honest, in the test) and the hospital under test (node 7) run whole rounds.
The round's randomness (keys, seeds, Shamir coefficients, encryption IVs) is made
repeatable, so the five neighbouring folders of tests/test_neighbouring.py must answer
every stage byte for byte alike, except the masked vector (the DP release); every
refusal comes before any patient data are read and charges nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
from contextlib import ExitStack
from unittest.mock import patch

import numpy as np
import pytest
from cryptography.fernet import Fernet
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

import client.secagg as secagg_module
from client import app as client_app
from client.folder import SETTINGS_FILE, HospitalFolder, write_settings
from client.hospital import Node
from client.secagg import Participant
from common import messages as M
from common import secagg as S
from common.ledger import Ledger
from common.messages import Mechanism, ReplyState, Split
from common.skellam import SkellamSensitivity
from server.coordinator import initial_arrays
from server.secagg import key_lines
from tests.conftest import hospital_cfg

# the five neighbouring folders, and the task identity Flower needs, as tests/test_neighbouring.py builds them
from tests.test_neighbouring import _identity, _ledger_json, _reset, first_difference, neighbours, outside_dp  # noqa: F401

ME, PEERS = 7, (3, 9)
SCALE = 2 ** 16 / 3.0  # the coordinator's integers per unit (clipping norm 3)


def secure_cfg(*extra):
    return hospital_cfg("privacy.aggregation=secure", "training.sample_rate=1.0", "evaluation.validate_every=0", *extra)


class Repeatable:
    """Every random draw of the protocol from one seeded generator."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def bytes(self, n: int) -> bytes:
        return self.rng.randbytes(n)

    def keys(self):
        private = ec.derive_private_key(self.rng.getrandbits(256) + 1, ec.SECP384R1())
        return private, private.public_key()

    def encrypt(self, key: bytes, plaintext: bytes) -> bytes:
        return Fernet(key)._encrypt_from_parts(plaintext, 0, self.bytes(16))

    def patches(self) -> ExitStack:
        stack = ExitStack()
        stack.enter_context(patch.object(secagg_module, "fresh_secret", lambda: self.bytes(32)))
        stack.enter_context(patch.object(secagg_module, "generate_key_pairs", self.keys))
        stack.enter_context(patch.object(secagg_module, "encrypt", self.encrypt))
        stack.enter_context(patch("Crypto.Protocol.SecretSharing.rng", self.bytes))
        return stack


def message(cfg, stage: S.Stage, fields: dict, server_round: int = 1, model: bool = False, run: str = "run-1") -> Message:
    config = {M.EXPERIMENT_JSON: cfg.to_json(), M.RUN_ID: run, M.SERVER_ROUND: server_round, M.EVALUATE: "",
              S.STAGE: stage.value, S.SCALE: SCALE, **fields}
    content = {M.CONFIG: ConfigRecord(config)}
    if model:
        content[M.ARRAYS] = initial_arrays(cfg)
    return Message(RecordDict(content), dst_node_id=ME, message_type=MessageType.TRAIN)


def honest_round(folder, cfg, seed: int = 1, survivors=(3, 7, 9), variance_factor: float = 1.0, parts: dict | None = None,
                 signers: dict | None = None, forge=None, peer_variance_factor: float = 1.0,
                 collect_fields: dict | None = None, forwarded: tuple[int, ...] = PEERS, threshold: int = 2,
                 next_threshold: int = 2):
    """One whole round with two honest peers; the hospital's four replies (and, in
    ``parts``, the peers and everyone's public keys). ``signers``: node -> (name, key) of
    peers that sign their round keys; ``forge``: what a hostile coordinator does to the keys
    it passes on; ``peer_variance_factor``: the noise it asks the peers for, against the
    hospital's; ``forwarded``: the peers whose shares it passes on to the hospital;
    ``threshold`` and ``next_threshold``: this round's and the next round's (sent early)."""
    context = Context(run_id=1, node_id=ME, node_config={"hospital-dir": str(folder)}, state=RecordDict(), run_config={})
    replies = []
    with Repeatable(seed).patches():
        nodes = sorted((*PEERS, ME))
        signers = signers or {}
        peers = {p: Participant.setup(p, 1, nodes, threshold, 2, run_id="run-1", name=signers.get(p, ("", None))[0],
                                      signing_key=signers.get(p, ("", None))[1]) for p in PEERS}
        r1 = client_app.train(message(cfg, S.Stage.SETUP, {S.PARTICIPANTS: nodes, S.THRESHOLD: threshold}), context)
        replies.append(r1)
        status = r1.content[M.STATUS]
        if status[M.STATE] != ReplyState.READY.value:
            return replies, context
        own = tuple(str(status[S.MY_KEYS]).split(":"))  # pk1:pk2:name:signature (a deployed hospital signs)
        keys = {**{p: tuple(q.my_keys().split(":")) for p, q in peers.items()}, ME: own}
        variance = float(status[S.REQUIRED_VARIANCE]) * variance_factor
        sent = forge(keys) if forge else keys
        share = {S.PUBLIC_KEYS: key_lines(sent), S.NOISE_VARIANCE: variance}
        r2 = client_app.train(message(cfg, S.Stage.SHARE_KEYS, share), context)
        replies.append(r2)
        if r2.content[M.STATUS][M.STATE] != ReplyState.READY.value:
            return replies, context
        # what the coordinator asked the peers: the same share-keys message, or one with less noise
        asked = S.agreed_settings(message(cfg, S.Stage.SHARE_KEYS, {
            **share, S.NOISE_VARIANCE: variance * peer_variance_factor}).content[M.CONFIG])
        boxes = {p: q.share_keys(keys, asked) for p, q in peers.items()}
        if parts is not None:
            parts.update(peers=peers, keys=keys, boxes=boxes, variance=variance)
        inbox = "\n".join(f"{p}:{box[ME]}" for p, box in sorted(boxes.items()) if p in forwarded)
        r3 = client_app.train(message(cfg, S.Stage.COLLECT, {S.CIPHERTEXTS: inbox, **(collect_fields or {})}, model=True),
                              context)
        replies.append(r3)
        if r3.content[M.STATUS][M.STATE] != ReplyState.TRAINED.value:
            return replies, context
        # with the next round's setup, as the coordinator sends it
        replies.append(client_app.train(message(cfg, S.Stage.UNMASK, {
            S.SURVIVORS: list(survivors), S.NEXT_ROUND: 2, S.PARTICIPANTS: nodes, S.THRESHOLD: next_threshold}), context))
    return replies, context


def without_masked_values(reply: Message) -> dict:
    seen = outside_dp(reply)
    masked = seen.get("arrays", {}).get(S.MASKED)
    if masked:
        masked["vector"][2] = None  # the DP release: its values may differ, its type and shape may not
    return seen


def test_neighbouring_hospitals_answer_a_whole_secure_round_alike_outside_the_masked_vector(neighbours):  # noqa: F811
    folders, fresh = neighbours
    cfg = secure_cfg()
    seen, ledgers = {}, {}
    for name, folder in folders.items():
        _reset(folders, fresh)
        replies, _ = honest_round(folder, cfg)
        assert [r.content[M.STATUS][M.STATE] for r in replies] == ["ready", "ready", "trained", "ready"]
        assert S.MY_KEYS in replies[3].content[M.STATUS]  # the next round's keys came with the unmask
        # every field is a DP release or declared as a non-DP one (the report lists them)
        for r in replies:
            fields = [*r.content[M.STATUS].keys(), *r.content.array_records.keys(),
                      *(k for rec in r.content.metric_records.values() for k in rec.keys())]
            assert set(fields) <= set(M.FIELD_RELEASES), set(fields) - set(M.FIELD_RELEASES)
        # the ledger copy travels with the release only (the key and unmask stages release nothing new)
        assert [M.LEDGER in r.content[M.STATUS] for r in replies] == [False, False, True, False]
        seen[name] = [without_masked_values(r) for r in replies]
        ledgers[name] = _ledger_json(folder)
    for other in sorted(folders)[1:]:
        for stage, (x, y) in enumerate(zip(seen["a"], seen[other])):
            diff = first_difference(x, y)
            assert diff is None, f"stage {stage + 1}: hospital a and its neighbour {other} differ at {diff}"
        assert ledgers[other] == ledgers["a"]
    ledger = Ledger.from_json(ledgers["a"])
    [entry] = ledger.noisy(Split.TRAIN)
    assert entry.mechanism == Mechanism.SKELLAM and entry.steps == 1 and entry.sample_rate == 1.0
    # the ledger counts two hospitals' noise (the default policy's min_honest) and its own alone
    assert entry.noise_multiplier == pytest.approx(math.sqrt(2) * entry.alone_noise_multiplier)
    assert ledger.epsilon_alone() > ledger.epsilon() > 0


def test_the_masked_vector_is_the_hospitals_clipped_noisy_sum_once_the_masks_are_removed(neighbours):  # noqa: F811
    """The peers (whose vectors are zero) and the hospital, through the coordinator's
    unmasking: what comes out is the hospital's integer gradient sum plus its noise."""
    from server.secagg import Revealed, parse_revealed, unmasked_sum

    folders, fresh = neighbours
    _reset(folders, fresh)
    parts: dict = {}
    replies, _ = honest_round(folders["a"], secure_cfg(), parts=parts)
    masked = replies[2].content[S.MASKED]["vector"].numpy()
    theirs = _reply_shares(replies[1])
    revealed = parse_revealed(str(replies[3].content[M.STATUS][S.REVEALED]))
    vectors = []
    for p, q in parts["peers"].items():
        q.receive({**{o: box[p] for o, box in parts["boxes"].items() if o != p}, ME: theirs[p]})
        vectors.append(q.masked(np.zeros(masked.size, dtype=np.int64)))
        revealed += [Revealed(k, o, S.unb64(t)) for k, o, t in q.unmask([3, 7, 9])]
    public = {n: (S.unb64(own[0]), S.unb64(own[1])) for n, own in parts["keys"].items()}
    total = S.from_ring(unmasked_sum(S.to_ring(masked + sum(vectors)), [3, 7, 9], [3, 7, 9], revealed, public, 2, 1))
    declared = int(replies[2].content[M.METRICS][M.NUM_EXAMPLES])
    sens = SkellamSensitivity.of(3.0, SCALE, total.size)
    noise = math.sqrt(total.size * parts["variance"])
    assert np.linalg.norm(total) <= declared * sens.l2 + 8 * noise
    # not masks: the masks are uniform on 2^32, this is the gradient sum and its noise
    assert np.abs(total).max() < 2 ** 28


@contextlib.contextmanager
def _policy(folder, **changes):
    """The hospital's policy with ``changes`` (none: as it is, for a block that changes it
    itself) for the ``with`` block, its settings file restored byte for byte afterwards."""
    kept = (folder / SETTINGS_FILE).read_bytes()
    try:
        if changes:
            settings = HospitalFolder(folder).settings
            write_settings(folder, dataclasses.replace(settings, policy=dataclasses.replace(settings.policy, **changes)))
        yield
    finally:
        (folder / SETTINGS_FILE).write_bytes(kept)


def _reply_shares(reply: Message) -> dict[int, str]:
    return {int(d): t for d, t in (line.split(":", 1) for line in str(reply.content[M.STATUS][S.SHARES_OUT]).splitlines())}


HOSTILE = {
    "a plain training message under secure aggregation": "plain",
    "a round of one hospital (below its min_honest)": "alone",
    "less noise than the hospital requires": "less-noise",
    "an unmask that leaves the hospital out of the sum": "left-out",
    "a collect before keys were shared": "out-of-order",
    "less noise asked of the other hospitals than of this one": "others-less-noise",
    "a larger scale at collect than share-keys agreed (less noise per unit)": "rescaled",
    "a threshold two groups could reach with the one colluder the policy allows": "colluder",
    "the shares of only some hospitals that got the keys (to call them dropped later)": "withheld",
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_coordinator_is_refused_before_any_data_and_nothing_is_charged(neighbours, case):  # noqa: F811
    folders, fresh = neighbours
    cfg = secure_cfg()
    seen = {}
    for name, folder in folders.items():
        _reset(folders, fresh)
        before = _ledger_json(folder)
        with patch.object(Node, "data", autospec=True, side_effect=Node.data) as reads:
            kind = HOSTILE[case]
            context = Context(run_id=1, node_id=ME, node_config={"hospital-dir": str(folder)}, state=RecordDict(),
                              run_config={})
            if kind == "plain":
                msg = Message(RecordDict({M.CONFIG: ConfigRecord({M.EXPERIMENT_JSON: cfg.to_json(), M.RUN_ID: "run-1",
                                                                  M.SERVER_ROUND: 1, M.EVALUATE: ""}),
                                          M.ARRAYS: initial_arrays(cfg)}), dst_node_id=ME, message_type=MessageType.TRAIN)
                reply = client_app.train(msg, context)
            elif kind == "alone":
                reply = client_app.train(message(cfg, S.Stage.SETUP, {S.PARTICIPANTS: [ME], S.THRESHOLD: 1}), context)
            elif kind == "colluder":  # 2 of 3: 2 t = 4 is not above 3 + 1
                with _policy(folder, max_colluding=1):
                    reply = client_app.train(message(cfg, S.Stage.SETUP, {S.PARTICIPANTS: sorted((*PEERS, ME)),
                                                                          S.THRESHOLD: 2}), context)
                assert "max_colluding" in str(reply.content[M.STATUS][M.REASON])
            elif kind == "out-of-order":
                reply = client_app.train(message(cfg, S.Stage.COLLECT, {S.CIPHERTEXTS: ""}, model=True), context)
            elif kind == "less-noise":
                replies, context = honest_round(folder, cfg, variance_factor=0.5)
                reply = replies[-1]
            elif kind == "rescaled":
                replies, context = honest_round(folder, cfg, collect_fields={S.SCALE: SCALE * 2})
                reply = replies[-1]
                assert len(replies) == 3 and "share-keys stage agreed" in str(reply.content[M.STATUS][M.REASON])
            elif kind == "withheld":
                replies, context = honest_round(folder, cfg, forwarded=PEERS[:1])
                reply = replies[-1]
                assert len(replies) == 3 and "masks only with all" in str(reply.content[M.STATUS][M.REASON])
            elif kind == "others-less-noise":  # seen in the peers' encrypted shares, refused at collect
                replies, context = honest_round(folder, cfg, peer_variance_factor=0.5)
                reply = replies[-1]
                assert len(replies) == 3 and "asked for other round settings" in str(reply.content[M.STATUS][M.REASON])
            else:
                replies, context = honest_round(folder, cfg, survivors=(3, 9))
                reply = replies[-1]
                before = _ledger_json(folder)  # the collect stage's release was made and charged; the unmask is refused
            assert reply.content[M.STATUS][M.STATE] == ReplyState.REFUSED_POLICY.value, reply.content[M.STATUS]
            if kind != "left-out":
                assert reads.call_count == 0, f"{case}: refused after patient data were read"
        assert _ledger_json(folder) == before, f"{case}: refused but charged"
        seen[name] = outside_dp(reply)
    for other in sorted(folders)[1:]:
        assert first_difference(seen["a"], seen[other]) is None


@pytest.mark.parametrize("extra,key", [
    (["hospital_dp.enabled=true"], "hospital_dp"),
    (["privacy.clipping=per_layer"], "flat"),
    (["privacy.enabled=false"], "privacy.enabled"),
])
def test_settings_secure_aggregation_cannot_honour_are_config_errors(extra, key):
    from common.config import ConfigError, load_config
    from tests.conftest import DEFAULT_CONFIG

    with pytest.raises(ConfigError, match="privacy"):
        load_config(DEFAULT_CONFIG, ["privacy.aggregation=secure", *extra])


def test_a_skellam_ledger_entry_counts_both_epsilons_and_refuses_nonsense():
    from common.ledger import LedgerEntry, LedgerError
    from common.messages import Item

    sens = SkellamSensitivity.of(3.0, SCALE, 58)

    def entry(sigma: float, alone: float) -> LedgerEntry:
        return LedgerEntry("r", 1, Mechanism.SKELLAM, "test", item=Item.WEIGHTS, noise_multiplier=sigma,
                           alone_noise_multiplier=alone, sample_rate=1.0, steps=10, max_grad_norm=sens.l2,
                           l1_sensitivity=sens.l1, examples=100)

    ledger = Ledger("h", 1e-5)
    ledger.record(entry(20.0, 10.0))
    assert ledger.epsilon_alone() > ledger.epsilon() > 0
    # PRV has no Skellam analysis: a ledger with Skellam releases reads RDP whatever is asked
    assert ledger.epsilon(Split.TRAIN, "prv") == ledger.epsilon(Split.TRAIN, "rdp")
    copy = Ledger.from_json(ledger.to_json())
    assert copy.epsilon() == ledger.epsilon() and copy.epsilon_alone() == ledger.epsilon_alone()
    for bad in (entry(10.0, 20.0), entry(10.0, 0.0)):  # own noise above the counted noise; no own noise
        with pytest.raises(LedgerError):
            Ledger("h", 1e-5).record(bad)


def test_the_noise_a_hospital_requires_honours_its_noise_floor_and_per_round_ceiling():
    """A message cannot loosen the policy: the variance a hospital asks of the round keeps
    the noise multiplier its ledger counts above the policy's floor and one round's cost
    under its per-round ceiling, as DP-SGD's noise does."""
    import dataclasses

    from client.policy import default_policy
    from client.secure import SecureAsk, release_entry, required_variance, settings_of

    cfg = secure_cfg("run.rounds=2")  # a round costs well above what RDP can certify at all (about 0.1)
    relaxed = default_policy(10.0, 1e-5, 10.0)
    ledger = Ledger("h", 1e-5)

    def counted(policy) -> tuple[float, float]:
        ask = SecureAsk(cfg, policy, "h", 700, "r", 1)
        s = settings_of(ask, SCALE)
        entry = release_entry(ask, s, required_variance(ask, ledger, s), 1)
        return entry.noise_multiplier, Ledger("h", 1e-5).epsilon_with([entry])

    sigma, per_round = counted(relaxed)
    floor = dataclasses.replace(relaxed, min_noise_multiplier=2 * sigma)
    assert counted(floor)[0] >= 2 * sigma * (1 - 1e-9)
    ceiling = dataclasses.replace(relaxed, max_epsilon_per_round=per_round / 2)
    assert counted(ceiling)[1] <= per_round / 2


def test_a_resumed_secure_run_keeps_its_momentum(tmp_path):
    """The coordinator's heavy-ball velocity (training.momentum) travels in the checkpoint's
    strategy state and comes back out of it, leaving the strategy's own state as it was."""
    from server.checkpoint import RunSnapshot, load_checkpoint, save_checkpoint
    from server.secure_round import SecureRounds

    before = SecureRounds(None)
    before.velocity = np.linspace(-1.0, 1.0, 43)
    snapshot = RunSnapshot("run", 3, secure_cfg().to_json(), {"w": np.zeros(2, dtype=np.float32)},
                           {"m_t": {"w": np.ones(2)}, **before.state_dict()}, None, [], [])
    save_checkpoint(snapshot, tmp_path / "checkpoint.pt")
    state = dict(load_checkpoint(tmp_path / "checkpoint.pt").strategy_state)
    after = SecureRounds(None)
    after.load_state_dict(state)
    np.testing.assert_array_equal(after.velocity, before.velocity)
    assert list(state) == ["m_t"]


def list_peers(folder, tmp_path) -> dict[int, tuple]:
    """Each peer node a fresh signing key, listed in ``folder``'s policy as ``fedgru
    hospital peer`` lists one: node -> (name, private key)."""
    from cryptography.hazmat.primitives import serialization

    from client.commands import add_peer

    signers = {p: (f"peer-{p}", ec.generate_private_key(ec.SECP384R1())) for p in PEERS}
    for name, key in signers.values():
        pub = tmp_path / f"{name}.pub"
        pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
        add_peer(folder, name, pub)
    return signers


def test_with_peer_keys_a_hospital_aggregates_only_with_the_hospitals_it_lists(neighbours, tmp_path):  # noqa: F811
    """The folder lists its two peers (``fedgru hospital peer``): their signed keys give a
    whole round; keys the coordinator made itself in a peer's place are refused at
    share-keys, before any patient data are read, and nothing is charged."""
    folders, fresh = neighbours
    folder = folders[sorted(folders)[0]]
    with _policy(folder):  # list_peers writes the peers into it
        _reset(folders, fresh)
        signers = list_peers(folder, tmp_path)
        cfg = secure_cfg()
        replies, _ = honest_round(folder, cfg, signers=signers)
        assert [r.content[M.STATUS][M.STATE] for r in replies] == ["ready", "ready", "trained", "ready"]

        _reset(folders, fresh)
        before = _ledger_json(folder)
        with patch.object(Node, "data", autospec=True, side_effect=Node.data) as reads:
            def stand_in(keys):  # the coordinator's own round keys in peer 9's place
                impostor = Participant.setup(PEERS[1], 1, sorted((*PEERS, ME)), 2, 2)
                return {**keys, PEERS[1]: (impostor.pk1, impostor.pk2)}

            replies, _ = honest_round(folder, cfg, signers=signers, forge=stand_in)
            status = replies[-1].content[M.STATUS]
            assert status[M.STATE] == ReplyState.REFUSED_POLICY.value and "peer_keys" in str(status[M.REASON]), status
            assert reads.call_count == 0
        assert _ledger_json(folder) == before


def test_the_next_rounds_early_setup_keeps_the_policys_least_threshold(neighbours):  # noqa: F811
    """With max_colluding 1, 3 of 3 is accepted; the next round's setup sent with the
    unmask at 2 of 3 gets no keys (the full setup then says why)."""
    folders, fresh = neighbours
    folder = folders["a"]
    _reset(folders, fresh)
    with _policy(folder, max_colluding=1):
        replies, _ = honest_round(folder, secure_cfg(), threshold=3, next_threshold=2)
        assert replies[-1].content[M.STATUS][M.STATE] == ReplyState.READY.value
        assert S.MY_KEYS not in replies[-1].content[M.STATUS]
        _reset(folders, fresh)
        replies, _ = honest_round(folder, secure_cfg(), threshold=3, next_threshold=3)
        assert S.MY_KEYS in replies[-1].content[M.STATUS]
