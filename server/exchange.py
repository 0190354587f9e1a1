"""Sending messages to hospitals and pairing their replies with the nodes they are about."""

from __future__ import annotations

import time

from flwr.app import Message
from flwr.serverapp import Grid

REPLY_POLL_S = 0.2  # how often the coordinator looks for hospitals' replies (Flower's own loop: 3 s)


def node_of(reply: Message, sent: dict[str, int]) -> int:
    """The node a reply is about: the one its instruction went to. An error the SuperLink
    writes itself (say, "node unavailable" for a crashed hospital) comes from the
    SuperLink's own id, so it is matched to its instruction by the id it answers."""
    answers = reply.metadata.reply_to_message_id
    return sent.get(answers, reply.metadata.src_node_id) if answers else reply.metadata.src_node_id


def exchange(grid: Grid, messages: list[Message], timeout: float) -> list[tuple[int, Message]]:
    """Send, wait up to ``timeout`` seconds, and pair every reply with the node it is about.

    Flower's ``Grid.send_and_receive`` looks for replies every 3 s, so a deployed round
    waited up to 3 s after the last hospital had answered; replies are looked for here
    every ``REPLY_POLL_S`` instead (one light call to the SuperLink each)."""
    if not messages:
        return []
    deadline = time.monotonic() + timeout
    waiting = set(grid.push_messages(messages))
    sent = {m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id}
    replies: list[Message] = []
    while waiting:
        found = list(grid.pull_messages(waiting))
        replies += found
        waiting -= {r.metadata.reply_to_message_id for r in found}
        if not waiting or time.monotonic() >= deadline:
            break
        time.sleep(REPLY_POLL_S)
    return [(node_of(reply, sent), reply) for reply in replies]
