"""fedmoe_flwr's own :class:`~fedmoe_flwr.models.moe.MoELayer` as an :class:`ExpertLayer`.

Names, order and masking are exactly those the layer always had: experts are the modules
``<layer>.experts.<e>``, the router ``<layer>.router`` (weight and bias rows), masking goes
through the layer's own ``active`` buffer, tokens come from its ``last`` statistics (so
``force_uniform_routing`` is honoured).
"""

from __future__ import annotations

import torch
from torch import nn

from fedmoe_flwr.models.adapters.layer import ExpertLayer
from fedmoe_flwr.models.moe import MoELayer


class FedMoELayer(ExpertLayer):
    """An :class:`ExpertLayer` over one ``MoELayer`` module."""

    def __init__(self, prefix: str, layer: MoELayer):
        pre = f"{prefix}." if prefix else ""
        super().__init__(
            name=prefix or type(layer).__name__,
            num_experts=layer.num_experts,
            router=layer.router,
            router_tensors=tuple(f"{pre}router.{n}" for n in layer.router.state_dict()),
            experts=tuple(
                tuple(f"{pre}experts.{e}.{n}" for n in expert.state_dict()) for e, expert in enumerate(layer.experts)
            ),
            held=getattr(layer, "_fedmoe_held", None),
            holder=layer,
        )
        self.module = layer

    def set_active(self, mask):
        self.module.set_active(mask)

    def watch_logits(self, fn):
        return self.router.register_forward_hook(lambda _m, _i, out: fn(out.detach().reshape(-1, out.shape[-1])))

    def watch_tokens(self, fn):
        def hook(module, _inp, _out):
            if module.training and module.last is not None:
                fn(module.last.tokens_per_expert.to(torch.float64))

        return self.module.register_forward_hook(hook)


def find_fedmoe_layers(model: nn.Module) -> list[ExpertLayer]:
    """Every ``MoELayer`` in ``named_modules()`` order (the order of ``moe_layers``)."""
    return [FedMoELayer(name, m) for name, m in model.named_modules() if isinstance(m, MoELayer)]
