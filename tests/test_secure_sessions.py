"""The session a hospital signs its round keys for (``common.secagg.keys_to_sign``) is the
one the coordinator checks them against, on every path a real hospital answers: the test
and the final validation, a validation during training, and the next round's training
keys sent early with an unmask; and a hospital that lists its peers accepts their keys
for its own session only. Without these, an honest federation with ``hospital-keys``
would lose every session whose label one side computed differently (written by an
independent review, which found that swapping ``not progress`` for ``progress`` on the
coordinator passed every fast test)."""
from __future__ import annotations

import pytest
from flwr.app import Context, RecordDict

from client import app as client_app
from client.hospital import Node
from client.secagg import Participant
from common import messages as M
from common import secagg as S
from common.messages import ReplyState, Split
from common.secure_evaluation import VARIANCES
from server.secagg import key_lines, signature_problem
from tests.test_neighbouring import _identity, _reset, neighbours  # noqa: F401 - fixtures (_identity autouse)
from tests.test_secure_aggregation import ME, PEERS, Repeatable, _policy, honest_round, list_peers, secure_cfg
from tests.test_secure_evaluation import message as eval_message


def _own_public(folder):
    ctx = Context(run_id=1, node_id=ME, node_config={"hospital-dir": str(folder)}, state=RecordDict(), run_config={})
    return Node(ctx, None).signing_key().public_key(), ctx


@pytest.mark.parametrize("splits,progress", [((Split.TEST,), False), ((Split.VAL,), False), ((Split.VAL,), True)])
def test_the_coordinator_accepts_an_honest_hospitals_evaluation_keys_for_that_session_only(neighbours, splits, progress):  # noqa: F811
    folders, fresh = neighbours
    folder = folders["a"]
    _reset(folders, fresh)
    cfg = secure_cfg("evaluation.validate_every=1")
    public, ctx = _own_public(folder)
    nodes = sorted((*PEERS, ME))
    r = client_app.evaluate(eval_message(cfg, S.Stage.SETUP, {S.PARTICIPANTS: nodes, S.THRESHOLD: 2},
                                         splits=splits, progress=progress), ctx)
    st = r.content[M.STATUS]
    assert st[M.STATE] == ReplyState.READY.value, st
    own = tuple(str(st[S.MY_KEYS]).split(":"))
    name = own[2]
    session = S.evaluation_session([s.value for s in splits], not progress)  # the coordinator's
    assert signature_problem({name: public}, "run-1", 3, session, ME, own, name, set()) is None
    for other in ("train", S.evaluation_session(["test"], True), S.evaluation_session(["val"], True),
                  S.evaluation_session(["val"], False)):
        if other != session:
            assert signature_problem({name: public}, "run-1", 3, other, ME, own, name, set()) is not None


def test_keys_sent_early_with_an_unmask_are_the_next_rounds_training_keys(neighbours):  # noqa: F811
    folders, fresh = neighbours
    folder = folders["a"]
    _reset(folders, fresh)
    replies, ctx = honest_round(folder, secure_cfg())
    public, _ = _own_public(folder)
    st = replies[-1].content[M.STATUS]
    assert int(st[S.NEXT_ROUND]) == 2
    own = tuple(str(st[S.MY_KEYS]).split(":"))
    assert signature_problem({own[2]: public}, "run-1", 2, S.TRAINING_SESSION, ME, own, own[2], set()) is None
    assert signature_problem({own[2]: public}, "run-1", 2, S.evaluation_session(["val"], False), ME, own, own[2],
                             set()) is not None


@pytest.mark.parametrize("peer_session", ["same", "train"])
def test_a_hospital_listing_its_peers_accepts_their_keys_for_its_own_session_only(neighbours, tmp_path, peer_session):  # noqa: F811
    folders, fresh = neighbours
    folder = folders[sorted(folders)[0]]
    with _policy(folder):  # list_peers writes the peers into it
        _reset(folders, fresh)
        signers = list_peers(folder, tmp_path)
        cfg = secure_cfg()
        splits = (Split.TEST,)
        session = S.evaluation_session(["test"], True) if peer_session == "same" else "train"
        ctx = Context(run_id=1, node_id=ME, node_config={"hospital-dir": str(folder)}, state=RecordDict(), run_config={})
        nodes = sorted((*PEERS, ME))
        with Repeatable(1).patches():
            peers = {p: Participant.setup(p, 3, nodes, 2, 2, run_id="run-1", name=signers[p][0],
                                          signing_key=signers[p][1], session=session) for p in PEERS}
            r1 = client_app.evaluate(eval_message(cfg, S.Stage.SETUP, {S.PARTICIPANTS: nodes, S.THRESHOLD: 2},
                                                  splits=splits), ctx)
            st = r1.content[M.STATUS]
            own = tuple(str(st[S.MY_KEYS]).split(":"))
            keys = {**{p: tuple(q.my_keys().split(":")) for p, q in peers.items()}, ME: own}
            r2 = client_app.evaluate(eval_message(cfg, S.Stage.SHARE_KEYS, {S.PUBLIC_KEYS: key_lines(keys),
                                                                               VARIANCES: list(st[VARIANCES])},
                                                  splits=splits), ctx)
        state = r2.content[M.STATUS][M.STATE]
        if peer_session == "same":
            assert state == ReplyState.READY.value, r2.content[M.STATUS]
        else:
            assert state == ReplyState.REFUSED_POLICY.value and "peer_keys" in str(r2.content[M.STATUS][M.REASON])
