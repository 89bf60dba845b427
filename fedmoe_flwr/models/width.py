"""Width-sliced dense models, client side: build the sub-model a width baseline sends, and
FjORD's ordered dropout (docs/architecture.md#strategies).

The server cuts each FFN block's hidden units (:mod:`fedmoe_flwr.widths`); a client builds
a model whose FFN blocks have exactly the received widths (:func:`model_for_state`), trains
it as any dense model and sends the same tensors back. :func:`ordered_dropout` makes each
training forward use only the first ``p`` share of every FFN's units, ``p`` drawn per step.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from fedmoe_flwr.models.moe import ExpertFFN, MoELayer
from fedmoe_flwr.widths import width_units


def dense_ffns(model: nn.Module) -> dict[str, ExpertFFN]:
    """``{module path: FFN}`` of the model's dense FFN blocks (experts of MoE layers excluded)."""
    inside_moe = {id(m) for layer in model.modules() if isinstance(layer, MoELayer) for m in layer.modules()}
    return {name: m for name, m in model.named_modules() if isinstance(m, ExpertFFN) and id(m) not in inside_moe}


def resized_copy(model: nn.Module, widths: Mapping[str, int]) -> nn.Module:
    """A deep copy of ``model`` whose FFN blocks ``widths`` names have that many hidden units."""
    out = copy.deepcopy(model)
    ffns = dense_ffns(out)
    unknown = sorted(set(widths) - set(ffns))
    if unknown:
        raise ValueError(f"no dense FFN block named {unknown[:3]} in the model")
    for name, w in widths.items():
        ffn = ffns[name]
        if not 1 <= int(w) <= ffn.fc1.out_features:
            raise ValueError(f"{name}: width {w} outside [1, {ffn.fc1.out_features}]")
        ffn.fc1 = nn.Linear(ffn.fc1.in_features, int(w))
        ffn.fc2 = nn.Linear(int(w), ffn.fc2.out_features)
    return out


def model_for_state(skeleton: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """A copy of the dense ``skeleton`` with FFN widths read off ``state``, ``state`` loaded.

    Raises ValueError when ``state`` does not match the skeleton's names or other shapes.
    """
    widths = {name: int(state[f"{name}.fc1.weight"].shape[0])
              for name in dense_ffns(skeleton) if f"{name}.fc1.weight" in state}
    model = resized_copy(skeleton, widths)
    try:
        model.load_state_dict(dict(state), strict=True)
    except RuntimeError as ex:
        raise ValueError(f"the received sub-model does not fit the model: {str(ex).splitlines()[0]}") from None
    return model


@contextmanager
def ordered_dropout(model: nn.Module, levels: Sequence[float], full_widths: Mapping[str, int], rng: np.random.Generator):
    """FjORD's ordered dropout while the context is open.

    Each training-mode forward of ``model`` draws one ``p`` from ``levels`` (shares of the
    *full* widths ``full_widths``) and every FFN keeps its first ``width_units(p, W)``
    hidden units (the rest output 0, so they get no gradient). Evaluation forwards use the
    whole received width.
    """
    levels = [float(l) for l in levels]
    if not levels:
        raise ValueError("ordered dropout needs at least one width level")
    ffns = dense_ffns(model)
    current: dict[str, float] = {"p": max(levels)}

    def draw(module, _args):
        if module.training:
            current["p"] = levels[int(rng.integers(len(levels)))]

    def make_cut(name: str):
        full = int(full_widths[name])

        def cut(module, _args, out):
            if not module.training:
                return out
            keep = width_units(current["p"], full)
            if keep >= out.shape[-1]:
                return out
            mask = torch.arange(out.shape[-1], device=out.device) < keep
            return out * mask.to(out.dtype)

        return cut

    handles = [model.register_forward_pre_hook(draw)]
    handles += [ffn.act.register_forward_hook(make_cut(name)) for name, ffn in ffns.items()]
    try:
        yield current
    finally:
        for h in handles:
            h.remove()
