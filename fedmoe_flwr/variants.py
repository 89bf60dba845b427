"""Which model a strategy trains: the MoE, its dense twin, or the dense peers of the MoE.

The capacity-bound comparison (docs/architecture.md#strategies) needs three dense models
beside the MoE, all derived from the same ``model`` config and fleet:

| variant       | FFN hidden width per block                     | who uses it                          |
|---------------|------------------------------------------------|--------------------------------------|
| ``moe``       | ``num_experts`` experts of ``d_hidden``        | aligned, flex, greedy, random, full, rolling |
| ``dense``     | ``d_hidden * top_k`` (same active parameters)  | dense                                |
| ``dense-small`` | what the smallest device holds: ``(k_min // L) * d_hidden`` | dense-small          |
| ``dense-large`` | the MoE's total: ``num_experts * d_hidden``  | dense-large-exclusive, heterofl, fjord, fedrolex |

``k_min`` is the smallest tier's expert count and ``L`` the number of MoE layers: a device
that holds ``k_min`` experts holds ``k_min // L`` per layer (the assignment splits a
budget evenly over layers), so the dense-small model fits in the same bytes. A shared
expert, when configured, is a shared tensor of every variant and adds ``d_hidden``.
Nothing here imports torch.
"""

from __future__ import annotations

VARIANTS = ("moe", "dense", "dense-small", "dense-large")
STRATEGY_VARIANT = {
    "dense": "dense",
    "dense-small": "dense-small",
    "dense-large-exclusive": "dense-large",
    "heterofl": "dense-large",
    "fjord": "dense-large",
    "fedrolex": "dense-large",
}
"""Strategies that do not train the MoE, and the model they train (every other: ``moe``)."""


def strategy_variant(strategy_name: str) -> str:
    """The variant a strategy trains (``moe`` unless :data:`STRATEGY_VARIANT` names it)."""
    return STRATEGY_VARIANT.get(str(strategy_name), "moe")


def num_moe_layers(model_name: str, n_layer: int, num_moe_layers_mlp: int) -> int:
    """MoE layers of a zoo model: one per block of the LM, ``num_moe_layers`` of the MLP, 1 of the CNN."""
    return {"moe_lm": n_layer, "moe_mlp": num_moe_layers_mlp}.get(str(model_name), 1)


def smallest_expert_count(tiers, num_expert_keys: int) -> int:
    """Experts (over all layers) the smallest tier holds; ``-1`` in a tier means all."""
    if not tiers:
        return num_expert_keys
    return min(num_expert_keys if t.max_experts < 0 else min(int(t.max_experts), num_expert_keys) for t in tiers)


def variant_ffn(variant: str, *, num_experts: int, d_hidden: int, top_k: int, shared_expert: bool,
                layers: int, k_min: int) -> dict:
    """Model kwargs (``dense``, ``d_hidden``, ``top_k``, ``shared_expert``) of a variant.

    Raises ValueError on an unknown variant, or when the smallest device cannot hold one
    expert per MoE layer (there is then no MoE it could train either).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown model variant {variant!r}; allowed: {list(VARIANTS)}")
    if variant == "moe":
        return dict(dense=False, d_hidden=d_hidden, top_k=top_k, shared_expert=shared_expert)
    if variant == "dense":
        return dict(dense=True, d_hidden=d_hidden, top_k=top_k, shared_expert=shared_expert)
    extra = d_hidden if shared_expert else 0
    if variant == "dense-large":
        return dict(dense=True, d_hidden=num_experts * d_hidden + extra, top_k=1, shared_expert=False)
    per_layer = k_min // max(layers, 1)
    if per_layer < 1:
        raise ValueError(f"the smallest device holds {k_min} experts, fewer than one per MoE layer ({layers} layers): "
                         "give its tier a larger max_experts")
    return dict(dense=True, d_hidden=per_layer * d_hidden + extra, top_k=1, shared_expert=False)
