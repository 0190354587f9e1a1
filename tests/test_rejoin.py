"""A hospital that comes back during a run, on another node, keeps its place.

Before each round of a deployment the coordinator asks nodes that connected since which
hospital they are (``Coordinator.rediscover``). A hospital whose SuperNode came back
with a new node id (no SuperNode authentication, or a new key) takes its old place: the
same record of rounds, ledger and state, under the new id. A second node claiming a
hospital whose first node is still connected is not believed.

The deployment test restarts a crashed SuperNode with its own key, which Flower lets in
under its old node id, so this path needs its own test; the replies here are the
messages a hospital's app sends (``client.app``), handed over by a grid without network.
"""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from common import messages as M
from common.messages import NodeMode, ReplyState
from server.coordinator import HospitalView
from tests.conftest import ReplayGrid, coordinator_for, small_cfg


@pytest.fixture(autouse=True)
def _identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # what a ServerApp process sets
    yield


def _identity_reply(node_id: int, hospital: str) -> Message:
    """What a hospital's app answers to the coordinator's "who are you" query."""
    request = Message(RecordDict({M.CONFIG: ConfigRecord({"x": 1})}), dst_node_id=node_id, message_type=MessageType.QUERY)
    status = ConfigRecord({M.HOSPITAL: hospital, M.STATE: ReplyState.READY.value, M.MODE: NodeMode.DEPLOYMENT.value})
    return Message(RecordDict({M.STATUS: status}), reply_to=request)


class ConnectedGrid(ReplayGrid):
    """A grid on which these nodes are connected; only the prepared replies answer."""

    def __init__(self, replies: list[Message], connected: list[int]):
        super().__init__(replies)
        self.connected = connected

    def get_node_ids(self):
        return list(self.connected)


def _coordinator(tmp_path, grid: ReplayGrid):
    coord = coordinator_for(small_cfg(), [], tmp_path)
    coord.grid = grid
    coord.hospitals = {1: HospitalView("a", 1), 3: HospitalView("c", 3)}
    return coord


def test_a_hospital_back_on_a_new_node_takes_its_old_place(tmp_path, caplog):
    grid = ConnectedGrid([_identity_reply(7, "c")], connected=[1, 7])  # c's old node 3 is gone
    coord = _coordinator(tmp_path, grid)
    old_view = coord.hospitals[3]
    with caplog.at_level("INFO"):
        coord.rediscover()
    assert sorted(coord.hospitals) == [1, 7]
    assert coord.hospitals[7] is old_view and old_view.node_id == 7 and old_view.name == "c"
    assert "c rejoined (node 7)" in caplog.text


def test_a_second_node_claiming_a_connected_hospital_is_not_believed(tmp_path, caplog):
    grid = ConnectedGrid([_identity_reply(7, "c")], connected=[1, 3, 7])  # c's node 3 is still here
    coord = _coordinator(tmp_path, grid)
    with caplog.at_level("WARNING"):
        coord.rediscover()
    assert sorted(coord.hospitals) == [1, 3] and coord.hospitals[3].node_id == 3
    assert "two nodes claim hospital 'c'" in caplog.text


def test_nothing_new_connected_asks_nobody(tmp_path):
    class NoSending(ConnectedGrid):
        def push_messages(self, messages):
            raise AssertionError(f"asked {len(list(messages))} node(s) though nothing new connected")

    coord = _coordinator(tmp_path, NoSending([], connected=[1, 3]))
    coord.rediscover()
    assert sorted(coord.hospitals) == [1, 3]
