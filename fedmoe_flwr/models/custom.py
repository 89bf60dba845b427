"""A user's own MoE model, named by an import string (``model=custom model.factory=my_pkg.models:build``).

The factory (a function or class) is called with the keyword arguments it names among
``in_dim``, ``input_shape``, ``num_classes``, ``num_experts``, ``top_k``, ``d_model``,
``d_hidden``, ``shared_expert`` and ``dense`` (all of them if it takes ``**kwargs``), and
returns a ``torch.nn.Module`` holding :class:`~fedmoe_flwr.models.MoELayer` modules, whose
experts :func:`~fedmoe_flwr.models.param_layout` finds. ``strategy=dense`` needs a factory
that takes ``dense`` (and builds a model without experts when it is True).
"""

from __future__ import annotations

import inspect

from torch import nn

from fedmoe_flwr.imports import call_with_accepted, import_object
from fedmoe_flwr.models.adapters import DENSE_ATTR, NoMoELayerError
from fedmoe_flwr.models.slicing import param_layout

SETTING = "model.factory"


def build_custom(factory: str, available: dict, *, dense: bool = False) -> nn.Module:
    """``factory(**accepted)`` checked: a module with experts (or, with ``dense``, any module)."""
    fn = import_object(factory, SETTING)
    if dense:
        params = inspect.signature(fn).parameters if callable(fn) else {}
        if "dense" not in params and not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            raise ValueError(f"{SETTING}={factory!r}: strategy=dense needs a factory that takes dense=True")
        available = {**available, "dense": True}
    else:
        available = {**available, "dense": False}
    model = call_with_accepted(fn, available, SETTING)
    if not isinstance(model, nn.Module):
        raise ValueError(f"{SETTING}={factory!r} returned a {type(model).__name__}, not a torch.nn.Module")
    if dense:
        setattr(model, DENSE_ATTR, True)  # the dense twin: trained whole, no experts to find
        return model
    try:
        found = param_layout(model).expert_keys
    except NoMoELayerError as ex:
        raise ValueError(f"{SETTING}={factory!r} returned a {type(model).__name__} without experts: {ex}") from None
    if not found:
        raise ValueError(f"{SETTING}={factory!r} returned a {type(model).__name__} without experts "
                         "(see docs/models.md#adapters)")
    return model
