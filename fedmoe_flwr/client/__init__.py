"""Client side: the ready ClientApp and the helper that makes a user's ClientApp expert-aware."""

from fedmoe_flwr.client.helper import (
    CAPACITY_KEYS,
    assigned_experts,
    count_tokens,
    expert_evaluate,
    expert_probe,
    expert_train,
    load_assigned,
    node_profile,
)

__all__ = ["CAPACITY_KEYS", "assigned_experts", "count_tokens", "expert_evaluate", "expert_probe", "expert_train",
           "load_assigned", "node_profile"]
