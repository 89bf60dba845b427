"""Describe your own MoE in one line: where its router and its experts are.

::

    class MyNet(nn.Module):
        moe_spec = MoESpec(router="blocks.*.moe.router", experts="blocks.*.moe.experts")

``router`` and ``experts`` are module paths; ``*`` matches one path component (a layer
index), and a router pairs with the experts whose ``*`` parts are the same. The router's
forward must return the logits ``[..., E]`` from which your MoE picks experts (an
``nn.Linear`` does); masking replaces absent experts' logits by -inf in that output. The
experts are either a container of E modules (``nn.ModuleList``, ``nn.ModuleDict``; child i
is expert i) or one module holding fused ``[E, ...]`` tensors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from fedmoe_flwr.models.adapters.layer import ExpertLayer, HookedLayer


@dataclass(frozen=True)
class MoESpec:
    """Where a model's MoE layers are; see the module doc. ``layer`` picks the ExpertLayer class."""

    router: str
    experts: str
    layer: type[HookedLayer] = HookedLayer


def _pattern(path: str) -> re.Pattern:
    parts = [r"([^.]+)" if p == "*" else re.escape(p) for p in path.split(".")]
    return re.compile(r"^" + r"\.".join(parts) + r"$")


def _held_of(experts: nn.Module):
    return getattr(experts, "_fedmoe_held", None)


def expert_layer(
    name: str, router_path: str, router: nn.Module, experts_path: str, experts: nn.Module, cls=HookedLayer
) -> ExpertLayer:
    """Build the layer description for a router module and an experts module."""
    rows = {n: t.shape[0] for n, t in router.state_dict().items() if t.dim() >= 1}
    if not rows:
        raise ValueError(f"{name}: router {router_path!r} has no tensor whose rows could be per-expert")
    num_experts = max(rows.values(), key=list(rows.values()).count)  # the common first dimension
    router_tensors = tuple(f"{router_path}.{n}" for n, r in rows.items() if r == num_experts)
    children = list(experts.named_children())
    held = _held_of(experts)
    if len(children) == num_experts:
        per_expert = tuple(
            tuple(f"{experts_path}.{c}.{n}" for n in child.state_dict()) for c, child in children
        )
        return cls(name, num_experts, router, router_tensors, experts=per_expert, held=held, holder=experts)
    local_e = num_experts if held is None else len(held)
    fused = tuple(
        f"{experts_path}.{n}" for n, t in experts.state_dict(keep_vars=True).items() if t.dim() >= 1 and t.shape[0] == local_e
    )
    if not fused:
        raise ValueError(
            f"{name}: experts {experts_path!r} is neither a container of {num_experts} expert modules "
            f"(it has {len(children)} children) nor a module of fused [{num_experts}, ...] tensors"
        )
    return cls(name, num_experts, router, router_tensors, fused=fused, held=held, holder=experts)


def find_spec_layers(model: nn.Module, specs) -> list[ExpertLayer]:
    """The layers ``specs`` (one :class:`MoESpec` or a list) describe, in module order."""
    specs = [specs] if isinstance(specs, MoESpec) else list(specs)
    modules = dict(model.named_modules())
    found: list[tuple[str, ExpertLayer]] = []
    for spec in specs:
        if not isinstance(spec, MoESpec):
            raise TypeError(f"moe_spec entries must be MoESpec, got {type(spec).__name__}")
        r_pat, e_pat = _pattern(spec.router), _pattern(spec.experts)
        routers = {m.groups(): n for n in modules if (m := r_pat.match(n))}
        experts = {m.groups(): n for n in modules if (m := e_pat.match(n))}
        if not routers or set(routers) != set(experts):
            raise ValueError(
                f"MoESpec(router={spec.router!r}, experts={spec.experts!r}) matches routers "
                f"{sorted(routers.values())[:4]} and experts {sorted(experts.values())[:4]} in "
                f"{type(model).__name__}; each router needs its experts (see docs/models.md#adapters)"
            )
        for key, r_name in routers.items():
            e_name = experts[key]
            layer = expert_layer(e_name.rsplit(".", 1)[0], r_name, modules[r_name], e_name, modules[e_name], spec.layer)
            found.append((r_name, layer))
    order = {n: i for i, n in enumerate(modules)}
    return [layer for r_name, layer in sorted(found, key=lambda x: order[x[0]])]
