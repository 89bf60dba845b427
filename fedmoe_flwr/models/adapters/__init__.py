"""Expert adapters: federate any MoE model (fedmoe's own, your own, Hugging Face).

See docs/models.md#adapters. :func:`model_experts` finds a model's MoE layers; the rest of
fedmoe_flwr (layouts, slicing, the client helper) goes through it.
"""

from fedmoe_flwr.models.adapters.layer import ExpertLayer, HookedLayer, TopKRouterLayer, parse_wire_name, wire_name
from fedmoe_flwr.models.adapters.model import (
    DENSE_ATTR,
    ModelExperts,
    NoMoELayerError,
    count_tokens,
    find_layers,
    load_wire,
    mask_experts,
    model_experts,
    router_logits,
    set_active_experts,
    to_wire,
)
from fedmoe_flwr.models.adapters.spec import MoESpec

__all__ = [
    "DENSE_ATTR",
    "ExpertLayer",
    "HookedLayer",
    "ModelExperts",
    "MoESpec",
    "NoMoELayerError",
    "TopKRouterLayer",
    "count_tokens",
    "set_active_experts",
    "find_layers",
    "load_wire",
    "mask_experts",
    "model_experts",
    "parse_wire_name",
    "router_logits",
    "to_wire",
    "wire_name",
]
