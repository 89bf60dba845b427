"""LoRA on held experts and shared layers: only the low-rank adapters (and routers) travel.

:func:`apply_lora` adds ``W + (alpha / r) * B @ A`` to every expert weight matrix (per-expert
modules' ``nn.Linear`` weights and fused ``[E, out, in]`` tensors alike, through
``torch.nn.utils.parametrize``) and to shared ``nn.Linear`` layers whose name ends with one
of ``shared_targets`` (e.g. attention ``q_proj``/``v_proj``). Base weights are frozen;
routers stay trainable (they decide which expert learns what, and are small). It then marks
the model so that its wire state holds only trainable tensors:

* a fused weight's adapters are fused too (``A [E, r, in]``, ``B [E, out, r]``), so they
  travel per expert as ``".../parametrizations/gate_up_proj.0.lora_A/E3"``-style rows;
* a per-expert module's adapters belong to that expert; shared adapters are shared.

Every client must start from the same base weights (the pretrained checkpoint, loaded
locally); the server sends the adapters. Aggregating A and B separately is biased
(mean(B) mean(A) != mean(B A)); the strategies aggregate the layout's ``lora_pairs`` by the
product average re-factorised at rank r (FlexLoRA-style, :mod:`fedmoe_flwr.core.lora`).
See docs/models.md#lora.

Fused adapters are recomputed at each access of the parametrized tensor (transformers'
expert loop indexes it once per expert): wrap forward and backward in
``torch.nn.utils.parametrize.cached()`` to compute them once per step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.utils import parametrize

from fedmoe_flwr.core.lora import lora_pairs  # noqa: F401 - re-exported: {A name: B name}
from fedmoe_flwr.models.adapters.model import model_experts

WIRE_ATTR = "fedmoe_wire"  # "trainable": the wire state holds only tensors that require grad


class LoRADelta(nn.Module):
    """Parametrization ``W -> W + scale * B @ A`` for ``W`` of shape ``[*batch, out, in]``."""

    def __init__(self, weight: torch.Tensor, rank: int, alpha: float):
        super().__init__()
        *batch, out, inp = weight.shape
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(*batch, rank, inp, dtype=weight.dtype, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(*batch, out, rank, dtype=weight.dtype, device=weight.device))
        if not self.lora_A.is_meta:
            nn.init.kaiming_uniform_(self.lora_A.view(-1, inp), a=math.sqrt(5))  # as peft: B = 0, so W is unchanged

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.scale * (self.lora_B @ self.lora_A)


def _targets(model: nn.Module, shared_targets: Iterable[str]) -> list[tuple[nn.Module, str]]:
    """(module, parameter name) of every expert weight matrix and shared target Linear."""
    experts = model_experts(model)
    out: list[tuple[nn.Module, str]] = []
    expert_names = set()
    for layer in experts.layers:
        expert_names.update(n for e in range(layer.num_experts) for n in layer.experts[e])
        expert_names.update(layer.fused)
    suffixes = tuple(shared_targets)
    for prefix, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            name = f"{prefix}.{pname}" if prefix else pname
            if p.dim() < 2 or p.is_meta:
                continue
            if name in expert_names or (isinstance(module, nn.Linear) and pname == "weight" and prefix.endswith(suffixes)):
                out.append((module, pname))
    return out


def apply_lora(
    model: nn.Module, rank: int = 8, alpha: float = 16.0, shared_targets: Iterable[str] = ("q_proj", "v_proj"),
    train_routers: bool = True, seed: int = 0,
) -> nn.Module:
    """Add LoRA adapters to ``model`` in place (see the module doc); returns it.

    ``seed`` fixes the A initialisation (the server's global adapters are what clients
    receive anyway). Absent experts of a compact model get no adapter.
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    routers = [t for layer in model_experts(model).layers for t in layer.router_tensors]
    targets = _targets(model, shared_targets)
    for p in model.parameters():
        p.requires_grad_(False)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for module, pname in targets:
            parametrize.register_parametrization(module, pname, LoRADelta(getattr(module, pname), rank, alpha))
    finally:
        torch.random.set_rng_state(gen_state)
    for module, pname in targets:
        getattr(module.parametrizations, pname).original.requires_grad_(False)
    if train_routers:
        for name in routers:
            model.get_parameter(_parametrized_name(model, name)).requires_grad_(True)
    setattr(model, WIRE_ATTR, "trainable")
    return model


def _parametrized_name(model: nn.Module, name: str) -> str:
    """A state name as a parameter path (a parametrized weight's base is ``...original``)."""
    prefix, _, pname = name.rpartition(".")
    module = model.get_submodule(prefix) if prefix else model
    if parametrize.is_parametrized(module, pname):
        return f"{prefix}.parametrizations.{pname}.original"
    return name
