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
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from flwr.serverapp import PrivacyConfig, RdpAccountant
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedProx,
    Strategy,
)
from flwr.supercore.privacy_accounting import NeighboringRelation, SamplingMethod

from common import messages as M
from common.config import HospitalDPSection, StrategySection

from .records import HospitalLevelPrivacy

# Every node the coordinator offers takes part: sampling and waiting are its job.
_ALL = {"fraction_train": 1.0, "fraction_evaluate": 0.0, "min_train_nodes": 1, "min_evaluate_nodes": 0, "min_available_nodes": 1}

STRATEGIES: dict[str, Callable[..., Strategy]] = {
    "fedavg": lambda s, **kw: FedAvg(**_ALL, **kw),
    "fedprox": lambda s, **kw: FedProx(**_ALL, **kw, proximal_mu=s.proximal_mu),
    # FedAvgM (Hsu et al. 2019, arXiv:1909.06335): server SGD with momentum on the averaged
    # update; post-processing of what the hospitals released, so free under DP.
    "fedavgm": lambda s, **kw: FedAvgM(**_ALL, **kw, server_learning_rate=s.server_lr, server_momentum=s.server_momentum),
    "fedadam": lambda s, **kw: FedAdam(**_ALL, **kw, eta=s.server_lr, eta_l=1.0, beta_1=s.beta_1, beta_2=s.beta_2, tau=s.tau),
}


HOSPITAL_LEVEL_GUARANTEE = (
    "hospital-level (epsilon, delta)-DP: whether any one hospital took part changes the released global "
    "models only within this bound. It holds against everyone who sees the global models, but not against "
    "the coordinator, which sees each hospital's clipped update."
)


class NodeView:
    """What a strategy sees of the grid: only the given nodes (no waiting)."""

    def __init__(self, node_ids: Iterable[int]):
        self._ids = list(node_ids)

    def get_node_ids(self) -> list[int]:
        return list(self._ids)


class Aggregator:
    """A Flower strategy, driven by the coordinator; optionally wrapped in Flower's
    hospital-level DP (server-side fixed clipping) with its RDP accountant."""

    def __init__(self, section: StrategySection, hospital_dp: HospitalDPSection | None = None, hospitals: int = 1):
        if section.name not in STRATEGIES:
            raise ValueError(f"unknown strategy {section.name!r}; choose one of {', '.join(STRATEGIES)}")
        self.name = section.name
        dp = hospital_dp if hospital_dp is not None and hospital_dp.enabled else None
        self.hospital_dp = dp
        # Hospital-level DP accounting assumes an unweighted mean of the updates.
        self.base = STRATEGIES[section.name](section, **({"weighted_by_key": M.UNIT_WEIGHT} if dp else {}))
        self.strategy: Strategy = self.base
        self.accountant = None
        if dp is not None:
            self.accountant = RdpAccountant(
                PrivacyConfig(
                    target_delta=dp.delta,
                    population_size=max(hospitals, 1),
                    neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                    sampling_method=SamplingMethod.NO_AMPLIFICATION,
                    max_epsilon=dp.max_epsilon or None,
                )
            )
            self.strategy = DifferentialPrivacyServerSideFixedClipping(
                self.base, dp.noise_multiplier, dp.clipping_norm, max(hospitals, 1), accountant=self.accountant
            )

    def messages(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, node_ids: list[int]) -> list[Message]:
        """The round's training messages. Raises PrivacyBudgetExhausted when hospital-level
        DP has no budget for another release."""
        if isinstance(self.strategy, DifferentialPrivacyServerSideFixedClipping):
            self.strategy.num_sampled_clients = len(node_ids)  # noise scales with who takes part
        return list(self.strategy.configure_train(server_round, arrays, config, NodeView(node_ids)))

    def hospital_privacy(self) -> HospitalLevelPrivacy | None:
        """What hospital-level DP has spent so far (None when it is off)."""
        if self.accountant is None or self.hospital_dp is None:
            return None
        spent = self.accountant.get_privacy_spent()
        hd = self.hospital_dp
        return HospitalLevelPrivacy(
            epsilon=spent.epsilon, delta=spent.delta, releases=spent.num_releases,
            noise_multiplier=hd.noise_multiplier, clipping_norm=hd.clipping_norm, max_epsilon=hd.max_epsilon or None,
            accountant="Flower RdpAccountant (no sampling amplification)", guarantee=HOSPITAL_LEVEL_GUARANTEE,
        )

    def aggregate(self, server_round: int, replies: list[Message]) -> ArrayRecord | None:
        arrays, _ = self.strategy.aggregate_train(server_round, replies)
        return arrays

    def state_dict(self) -> dict:
        out = {}
        for key in ("m_t", "v_t"):  # FedAdam's moments
            value = getattr(self.base, key, None)
            if value is not None:
                out[key] = {k: np.asarray(v) for k, v in value.items()}
        if isinstance(self.base, FedAvgM):  # its momentum (a list in key order) and the model it moves
            if self.base.current_arrays is not None:
                keys = list(self.base.current_arrays.keys())
                out["current_arrays"] = {k: v.numpy() for k, v in self.base.current_arrays.items()}
                if self.base.momentum_vector is not None:
                    out["momentum_vector"] = dict(zip(keys, map(np.asarray, self.base.momentum_vector), strict=True))
        return out

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            if key == "current_arrays":
                self.base.current_arrays = ArrayRecord({k: Array(np.asarray(v)) for k, v in value.items()})
            elif key == "momentum_vector":
                self.base.momentum_vector = [np.asarray(v) for v in value.values()]
            else:
                setattr(self.base, key, {k: np.asarray(v) for k, v in value.items()})
