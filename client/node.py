"""A hospital's own settings, from its SuperNode's ``--node-config``.

Deployment keys (all strings unless noted):

    hospital       the hospital's name, as reports show it
    data-path      PhysioNet folder/.tar.gz or long-format CSV of its stays
    outcomes-path  its outcomes file (PhysioNet Outcomes-*.txt or stay_id,label CSV)
    data-format    physionet2012 | long_csv (default: the experiment's)
    ledger-path    its privacy ledger (created with `fedgru ledger init`)
    max-epsilon    (number) its privacy budget; the stricter of this and the
                   experiment's budget applies
    device         cpu | cuda | auto

A simulated node has only Flower's ``partition-id`` / ``num-partitions``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NodeSettings:
    deployed: bool
    hospital: str = ""
    ledger_path: str = ""
    max_epsilon: float = 0.0  # 0: the experiment's budget alone
    device: str = ""

    @classmethod
    def from_node_config(cls, node_config: dict) -> NodeSettings:
        deployed = "data-path" in node_config
        max_eps = node_config.get("max-epsilon", 0.0)
        return cls(
            deployed=deployed,
            hospital=str(node_config.get("hospital", "")),
            ledger_path=str(node_config.get("ledger-path", "")),
            max_epsilon=float(max_eps) if str(max_eps) else 0.0,
            device=str(node_config.get("device", "")),
        )

    def budget(self, experiment_budget: float) -> float:
        """The stricter of the hospital's own budget and the experiment's."""
        return min(experiment_budget, self.max_epsilon) if self.max_epsilon > 0 else experiment_budget
