"""Hugging Face transformers (5.x) MoE families, found by their block classes.

| family            | block class                  | router              | experts                      |
|-------------------|------------------------------|---------------------|------------------------------|
| Mixtral           | MixtralSparseMoeBlock        | ``gate`` (top-k)    | fused ``gate_up_proj``, ``down_proj`` [E, ...] |
| Qwen2-MoE         | Qwen2MoeSparseMoeBlock       | ``gate`` (top-k)    | fused; ``shared_expert`` (+ its gate) stays shared |
| Qwen3-MoE         | Qwen3MoeSparseMoeBlock       | ``gate`` (top-k)    | fused                        |
| OLMoE             | OlmoeSparseMoeBlock          | ``gate`` (top-k)    | fused                        |
| SwitchTransformers| SwitchTransformersSparseMLP  | ``router.classifier`` (logits) | ``experts.expert_<e>`` modules |

Other blocks with a ``gate`` child whose class name ends in ``TopKRouter`` and an
``experts`` child (the transformers 5.x pattern) are matched by structure; only the
families above are tested. Nothing here imports transformers: classes match by name.
"""

from __future__ import annotations

from torch import nn

from fedmoe_flwr.models.adapters.layer import ExpertLayer, HookedLayer, TopKRouterLayer
from fedmoe_flwr.models.adapters.spec import expert_layer

# block class name -> (router child path, experts child path, layer class)
HF_BLOCKS: dict[str, tuple[str, str, type[HookedLayer]]] = {
    "MixtralSparseMoeBlock": ("gate", "experts", TopKRouterLayer),
    "Qwen2MoeSparseMoeBlock": ("gate", "experts", TopKRouterLayer),
    "Qwen3MoeSparseMoeBlock": ("gate", "experts", TopKRouterLayer),
    "OlmoeSparseMoeBlock": ("gate", "experts", TopKRouterLayer),
    "SwitchTransformersSparseMLP": ("router.classifier", "experts", HookedLayer),
}


def _block_kind(module: nn.Module) -> tuple[str, str, type[HookedLayer]] | None:
    kind = HF_BLOCKS.get(type(module).__name__)
    if kind is not None:
        return kind
    gate, experts = getattr(module, "gate", None), getattr(module, "experts", None)
    if isinstance(gate, nn.Module) and isinstance(experts, nn.Module) and type(gate).__name__.endswith("TopKRouter"):
        return "gate", "experts", TopKRouterLayer
    return None


def find_hf_layers(model: nn.Module) -> list[ExpertLayer]:
    """Every recognised transformers MoE block, in ``named_modules()`` order."""
    layers = []
    for name, module in model.named_modules():
        kind = _block_kind(module)
        if kind is None:
            continue
        r_path, e_path, cls = kind
        pre = f"{name}." if name else ""
        router, experts = module.get_submodule(r_path), module.get_submodule(e_path)
        layers.append(expert_layer(name, pre + r_path, router, pre + e_path, experts, cls))
    return layers
