"""One MoE layer as fedmoe_flwr sees it: a router, E experts, and how to mask and watch them.

An :class:`ExpertLayer` names the layer's tensors by their ``state_dict`` keys:

* router tensors: row ``e`` (first dimension) belongs to expert ``e``; they stay *shared*.
* per-expert tensors: ``experts[e]`` lists the tensors only expert ``e`` owns (an expert
  that is its own module, e.g. ``moe.experts.3.fc1.weight``).
* fused tensors: tensors of shape ``[E, ...]`` holding every expert (transformers 5.x
  stores Mixtral's experts as ``...experts.gate_up_proj [E, 2I, H]``). On the wire, row
  ``e`` travels as its own virtual tensor ``"<name>/E<e>"`` (see :func:`wire_name`).

Masking: an absent expert's router logit becomes -inf, so no token routes to it and the
forward equals that of a model built without it. :class:`HookedLayer` does this with a
forward hook on the router module that rewrites the router's output; subclasses say where
the logits are in that output and how the rest of it follows from them.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import nn

_WIRE = re.compile(r"^(.*)/E(\d+)$")
_MASK_ATTR = "_fedmoe_active"  # [E] bool tensor or None, on the router module
_LOCAL_ATTR = "_fedmoe_local"  # [E] long: global expert -> slot in a compact fused tensor
_HOOK_ATTR = "_fedmoe_mask_hook"


def wire_name(fused: str, expert: int) -> str:
    """The wire name of row ``expert`` of fused tensor ``fused``: ``"<fused>/E<expert>"``."""
    return f"{fused}/E{expert}"


def parse_wire_name(name: str) -> tuple[str, int] | None:
    """``(fused tensor name, expert)`` for a virtual per-expert row; None for a plain name."""
    m = _WIRE.match(name)
    return (m.group(1), int(m.group(2))) if m else None


class ExpertLayer:
    """A MoE layer's router, experts and tensor names; see the module doc.

    Args:
        name: module path of the MoE block (for messages).
        num_experts: E, the number of router rows (the global expert count).
        router: the module whose forward output carries the router logits.
        router_tensors: state names of router tensors whose row e belongs to expert e.
        experts: per expert (global index), state names of the tensors it alone owns.
        fused: state names of ``[E, ...]`` tensors; in a compact model ``[k, ...]``.
        held: in a compact model, the global experts present, slot i holding ``held[i]``;
            None when every expert is present.
        holder: the module that carries ``held`` (as ``_fedmoe_held``) in a compact model.
    """

    def __init__(
        self,
        name: str,
        num_experts: int,
        router: nn.Module,
        router_tensors: tuple[str, ...],
        experts: tuple[tuple[str, ...], ...] = (),
        fused: tuple[str, ...] = (),
        held: tuple[int, ...] | None = None,
        holder: nn.Module | None = None,
    ):
        if experts and len(experts) != num_experts:
            raise ValueError(f"{name}: {len(experts)} expert modules for {num_experts} router rows")
        if not experts and not fused:
            raise ValueError(f"{name}: a MoE layer needs per-expert tensors or fused [E, ...] tensors")
        self.name, self.num_experts, self.router = name, num_experts, router
        self.router_tensors, self.fused, self.held, self.holder = router_tensors, fused, held, holder
        self.experts = experts or tuple(() for _ in range(num_experts))

    def expert_names(self, e: int) -> tuple[str, ...]:
        """Wire names of expert ``e``'s tensors (its own tensors, then its fused rows)."""
        return self.experts[e] + tuple(wire_name(n, e) for n in self.fused)

    def slot(self, e: int) -> int | None:
        """Row of global expert ``e`` in this model's fused tensors (None: not present)."""
        if self.held is None:
            return e
        return self.held.index(e) if e in self.held else None

    # --- masking and watching; subclasses implement ----------------------------------

    def set_active(self, mask: torch.Tensor | None) -> None:
        """Route tokens only to experts with ``mask[e]`` True ([E] bool; None = all)."""
        raise NotImplementedError

    def watch_logits(self, fn: Callable[[torch.Tensor], None]):
        """Call ``fn(logits [N, E])`` with the raw (unmasked) router logits of each forward."""
        raise NotImplementedError

    def watch_tokens(self, fn: Callable[[torch.Tensor], None]):
        """Call ``fn(tokens [E] float)``: tokens whose (masked) top-1 expert is e, per training forward."""
        raise NotImplementedError


class HookedLayer(ExpertLayer):
    """Masks through a forward hook on the router; the router's output is its logits.

    Subclasses whose router returns more than logits override :meth:`logits_of` and
    :meth:`reroute`. The mask lives on the router module, so every view of the model
    (each call that rediscovers its layers) sees the same mask.
    """

    def logits_of(self, out) -> torch.Tensor:
        """The router logits in the router's output, as [N, E]."""
        return out.reshape(-1, out.shape[-1])

    def reroute(self, out, masked: torch.Tensor, n_active: int):
        """The router output recomputed from ``masked`` logits (same layout as ``out``)."""
        return masked.view(out.shape)

    def _mask_hook(self, module, _inp, out):
        mask = getattr(module, _MASK_ATTR, None)
        local = getattr(module, _LOCAL_ATTR, None)
        if mask is None and local is None:
            return None
        logits = self.logits_of(out)
        n_active = self.num_experts if mask is None else int(mask.sum())
        masked = logits if mask is None else logits.masked_fill(~mask.to(logits.device), float("-inf"))
        return self.remap(self.reroute(out, masked, n_active), local)

    def remap(self, out, local: torch.Tensor | None):
        """Translate global expert indices in ``out`` to compact slots (fused compact models)."""
        return out

    def _ensure_hook(self) -> None:
        if getattr(self.router, _HOOK_ATTR, None) is None:
            # The hook must run before any token counter, which reads the masked output.
            handle = self.router.register_forward_hook(self._mask_hook, prepend=True)
            setattr(self.router, _HOOK_ATTR, handle)

    def set_active(self, mask: torch.Tensor | None) -> None:
        self._ensure_hook()
        if mask is not None:
            mask = torch.as_tensor(mask, dtype=torch.bool)
            if mask.shape != (self.num_experts,):
                raise ValueError(f"{self.name}: mask shape {tuple(mask.shape)} != ({self.num_experts},)")
            if not bool(mask.any()):
                raise ValueError(f"{self.name}: an MoE layer needs at least one active expert to route tokens")
            if bool(mask.all()):
                mask = None
        setattr(self.router, _MASK_ATTR, mask)

    def set_local_index(self, local: torch.Tensor | None) -> None:
        """Install the global -> slot map of a compact model (see ``adapters.compact``)."""
        self._ensure_hook()
        setattr(self.router, _LOCAL_ATTR, local)

    def watch_logits(self, fn):
        # prepend=True: runs before the mask hook, so it sees the raw logits.
        return self.router.register_forward_hook(lambda _m, _i, out: fn(self.logits_of(out).detach()), prepend=True)

    def watch_tokens(self, fn):
        self._ensure_hook()
        e = self.num_experts

        def hook(module, _inp, out):
            if module.training:
                top1 = self.logits_of(out).detach().argmax(dim=-1)
                fn(torch.bincount(top1.reshape(-1), minlength=e).to(torch.float64))

        return self.router.register_forward_hook(hook)


class TopKRouterLayer(HookedLayer):
    """Routers returning ``(logits, top-k scores, top-k indices)`` (Mixtral, Qwen-MoE, OLMoE).

    Rerouting repeats the router's own arithmetic on the masked logits: softmax in float32,
    top-k (k clamped to the active experts, so -inf never wins), renormalise when the router
    does (``norm_topk_prob``; Mixtral always does), cast back as the router does.
    """

    def logits_of(self, out) -> torch.Tensor:
        logits = out[0]
        return logits.reshape(-1, logits.shape[-1])

    def reroute(self, out, masked, n_active):
        logits = out[0]
        k = min(int(self.router.top_k), n_active)
        probs = torch.softmax(masked.float(), dim=-1)
        top_v, top_i = torch.topk(probs, k, dim=-1)
        if getattr(self.router, "norm_topk_prob", True):
            top_v = top_v / top_v.sum(dim=-1, keepdim=True)
        if hasattr(self.router, "norm_topk_prob"):  # Qwen/OLMoE cast scores; Mixtral keeps float32
            top_v = top_v.to(logits.dtype)
        return masked.view(logits.shape), top_v, top_i

    def remap(self, out, local):
        if local is None:
            return out
        return out[0], out[1], local.to(out[2].device)[out[2]]
