"""Server-side aggregation rules: Flower 1.42's own strategies, chosen by name.

The coordinator only calls a strategy's ``aggregate_train`` (on replies that passed
validation); node sampling and messaging are the coordinator's, with bounded waits.
FedAdam keeps moments across rounds; ``state_dict``/``load_state_dict`` carry them
through checkpoints so a resumed run continues exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from flwr.app import ArrayRecord, Message
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, Strategy
from flwr.serverapp.strategy.fedopt import FedOpt

from common.config import StrategySection

STRATEGIES: dict[str, Callable[[StrategySection], Strategy]] = {
    "fedavg": lambda s: FedAvg(),
    "fedprox": lambda s: FedProx(proximal_mu=s.proximal_mu),
    "fedadam": lambda s: FedAdam(eta=s.server_lr, eta_l=1.0, beta_1=s.beta_1, beta_2=s.beta_2, tau=s.tau),
}


class Aggregator:
    """A Flower strategy used for aggregation only."""

    def __init__(self, section: StrategySection):
        if section.name not in STRATEGIES:
            raise ValueError(f"unknown strategy {section.name!r}; choose one of {', '.join(STRATEGIES)}")
        self.name = section.name
        self.strategy = STRATEGIES[section.name](section)

    def train_config(self) -> dict:
        """Extra keys the hospitals need (FedProx's proximal term)."""
        if isinstance(self.strategy, FedProx):
            return {"proximal-mu": float(self.strategy.proximal_mu)}
        return {}

    def aggregate(self, server_round: int, current: ArrayRecord, replies: list[Message]) -> ArrayRecord | None:
        if isinstance(self.strategy, FedOpt):
            # What FedOpt.configure_train records; we send messages ourselves.
            self.strategy.current_arrays = {k: a.numpy() for k, a in current.items()}
        arrays, _ = self.strategy.aggregate_train(server_round, replies)
        return arrays

    def state_dict(self) -> dict:
        out = {}
        for key in ("m_t", "v_t"):
            value = getattr(self.strategy, key, None)
            if value is not None:
                out[key] = {k: np.asarray(v) for k, v in value.items()}
        return out

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self.strategy, key, {k: np.asarray(v) for k, v in value.items()})
