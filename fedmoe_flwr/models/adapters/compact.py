"""Compact models: a client holding k of E experts allocates only those k.

:func:`build_compact` builds the model with every *parameter* on the ``meta`` device (no
memory; buffers stay real, so non-persistent ones such as rotary frequencies keep their
values), then allocates only what the client holds:

* shared tensors and routers in full (a router's rows are small; absent rows are masked);
* per-expert modules of held experts; absent experts stay on ``meta`` and are never called,
  because no token routes to them;
* fused ``[E, ...]`` tensors as ``[k, ...]``: slot i holds global expert ``held[i]``, and
  the router's top-k indices are translated to slots (:meth:`TopKRouterLayer.remap`).

The layout of a compact model is that of the full model (same names and byte sizes), so
the server needs no change; its wire state holds only the tensors present.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from fedmoe_flwr.layout import parse_expert_key
from fedmoe_flwr.models.adapters.layer import TopKRouterLayer
from fedmoe_flwr.models.adapters.model import ModelExperts, model_experts
from fedmoe_flwr.models.moe import UnknownExpertError

HELD_ATTR = "_fedmoe_held"


@contextmanager
def parameters_on_meta():
    """Every parameter registered inside the block lands on ``meta``; buffers stay real.

    (The approach of accelerate's ``init_empty_weights(include_buffers=False)``.) A
    parameter's CPU storage exists only between ``torch.empty`` and its registration and is
    never written, so its pages are never touched.
    """
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _held_per_layer(keys: Iterable[str], experts: ModelExperts) -> list[list[int]]:
    if isinstance(keys, str):
        raise TypeError("keys must be an iterable of expert keys, not one string")
    held: list[set[int]] = [set() for _ in experts.layers]
    for key in keys:
        l, e = parse_expert_key(key)
        if l >= len(held) or e >= experts.layers[l].num_experts:
            raise UnknownExpertError(
                f"unknown expert key {key!r}: model has {len(held)} MoE layers with "
                f"{[layer.num_experts for layer in experts.layers]} experts"
            )
        held[l].add(e)
    empty = [l for l, h in enumerate(held) if not h]
    if empty:
        raise ValueError(f"MoE layer(s) {empty} would hold no expert; every layer needs at least one to route tokens")
    return [sorted(h) for h in held]


def _materialise(model: nn.Module, absent: set[str], fused_rows: dict[str, int]) -> None:
    """Replace meta parameters by zero tensors, except absent experts'; keeps ties."""
    new_of: dict[int, nn.Parameter] = {}
    for prefix, module in model.named_modules():
        for pname, p in list(module._parameters.items()):
            name = f"{prefix}.{pname}" if prefix else pname
            if p is None or not p.is_meta or name in absent:
                continue
            if id(p) not in new_of:
                shape = (fused_rows[name], *p.shape[1:]) if name in fused_rows else p.shape
                new_of[id(p)] = nn.Parameter(torch.zeros(shape, dtype=p.dtype), requires_grad=p.requires_grad)
            module._parameters[pname] = new_of[id(p)]


def build_compact(
    factory: Callable[[], nn.Module], keys: Iterable[str], tensors: Mapping[str, torch.Tensor] | None = None
) -> nn.Module:
    """``factory()`` holding only experts ``keys``; loads ``tensors`` (a wire state) if given.

    Tensors present but not given stay zero: pass what the server sent (shared + the
    held experts). Raises ValueError on unknown keys, a layer left without an expert, or
    fused experts behind a router that only returns logits (its indices cannot be remapped).
    """
    with parameters_on_meta():
        model = factory()
    experts = model_experts(model)
    held = _held_per_layer(keys, experts)
    absent: set[str] = set()
    fused_rows: dict[str, int] = {}
    for layer, h in zip(experts.layers, held):
        if layer.fused and not isinstance(layer, TopKRouterLayer):
            raise ValueError(
                f"{layer.name}: fused experts can be compacted only behind a router returning expert "
                f"indices (TopKRouterLayer); build this model in full (docs/models.md#memory)"
            )
        absent.update(n for e in range(layer.num_experts) if e not in h for n in layer.experts[e])
        fused_rows.update((n, len(h)) for n in layer.fused)
        setattr(layer.holder, HELD_ATTR, tuple(h))
        if layer.fused and hasattr(layer.holder, "num_experts"):
            layer.holder.num_experts = len(h)  # transformers' experts loop over their own rows
    _materialise(model, absent, fused_rows)
    compact = model_experts(model)
    for layer, h in zip(compact.layers, held):
        if layer.fused:
            local = torch.full((layer.num_experts,), -1, dtype=torch.long)
            local[h] = torch.arange(len(h))
            layer.set_local_index(local)
    if tensors is not None:
        compact.load_wire(tensors)
    compact.set_active(None)  # route among the held experts only
    return model


def resident_nbytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers actually allocated (meta ones excluded)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_meta or id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total
