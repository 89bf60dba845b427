"""A whole model's experts: discovery, the wire state, masking and per-expert statistics.

:func:`model_experts` finds a model's MoE layers with the first adapter that matches:

1. a ``moe_spec`` attribute on the model (:class:`~fedmoe_flwr.models.adapters.spec.MoESpec`);
2. fedmoe_flwr's own ``MoELayer`` modules;
3. Hugging Face transformers MoE blocks (``adapters.hf``).

A model where none matches raises :class:`NoMoELayerError` (a dense model federated as if
it had experts would silently be FedAvg); a model that is dense on purpose says so with
``model.fedmoe_dense = True`` (the zoo's dense twins do).

The *wire state* is what travels: the model's ``state_dict`` with every fused ``[E, ...]``
tensor replaced by its rows ``"<name>/E<e>"`` (views, no copy). Names of models without
fused tensors are unchanged, so for them the wire state is the ``state_dict``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from fedmoe_flwr.core.lora import lora_pairs
from fedmoe_flwr.layout import ParamLayout, expert_key, parse_expert_key
from fedmoe_flwr.models.adapters.fedmoe import find_fedmoe_layers
from fedmoe_flwr.models.adapters.hf import find_hf_layers
from fedmoe_flwr.models.adapters.layer import ExpertLayer, parse_wire_name, wire_name
from fedmoe_flwr.models.adapters.spec import find_spec_layers
from fedmoe_flwr.models.moe import UnknownExpertError

DOCS = "docs/models.md#adapters"
SPEC_ATTR = "moe_spec"
DENSE_ATTR = "fedmoe_dense"
WIRE_ATTR = "fedmoe_wire"  # "trainable" (set by adapters.lora): only tensors that require grad travel


class NoMoELayerError(ValueError):
    """No adapter found a MoE layer in a model that does not declare itself dense."""


def find_layers(model: nn.Module) -> list[ExpertLayer]:
    """The model's MoE layers (list index = layer in expert keys); see the module doc."""
    spec = getattr(model, SPEC_ATTR, None)
    if spec is not None:
        return find_spec_layers(model, spec)
    layers = find_fedmoe_layers(model) or find_hf_layers(model)
    if layers or getattr(model, DENSE_ATTR, False):
        return layers
    raise NoMoELayerError(
        f"no MoE layer found in {type(model).__name__}: fedmoe_flwr knows its own MoELayer and "
        f"Hugging Face Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE and SwitchTransformers blocks. Describe "
        f"your own with `moe_spec = MoESpec(router=..., experts=...)` on the model, or set "
        f"`model.fedmoe_dense = True` to train it as a dense model (see {DOCS})"
    )


class ModelExperts:
    """A model with its MoE layers found; every method reads the model's current tensors."""

    def __init__(self, model: nn.Module, layers: list[ExpertLayer]):
        self.model, self.layers = model, layers
        self._fused = {n: (l, layer) for l, layer in enumerate(layers) for n in layer.fused}
        self.trainable_only = getattr(model, WIRE_ATTR, None) == "trainable"

    def _state(self):
        """(name, tensor) of the model's state that travels (all, or the trainable part)."""
        for n, t in self.model.state_dict(keep_vars=True).items():
            if not self.trainable_only or (isinstance(t, nn.Parameter) and t.requires_grad):
                yield n, t

    # --- names and shapes ------------------------------------------------------------

    def wire_shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Every wire name (absent experts of a compact model included) -> (shape, dtype)."""
        out: dict[str, tuple[tuple[int, ...], torch.dtype]] = OrderedDict()
        for n, t in self._state():
            if n in self._fused:
                row = tuple(t.shape[1:])
                out.update((wire_name(n, e), (row, t.dtype)) for e in range(self._fused[n][1].num_experts))
            else:
                out[n] = (tuple(t.shape), t.dtype)
        return out

    def layout(self) -> ParamLayout:
        """Which wire names belong to which expert, and their byte sizes."""
        shapes = self.wire_shapes()
        expert_params = {
            expert_key(l, e): layer.expert_names(e) for l, layer in enumerate(self.layers) for e in range(layer.num_experts)
        }
        router_params = {n: l for l, layer in enumerate(self.layers) for n in layer.router_tensors}
        if self.trainable_only:  # frozen tensors do not travel
            expert_params = {k: tuple(n for n in names if n in shapes) for k, names in expert_params.items()}
            router_params = {n: l for n, l in router_params.items() if n in shapes}
        owned = {n for names in expert_params.values() for n in names}
        missing = sorted((owned | set(router_params)) - set(shapes))
        if missing:  # e.g. a module whose state_dict hooks rename entries
            raise ValueError(f"expert/router names not in the model's state_dict: {missing[:4]}")
        item = {dt: torch.empty(0, dtype=dt).element_size() for dt in {d for _, d in shapes.values()}}
        return ParamLayout(
            expert_params=expert_params,
            shared_params=tuple(n for n in shapes if n not in owned),
            router_params=router_params,
            nbytes={n: int(np.prod(s, dtype=np.int64)) * item[d] for n, (s, d) in shapes.items()},
            num_experts={l: layer.num_experts for l, layer in enumerate(self.layers)},
            lora_pairs=lora_pairs(shapes) if self.trainable_only else {},
        )

    # --- the wire state ---------------------------------------------------------------

    def to_wire(self) -> dict[str, torch.Tensor]:
        """The wire state of the tensors present (views into the model's tensors)."""
        out: dict[str, torch.Tensor] = OrderedDict()
        for n, t in self._state():
            t = t.detach()
            if t.is_meta:  # an absent expert of a compact model
                continue
            if n in self._fused:
                layer = self._fused[n][1]
                held = range(layer.num_experts) if layer.held is None else layer.held
                out.update((wire_name(n, e), t[layer.slot(e)]) for e in held)
            else:
                out[n] = t
        return out

    def load_wire(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy wire tensors into the model; names absent from ``tensors`` keep their values.

        Raises ValueError (before changing anything) on a name the model does not have, a
        shape mismatch, or an expert this (compact) model does not hold.
        """
        shapes = self.wire_shapes()
        own = self.model.state_dict(keep_vars=True)
        for name, t in tensors.items():
            if name not in shapes:
                raise ValueError(f"received tensor {name!r} that the model does not have")
            if tuple(t.shape) != shapes[name][0]:
                raise ValueError(f"tensor {name!r}: received shape {tuple(t.shape)}, model has {shapes[name][0]}")
            fused = parse_wire_name(name)
            absent = own[name].is_meta if name in own else self._fused[fused[0]][1].slot(fused[1]) is None
            if absent:
                raise ValueError(f"received tensor {name!r} of an expert this compact model does not hold")
        plain = OrderedDict((n, t) for n, t in tensors.items() if n in own)
        self.model.load_state_dict(plain, strict=False)
        with torch.no_grad():
            for name, t in tensors.items():
                if name not in own:
                    base, e = parse_wire_name(name)
                    own[base][self._fused[base][1].slot(e)].copy_(t)

    # --- masking ----------------------------------------------------------------------

    def set_active(self, keys: Iterable[str] | None) -> None:
        """Route tokens only to experts ``keys`` (``"L{l}.E{i}"``); None = all (all held).

        Raises ValueError (before changing anything) on a malformed or unknown key, an
        expert a compact model does not hold, or a layer left without an active expert.
        """
        layers = self.layers
        if keys is None:
            for layer in layers:
                layer.set_active(None if layer.held is None else _mask(layer.num_experts, layer.held))
            return
        if isinstance(keys, str):
            raise TypeError("keys must be an iterable of expert keys, not one string")
        masks = [torch.zeros(layer.num_experts, dtype=torch.bool) for layer in layers]
        for key in keys:
            l, e = parse_expert_key(key)
            if l >= len(layers) or e >= layers[l].num_experts:
                raise UnknownExpertError(
                    f"unknown expert key {key!r}: model has {len(layers)} MoE layers with "
                    f"{[layer.num_experts for layer in layers]} experts"
                )
            if layers[l].held is not None and e not in layers[l].held:
                raise UnknownExpertError(f"expert {key!r} is not held by this compact model (layer {l} holds {list(layers[l].held)})")
            masks[l][e] = True
        empty = [l for l, mask in enumerate(masks) if not bool(mask.any())]
        if empty:
            raise ValueError(
                f"MoE layer(s) {empty} would have no active expert; every layer needs at least "
                f"one held expert to route tokens (got keys for layers "
                f"{sorted({l for l, mask in enumerate(masks) if bool(mask.any())})})"
            )
        for layer, mask in zip(layers, masks):
            layer.set_active(mask)


def _mask(num_experts: int, held: Iterable[int]) -> torch.Tensor:
    mask = torch.zeros(num_experts, dtype=torch.bool)
    mask[list(held)] = True
    return mask


def model_experts(model: nn.Module) -> ModelExperts:
    """``model`` with its MoE layers found (raises :class:`NoMoELayerError` if none)."""
    return ModelExperts(model, find_layers(model))


def to_wire(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's wire state: its ``state_dict`` with fused tensors split per expert."""
    return model_experts(model).to_wire()


def load_wire(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Load wire tensors (all or some) into ``model``; see :meth:`ModelExperts.load_wire`."""
    model_experts(model).load_wire(tensors)


def mask_experts(model: nn.Module, keys: Iterable[str] | None) -> None:
    """Activate exactly the experts ``keys`` in any supported model; see :meth:`ModelExperts.set_active`."""
    model_experts(model).set_active(keys)


@contextmanager
def count_tokens(model: nn.Module):
    """Count, per expert key, the tokens routed (masked top-1) during training-mode forwards.

    Yields a callable returning the flat counts over all expert keys (float64 numpy).
    """
    layers = model_experts(model).layers
    counts = [torch.zeros(layer.num_experts, dtype=torch.float64) for layer in layers]

    def add(l):
        return lambda tokens: counts[l].add_(tokens.cpu())

    handles = [layer.watch_tokens(add(l)) for l, layer in enumerate(layers)]
    try:
        yield lambda: torch.cat(counts).numpy() if counts else np.zeros(0)
    finally:
        for h in handles:
            h.remove()


@contextmanager
def router_logits(model: nn.Module):
    """Collect each MoE layer's raw router logits ([N, E], before masking) during forwards."""
    layers = model_experts(model).layers
    captured: list[list[torch.Tensor]] = [[] for _ in layers]
    handles = [layer.watch_logits(captured[l].append) for l, layer in enumerate(layers)]
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


def set_active_experts(model: nn.Module, keys: Iterable[str] | None) -> None:
    """Activate exactly the experts ``keys`` (``"L{l}.E{i}"``) in every MoE layer; None = all.

    Raises ValueError (before changing anything) on a malformed or unknown key, or if some
    MoE layer would be left without an active expert (it could not route its tokens).
    """
    model_experts(model).set_active(keys)
