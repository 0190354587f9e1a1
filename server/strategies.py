"""Server-side aggregation: Flower 1.42's own strategies, chosen by name.

The coordinator asks the strategy for the round's messages (``configure_train``, on a
view of the grid that shows only the hospitals still training) and hands it the
replies that passed validation (``aggregate_train``). Waiting for nodes, timeouts and
sending stay the coordinator's, so no wait is ever unbounded. FedAdam keeps moments
across rounds; ``state_dict``/``load_state_dict`` carry them through checkpoints so a
resumed run continues exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, Strategy

from common.config import StrategySection

# Every node the coordinator offers takes part: sampling and waiting are its job.
_ALL = {"fraction_train": 1.0, "fraction_evaluate": 0.0, "min_train_nodes": 1, "min_evaluate_nodes": 0, "min_available_nodes": 1}

STRATEGIES: dict[str, Callable[[StrategySection], Strategy]] = {
    "fedavg": lambda s: FedAvg(**_ALL),
    "fedprox": lambda s: FedProx(**_ALL, proximal_mu=s.proximal_mu),
    "fedadam": lambda s: FedAdam(**_ALL, eta=s.server_lr, eta_l=1.0, beta_1=s.beta_1, beta_2=s.beta_2, tau=s.tau),
}


class NodeView:
    """What a strategy sees of the grid: only the given nodes (no waiting)."""

    def __init__(self, node_ids: Iterable[int]):
        self._ids = list(node_ids)

    def get_node_ids(self) -> list[int]:
        return list(self._ids)


class Aggregator:
    """A Flower strategy, driven by the coordinator."""

    def __init__(self, section: StrategySection, wrap: Callable[[Strategy], Strategy] | None = None):
        if section.name not in STRATEGIES:
            raise ValueError(f"unknown strategy {section.name!r}; choose one of {', '.join(STRATEGIES)}")
        self.name = section.name
        self.base = STRATEGIES[section.name](section)
        self.strategy = wrap(self.base) if wrap else self.base

    def messages(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, node_ids: list[int]) -> list[Message]:
        return list(self.strategy.configure_train(server_round, arrays, config, NodeView(node_ids)))

    def aggregate(self, server_round: int, replies: list[Message]) -> ArrayRecord | None:
        arrays, _ = self.strategy.aggregate_train(server_round, replies)
        return arrays

    def state_dict(self) -> dict:
        out = {}
        for key in ("m_t", "v_t"):
            value = getattr(self.base, key, None)
            if value is not None:
                out[key] = {k: np.asarray(v) for k, v in value.items()}
        return out

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self.base, key, {k: np.asarray(v) for k, v in value.items()})
