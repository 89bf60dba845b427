"""Slicing a model's state by expert: what a client receives, trains and sends back.

A *state* is a ``dict[str, Tensor]`` keyed like the model's wire state
(``models.adapters.to_wire``: its ``state_dict``, with fused ``[E, ...]`` expert tensors
split into per-expert rows ``"<name>/E<e>"``). The layout
(:class:`~fedmoe_flwr.layout.ParamLayout`) says which names belong to which expert; every
other name (routers, embeddings, buffers, ...) is shared. Functions here never copy
tensor data: returned dicts hold the same tensor objects, in the input's order.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from fedmoe_flwr.layout import ParamLayout, parse_expert_key
from fedmoe_flwr.models.adapters import model_experts
from fedmoe_flwr.models.moe import UnknownExpertError

State = Mapping[str, torch.Tensor]


def param_layout(model: nn.Module) -> ParamLayout:
    """Which wire names of ``model`` belong to which expert, and their byte sizes.

    The model's MoE layers are found by its adapter (``models.adapters``); a model without
    any raises :class:`~fedmoe_flwr.models.adapters.NoMoELayerError` unless it declares
    itself dense. For models without fused expert tensors the names are ``state_dict`` keys.
    """
    return model_experts(model).layout()


def _owner_map(layout: ParamLayout) -> dict[str, str | None]:
    """name -> expert key (None for shared names)."""
    return {**{n: None for n in layout.shared_params}, **layout.expert_of}


def _check_keys(keys: Iterable[str], layout: ParamLayout) -> set[str]:
    if isinstance(keys, str):
        raise TypeError("keys must be an iterable of expert keys, not one string")
    keys = set(keys)
    for k in keys:
        parse_expert_key(k)  # ValueError on malformed keys
    unknown = sorted(keys - set(layout.expert_params), key=parse_expert_key)
    if unknown:
        raise UnknownExpertError(
            f"unknown expert key(s) {unknown}; the layout has {len(layout.expert_params)} "
            f"experts in layers {sorted(layout.num_experts)} ({layout.num_experts})"
        )
    return keys


def held_expert_keys(state: State, layout: ParamLayout) -> list[str]:
    """Experts whose tensors are all present in ``state``, in (layer, index) order."""
    return [k for k in layout.expert_keys if all(n in state for n in layout.expert_params[k])]


def split_state(state: State, layout: ParamLayout) -> tuple[dict, dict[str, dict]]:
    """``(shared, {expert key: {name: tensor}})`` for a full or partial state.

    Only names present in ``state`` are returned; an expert appears when all its tensors
    are present. Raises ValueError on names the layout does not know or a partial expert.
    """
    owner = _owner_map(layout)
    unknown = [n for n in state if n not in owner]
    if unknown:
        raise ValueError(f"state has names the layout does not know: {unknown[:4]}")
    shared: dict[str, torch.Tensor] = OrderedDict()
    experts: dict[str, dict[str, torch.Tensor]] = {}
    for n, t in state.items():
        key = owner[n]
        if key is None:
            shared[n] = t
        else:
            experts.setdefault(key, OrderedDict())[n] = t
    partial = [k for k, d in experts.items() if len(d) != len(layout.expert_params[k])]
    if partial:
        raise ValueError(f"state holds only some tensors of expert(s) {sorted(partial)}")
    experts = {k: experts[k] for k in sorted(experts, key=parse_expert_key)}
    return shared, experts


def sub_state_names(layout: ParamLayout, keys: Iterable[str]) -> list[str]:
    """Names of the shared tensors plus those of experts ``keys`` (layout order)."""
    _check_keys(keys, layout)
    return layout.param_names(keys)


def sub_state(state: State, layout: ParamLayout, keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """Shared tensors plus only the experts ``keys``, in ``state``'s order.

    Raises :class:`UnknownExpertError` (a KeyError and a ValueError) on an unknown key and
    KeyError if ``state`` lacks a needed tensor.
    """
    keys = _check_keys(keys, layout)
    wanted = set(layout.shared_params)
    for k in keys:
        wanted.update(layout.expert_params[k])
    missing = sorted(wanted - set(state))
    if missing:
        raise KeyError(f"state lacks {len(missing)} tensor(s) needed, e.g. {missing[:4]}")
    return OrderedDict((n, t) for n, t in state.items() if n in wanted)


def merge_sub_state(state: State, sub: State, layout: ParamLayout) -> dict[str, torch.Tensor]:
    """A new full state: ``state`` with ``sub``'s tensors put in place (``state``'s order).

    Raises ValueError on a name unknown to ``state`` or the layout, a shape or dtype
    mismatch, or a partial expert in ``sub``.
    """
    owner = _owner_map(layout)
    unknown = [n for n in sub if n not in state or n not in owner]
    if unknown:
        raise ValueError(f"sub-state has names unknown to the state/layout: {unknown[:4]}")
    for n, t in sub.items():
        ref = state[n]
        if tuple(t.shape) != tuple(ref.shape) or t.dtype != ref.dtype:
            raise ValueError(
                f"{n}: got {tuple(t.shape)} {t.dtype}, expected {tuple(ref.shape)} {ref.dtype}"
            )
    split_state(sub, layout)  # rejects partial experts
    return OrderedDict((n, sub[n] if n in sub else t) for n, t in state.items())


def state_nbytes(state: State) -> int:
    """Raw tensor bytes (numel * itemsize) of a state, without serialising it."""
    return sum(t.numel() * t.element_size() for t in state.values())


def to_array_record(state: State):
    """A ``flwr.app.ArrayRecord`` holding ``state`` (same names, same order)."""
    from flwr.app import ArrayRecord  # lazy: keep `import fedmoe_flwr.models` light

    if not state:
        return ArrayRecord()
    return ArrayRecord(torch_state_dict=OrderedDict((n, t.detach()) for n, t in state.items()))


def from_array_record(record) -> dict[str, torch.Tensor]:
    """Inverse of :func:`to_array_record`: an ordered ``{name: tensor}`` dict."""
    return OrderedDict((n, torch.from_numpy(arr.numpy())) for n, arr in record.items())
