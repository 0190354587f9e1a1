"""A hospital's evaluation releases under secure aggregation (client.secure_evaluation)
against neighbouring data and a hostile coordinator, with real hospital folders, the
real ClientApp and set A's stays; and the coordinator's reading of the sum
(server.secure_evaluation).

As in tests/test_secure_aggregation.py, two honest peers (in the test) and the hospital
under test (node 7) run whole sessions with repeatable randomness: the five neighbouring
folders of tests/test_neighbouring.py must answer every stage byte for byte alike except
the masked vector (the DP release), and every refusal comes before any patient data are
read and charges nothing.
"""

from __future__ import annotations

import math
from unittest.mock import patch

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from client import app as client_app
from client.hospital import Node
from client.secagg import Participant
from client.secure_evaluation import secure_evaluation_variances
from common import messages as M
from common import secagg as S
from common.data.preprocess import num_steps
from common.ledger import Ledger
from common.messages import Item, Mechanism, ReplyState, Split
from common.secure_evaluation import (
    DECLARED,
    INCLUDED,
    MASKED,
    PROGRESS,
    VARIANCES,
    evaluation_parts,
    part_of,
    vector_size,
)
from server.coordinator import initial_arrays
from server.secagg import Revealed, key_lines, parse_revealed, unmasked_sum
from server.secure_evaluation import read_sum

# the five neighbouring folders, and the task identity Flower needs, as tests/test_neighbouring.py builds them
from tests.test_neighbouring import _identity, _ledger_json, _reset, first_difference, neighbours, outside_dp  # noqa: F401
from tests.test_secure_aggregation import ME, PEERS, Repeatable, _policy, secure_cfg

THRESHOLD = 0.2  # the run's decision threshold, sent with the test evaluation


def hour_thresholds(cfg) -> list[float]:
    """Each hour's threshold, sent with the test evaluation for the onset histogram: falling
    from 0.4 to the run's, as early risks run high."""
    steps = num_steps(cfg.features)
    return [float(t) for t in np.linspace(0.4, THRESHOLD, steps)]


def message(cfg, stage: S.Stage, fields: dict, splits=(Split.TEST,), progress: bool = False, server_round: int = 3,
            model: bool = False) -> Message:
    config = {M.EXPERIMENT_JSON: cfg.to_json(), M.RUN_ID: "run-1", M.SERVER_ROUND: server_round,
              M.EVALUATE: " ".join(s.value for s in splits), S.STAGE: stage.value, S.SCALE: 1.0, PROGRESS: progress,
              **({M.THRESHOLD: THRESHOLD} if Split.TEST in splits else {}),
              **({M.HOUR_THRESHOLDS: hour_thresholds(cfg)} if Split.TEST in splits and cfg.monitors_onset else {}), **fields}
    content = {M.CONFIG: ConfigRecord(config)}
    if model:
        content[M.ARRAYS] = initial_arrays(cfg)
    return Message(RecordDict(content), dst_node_id=ME, message_type=MessageType.EVALUATE)


def honest_session(folder, cfg, splits=(Split.TEST,), progress: bool = False, seed: int = 1, survivors=(3, 7, 9),
                   variance_factor: float = 1.0, parts: dict | None = None, collect_splits=None, peer_cfg=None,
                   forwarded: tuple[int, ...] = PEERS):
    """One whole evaluation with two honest peers: the hospital's replies (and, in
    ``parts``, the peers, keys, share boxes and agreed variances). ``peer_cfg``: another
    experiment a hostile coordinator put to the peers at share-keys; ``forwarded``: the peers
    whose shares it passes on to the hospital."""
    context = Context(run_id=1, node_id=ME, node_config={"hospital-dir": str(folder)}, state=RecordDict(), run_config={})
    ask = dict(splits=splits, progress=progress)
    replies = []
    with Repeatable(seed).patches():
        nodes = sorted((*PEERS, ME))
        peers = {p: Participant.setup(p, 3, nodes, 2, 2, run_id="run-1") for p in PEERS}
        r1 = client_app.evaluate(message(cfg, S.Stage.SETUP, {S.PARTICIPANTS: nodes, S.THRESHOLD: 2}, **ask), context)
        replies.append(r1)
        status = r1.content[M.STATUS]
        if status[M.STATE] != ReplyState.READY.value:
            return replies
        own = tuple(str(status[S.MY_KEYS]).split(":"))  # pk1:pk2:name:signature (a deployed hospital signs)
        keys = {**{p: (q.pk1, q.pk2) for p, q in peers.items()}, ME: own}
        variances = [float(v) * variance_factor for v in status[VARIANCES]]
        share = message(cfg, S.Stage.SHARE_KEYS, {S.PUBLIC_KEYS: key_lines(keys), VARIANCES: variances}, **ask)
        peer_share = peer_cfg and message(peer_cfg, S.Stage.SHARE_KEYS, {S.PUBLIC_KEYS: key_lines(keys),
                                                                         VARIANCES: variances}, **ask)
        r2 = client_app.evaluate(share, context)
        replies.append(r2)
        if r2.content[M.STATUS][M.STATE] != ReplyState.READY.value:
            return replies
        asked = S.agreed_settings((peer_share or share).content[M.CONFIG])  # what the coordinator asked the peers
        boxes = {p: q.share_keys(keys, asked) for p, q in peers.items()}
        if parts is not None:
            parts.update(peers=peers, keys=keys, boxes=boxes, variances=variances)
        inbox = "\n".join(f"{p}:{box[ME]}" for p, box in sorted(boxes.items()) if p in forwarded)
        collect = dict(splits=collect_splits or splits, progress=progress)
        r3 = client_app.evaluate(message(cfg, S.Stage.COLLECT, {S.CIPHERTEXTS: inbox}, model=True, **collect), context)
        replies.append(r3)
        if r3.content[M.STATUS][M.STATE] != ReplyState.EVALUATED.value:
            return replies
        replies.append(client_app.evaluate(message(cfg, S.Stage.UNMASK, {S.SURVIVORS: list(survivors)}, **ask), context))
    return replies


def without_masked_values(reply: Message) -> dict:
    seen = outside_dp(reply)
    masked = seen.get("arrays", {}).get(MASKED)
    if masked:
        masked["vector"][2] = None  # the DP release: its values may differ, its type and shape may not
    return seen


@pytest.mark.parametrize("splits,progress", [((Split.TEST,), False), ((Split.VAL,), False), ((Split.VAL,), True)],
                         ids=["test", "final validation", "validation during training"])
def test_neighbouring_hospitals_answer_a_whole_secure_evaluation_alike_outside_the_masked_vector(
        neighbours, splits, progress):  # noqa: F811
    folders, fresh = neighbours
    cfg = secure_cfg("evaluation.validate_every=1")
    seen, ledgers = {}, {}
    for name, folder in folders.items():
        _reset(folders, fresh)
        replies = honest_session(folder, cfg, splits, progress)
        assert [r.content[M.STATUS][M.STATE] for r in replies] == ["ready", "ready", "evaluated", "ready"]
        for r in replies:  # every field is a DP release or declared as a non-DP one (the report lists them)
            fields = [*r.content[M.STATUS].keys(), *r.content.array_records.keys(),
                      *(k for rec in r.content.metric_records.values() for k in rec.keys())]
            assert set(fields) <= set(M.FIELD_RELEASES), set(fields) - set(M.FIELD_RELEASES)
        assert [M.LEDGER in r.content[M.STATUS] for r in replies] == [False, False, True, False]
        seen[name] = [without_masked_values(r) for r in replies]
        ledgers[name] = _ledger_json(folder)
    for other in sorted(folders)[1:]:
        for stage, (x, y) in enumerate(zip(seen["a"], seen[other])):
            diff = first_difference(x, y)
            assert diff is None, f"stage {stage + 1}: hospital a and its neighbour {other} differ at {diff}"
        assert ledgers[other] == ledgers["a"]
    entries = Ledger.from_json(ledgers["a"]).noisy(splits[0])
    expected = [p.item for p in evaluation_parts(cfg, list(splits), not progress) if p.split == splits[0]]
    assert [e.item for e in entries] == expected and len(expected) == (3 if splits == (Split.TEST,) else
                                                                         1 if progress else 2)
    for e in entries:  # counted with the default policy's two hospitals' noise, and its own alone
        assert e.mechanism == Mechanism.SKELLAM and e.noise_multiplier == pytest.approx(math.sqrt(2) * e.alone_noise_multiplier)


def test_the_unmasked_sum_is_the_hospitals_exact_histograms_plus_the_noise(neighbours):  # noqa: F811
    """The peers (whose vectors are all noise-free zeros) and the hospital through the
    coordinator's unmasking and reading: the pooled test histogram holds the hospital's
    declared test patients, give or take the noise, and the reading says how much noise."""
    folders, fresh = neighbours
    _reset(folders, fresh)
    cfg = secure_cfg()
    parts: dict = {}
    replies = honest_session(folders["a"], cfg, parts=parts)
    masked = replies[2].content[MASKED]["vector"].numpy()
    theirs = {int(d): t for d, t in (line.split(":", 1) for line in
                                     str(replies[1].content[M.STATUS][S.SHARES_OUT]).splitlines())}
    revealed = parse_revealed(str(replies[3].content[M.STATUS][S.REVEALED]))
    vectors = []
    for p, q in parts["peers"].items():
        q.receive({**{o: box[p] for o, box in parts["boxes"].items() if o != p}, ME: theirs[p]})
        vectors.append(q.masked(np.zeros(masked.size, dtype=np.int64)))
        revealed += [Revealed(k, o, S.unb64(t)) for k, o, t in q.unmask([3, 7, 9])]
    public = {n: (S.unb64(own[0]), S.unb64(own[1])) for n, own in parts["keys"].items()}
    ring = unmasked_sum(S.to_ring(masked + sum(vectors)), [3, 7, 9], [3, 7, 9], revealed, public, 2, 3)
    layout = evaluation_parts(cfg, [Split.TEST], True)
    status = replies[2].content[M.STATUS]
    included = [int(v) for v in str(status[INCLUDED]).split(",")]
    declared = [int(v) for v in str(status[DECLARED]).split(",")]
    assert included == list(range(len(layout)))
    found = read_sum(cfg, layout, S.decode(ring, 1.0), dict(zip(included, declared)), parts["variances"], 1, THRESHOLD)
    summary = found.summaries[Split.TEST]
    n = declared[0]
    sd = found.histogram_noise[Split.TEST] * summary.sensitivity  # one hospital's share on each cell
    assert sd == pytest.approx(math.sqrt(parts["variances"][0]))
    assert summary.n == n and abs(summary.histogram.sum() - n) <= 8 * sd * math.sqrt(summary.histogram.size)
    assert summary.grid.edge_risk(summary.grid.edge_for_risk(THRESHOLD)) == pytest.approx(THRESHOLD)
    # each patient is in one row of each grouping; the importance is a mean size per patient near [0, 1]
    groupings = len(cfg.evaluation.subgroups)
    assert abs(found.subgroups.histogram.sum() - groupings * n) <= 8 * math.sqrt(parts["variances"][1] * found.subgroups.histogram.size)
    assert np.all(np.abs(found.importance / n) < 1.5)


def test_the_secure_evaluation_noise_keeps_each_group_within_its_epsilon_and_the_hospitals_alone_limit():
    """The run's evaluation budget, spent as Skellam shares: counted over min_honest
    hospitals each group stays within its epsilon, and with one hospital's noise alone
    within max_epsilon_alone; each share is min_honest times smaller than one Gaussian
    release's variance, up to the few percent Skellam costs over a Gaussian."""
    from client.noise import calibrated_evaluation_noise
    from common.ledger import LedgerEntry
    from common.privacy import epsilon_of_rdp

    cfg = secure_cfg("evaluation.validate_every=1", "run.rounds=4")
    for min_honest, alone in ((2, 4.0), (4, 4.0), (2, 1.5)):
        table = secure_evaluation_variances(cfg.to_json(), 1e-5, min_honest, alone)
        gaussian = calibrated_evaluation_noise(cfg.to_json(), 1e-5)
        for split, target in ((Split.VAL, cfg.evaluation.val_epsilon), (Split.TEST, cfg.evaluation.test_epsilon)):
            rdp = {1: 0.0, min_honest: 0.0}
            for (s, final, item), variance in table.items():
                if s != split:
                    continue
                part = part_of(cfg, s, final, item)
                releases = len(cfg.validation_rounds()) if (s, final) == (Split.VAL, False) else 1
                ratio = variance * min_honest / (gaussian[(s, final, item)] * part.l2) ** 2
                assert 1.0 <= ratio < (1.6 if alone < 4 else 1.15), (min_honest, alone, s, item, ratio)
                for hospitals in rdp:
                    entry = LedgerEntry("r", 1, Mechanism.SKELLAM, "t", split=s, item=item,
                                        noise_multiplier=math.sqrt(hospitals * variance) / part.l2,
                                        alone_noise_multiplier=math.sqrt(variance) / part.l2, sample_rate=1.0,
                                        steps=releases, max_grad_norm=part.l2, l1_sensitivity=part.l1, examples=10)
                    rdp[hospitals] = rdp[hospitals] + entry.rdp()
            assert epsilon_of_rdp(rdp[min_honest], 1e-5) <= target * (1 + 1e-6)
            assert epsilon_of_rdp(rdp[1], 1e-5) <= alone * (1 + 1e-6)


PEER_BINS = 8  # any other bin count: the same parts, in other places

HOSTILE = {
    "a plain evaluation under secure aggregation": "plain",
    "less noise than the hospital requires": "less-noise",
    "a collect that asks for other splits than the setup": "switch",
    "a collect before keys were shared": "out-of-order",
    "another release layout put to the other hospitals": "other-layout",
    "the shares of only some hospitals that got the keys (to call them dropped later)": "withheld",
    "a threshold two groups could reach with the one colluder the policy allows": "colluder",
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
                                                                  M.SERVER_ROUND: 3, M.EVALUATE: "test"}),
                                          M.ARRAYS: initial_arrays(cfg)}), dst_node_id=ME,
                              message_type=MessageType.EVALUATE)
                reply = client_app.evaluate(msg, context)
            elif kind == "out-of-order":
                reply = client_app.evaluate(message(cfg, S.Stage.COLLECT, {S.CIPHERTEXTS: ""}, model=True), context)
            elif kind == "less-noise":
                reply = honest_session(folder, cfg, variance_factor=0.5)[-1]
            elif kind == "withheld":
                replies = honest_session(folder, cfg, forwarded=PEERS[:1])
                reply = replies[-1]
                assert len(replies) == 3 and "masks only with all" in str(reply.content[M.STATUS][M.REASON])
            elif kind == "colluder":  # 2 of 3: 2 t = 4 is not above 3 + 1
                with _policy(folder, max_colluding=1):
                    reply = client_app.evaluate(message(cfg, S.Stage.SETUP, {S.PARTICIPANTS: sorted((*PEERS, ME)),
                                                                             S.THRESHOLD: 2}), context)
                assert "max_colluding" in str(reply.content[M.STATUS][M.REASON])
            elif kind == "other-layout":  # the peers' histograms sit elsewhere: seen in their shares at collect
                replies = honest_session(folder, cfg, peer_cfg=secure_cfg(f"evaluation.score_bins={PEER_BINS}"))
                reply = replies[-1]
                assert len(replies) == 3 and "other round settings" in str(reply.content[M.STATUS][M.REASON])
            else:
                reply = honest_session(folder, cfg, splits=(Split.VAL,), collect_splits=(Split.TEST,))[-1]
            assert reply.content[M.STATUS][M.STATE] == ReplyState.REFUSED_POLICY.value, reply.content[M.STATUS]
            assert reads.call_count == 0, f"{case}: refused after patient data were read"
        assert _ledger_json(folder) == before, f"{case}: refused but charged"
        seen[name] = outside_dp(reply)
    for other in sorted(folders)[1:]:
        assert first_difference(seen["a"], seen[other]) is None


def test_a_split_over_its_budget_carries_only_noise_and_says_why(neighbours):  # noqa: F811
    """A hospital whose test patients' budget cannot take the release still sends its
    noise share (the sum's noise is what everyone counts on) but no data, reads nothing
    and charges nothing."""
    folders, fresh = neighbours
    _reset(folders, fresh)
    folder = folders["a"]
    with _policy(folder, eval_max_epsilon=0.5):  # a test budget below what one test release costs
        before = _ledger_json(folder)
        # without the monitor's onset histogram: of the validation patients, within their own budget, it would be made
        cfg = secure_cfg("evaluation.monitor_rate=0", "evaluation.onset_share=0")
        with patch.object(Node, "data", autospec=True, side_effect=Node.data) as reads:
            replies = honest_session(folder, cfg)
            assert reads.call_count == 0
        status = replies[2].content[M.STATUS]
        assert status[M.STATE] == ReplyState.EVALUATED.value and str(status[INCLUDED]) == ""
        assert "budget" in str(status[M.NOT_EVALUATED])
        layout = evaluation_parts(cfg, [Split.TEST], True)
        assert replies[2].content[MASKED]["vector"].numpy().size == vector_size(layout)
        assert _ledger_json(folder) == before


def test_the_coordinator_refuses_to_read_a_sum_no_honest_hospitals_can_give():
    """Without individual releases the coordinator checks the sum: every cell within what
    the declared patients and the summed noise can give (10 sd), the importance within
    one clipping norm per patient; one forged count (a hostile hospital's) rejects it."""
    from server.secure_evaluation import plausible

    cfg = secure_cfg()
    parts = evaluation_parts(cfg, [Split.TEST], True)
    variances = [25.0] * len(parts)
    declared = {i: 100 for i in range(len(parts))}
    rng = np.random.default_rng(0)
    honest = []
    for part in parts:  # 100 patients spread over the cells (each patient one cell per grouping), plus noise
        cells = np.zeros(part.size)
        np.add.at(cells, rng.integers(0, part.size, 100), part.scale * 0.5)
        honest.append(cells + rng.normal(0, math.sqrt(3 * 25.0), part.size))
    values = np.concatenate(honest)
    assert plausible(parts, values, declared, variances, hospitals=3)
    forged = values.copy()
    forged[5] += 10 ** 6
    assert not plausible(parts, forged, declared, variances, hospitals=3)
    assert not plausible(parts, -np.abs(values) - 1000, declared, variances, hospitals=3)


def test_a_secure_val_test_session_keeps_the_validation_patients_within_their_budget():
    """The same as above through client.secure_evaluation.plan."""
    import dataclasses
    from types import SimpleNamespace

    from client.folder import DeclaredCounts
    from client.policy import default_policy
    from client.secure_evaluation import plan, release_entry, required_variances
    from common.ledger import Ledger
    from common.secure_evaluation import evaluation_parts
    from tests.test_secure_aggregation import secure_cfg

    cfg = secure_cfg()
    policy = dataclasses.replace(default_policy(8.0, 1e-5, 100.0), max_epsilon_alone=100.0)
    req = SimpleNamespace(cfg=cfg, splits=[Split.VAL, Split.TEST], policy=policy, run_id="r", server_round=3, final=True,
                          declared=DeclaredCounts(train=100, val=50, test=50), node=SimpleNamespace(name="h"),
                          hour_thresholds=np.array(hour_thresholds(cfg)))
    parts = evaluation_parts(cfg, req.splits, True)
    variances = required_variances(req, parts)
    ledger = Ledger("h", 1e-5)
    val = [release_entry(req, p, v, 50) for p, v in zip(parts, variances) if p.split == Split.VAL]
    final = [e for e in val if e.item != Item.ONSET_HISTOGRAM]
    onset = [e for e in val if e.item == Item.ONSET_HISTOGRAM]
    budget = max(ledger.epsilon_with(final), ledger.epsilon_with(onset)) * 1.001
    assert ledger.epsilon_with(final + onset) > budget
    req.policy = dataclasses.replace(policy, eval_max_epsilon=budget)
    included, entries, declined = plan(req, ledger, parts, variances)
    charged = [e for e in entries if e.split == Split.VAL]
    # the validation group is checked on everything it gives in the session: over its budget, it gives nothing
    assert charged == [] and any(d.startswith("val:") and "budget" in d for d in declined), declined
