"""``--node-config`` for SuperNodes that mirror the simulated fleet of a config.

A real device declares its capacity in its ``node_config`` (see
:mod:`fedmoe_flwr.client.app`): ``client-id``, ``partition-id``, ``memory-mb`` (memory for
the whole model; the expert budget is that minus the shared tensors) and optionally
``samples-per-s``, ``uplink-Bps``, ``downlink-Bps``, ``reliability``. :func:`fleet_node_configs`
gives each partition of a config the values its simulated device has, so a deployment
and a simulation of the same config assign the same experts.

    python -m fedmoe_flwr.deploy.nodes dataset.num_clients=3   # one --node-config per line
"""

from __future__ import annotations

import sys

from fedmoe_flwr import protocol as P
from fedmoe_flwr.config import Config
from fedmoe_flwr.fleet import device_profile


def fleet_node_configs(cfg: Config, *, speeds: bool = True) -> list[dict]:
    """One ``node_config`` per partition: the simulated device of ``cfg.fleet`` as declared values.

    ``memory-mb`` is exact: ``(shared + expert budget) / 2**20`` is a binary fraction, so
    the node recovers the simulated budget to the byte. ``speeds`` adds the tier's nominal
    speeds and reliability as declared values.
    """
    from fedmoe_flwr.experiment import experiment_for

    cfg, _, _, layout = experiment_for(cfg)
    tiers = list(cfg.fleet.tiers)
    expert_bytes = max((layout.expert_nbytes(k) for k in layout.expert_keys), default=0)
    n = cfg.dataset.num_clients
    out = []
    for pid in range(n):
        dev = device_profile(pid, n, tiers, cfg.seed, expert_bytes, len(layout.expert_keys))
        node = {
            "client-id": str(pid),
            "partition-id": pid,
            "memory-mb": (layout.shared_nbytes + dev.expert_memory_bytes) / 2**20,
        }
        if speeds:
            node.update({P.SAMPLES_PER_S: dev.samples_per_s, P.UPLINK: dev.uplink_Bps,
                         P.DOWNLINK: dev.downlink_Bps, P.RELIABILITY: dev.reliability})
        out.append(node)
    return out


def main(argv: list[str] | None = None) -> int:
    from fedmoe_flwr.deploy.app_config import quickstart_config
    from fedmoe_flwr.deploy.commands import node_config_arg

    cfg = quickstart_config(list(argv if argv is not None else sys.argv[1:]))
    for node in fleet_node_configs(cfg):
        print(f"--node-config '{node_config_arg(node)}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
