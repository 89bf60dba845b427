"""A sparse Mixture-of-Experts feed-forward layer with expert masking.

One :class:`MoELayer` = a linear router over ``E`` experts + ``E`` small FFN experts
(+ an optional always-on shared expert). Each token goes to its top-k experts; the
dispatch groups tokens by expert with index ops, so every expert only sees its tokens.

Federated use: a client holds only some experts. ``set_active_experts`` masks the
router logits of the others to -inf, so tokens route among held experts only and the
forward equals that of a model built with just those experts (tested exactly).
With ``drop_inactive`` a client routes as the global model does instead: a token whose
chosen expert is not held skips the layer (only the residual carries it, as a token over
capacity does in Switch Transformers), so each expert trains only on the tokens the global
router sends it and the router keeps its gradient.

Shapes (einsum-style letters used in comments):
    N tokens (all leading dims of the input flattened), d d_model, h d_hidden,
    E experts in the layer, k experts per token.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from fedmoe_flwr.layout import expert_key, parse_expert_key

GATES = ("straight_through", "softmax")
ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}


class ExpertFFN(nn.Module):
    """fc1 -> activation -> fc2, He-initialised (fan-in), biases zero."""

    def __init__(self, d_model: int, d_hidden: int, activation: str = "gelu"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; allowed: {sorted(ACTIVATIONS)}")
        self.fc1 = nn.Linear(d_model, d_hidden)
        self.act = ACTIVATIONS[activation]()
        self.fc2 = nn.Linear(d_hidden, d_model)
        nn.init.kaiming_normal_(self.fc1.weight, nonlinearity="relu")  # He init
        nn.init.kaiming_normal_(self.fc2.weight, nonlinearity="linear")  # fan-in, unit gain
        nn.init.zeros_(self.fc1.bias)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


@dataclass
class MoEStats:
    """What the last forward of one MoE layer measured.

    ``balance_loss`` and ``z_loss`` carry gradients; everything else is detached.
    """

    balance_loss: torch.Tensor  # 0-dim; E_act * sum_e f_e P_e, 1.0 at perfect balance
    z_loss: torch.Tensor  # 0-dim; mean over tokens of logsumexp(active logits)^2
    tokens_per_expert: torch.Tensor  # [E] float; tokens whose (masked) top-1 expert is e
    gate_mass: torch.Tensor  # [E] float; sum over tokens of the (masked) router prob of e
    top1: torch.Tensor  # [N] long; routed top-1 expert per token (after masking); -1 if dropped
    top1_unmasked: torch.Tensor  # [N] long; argmax over all router rows (mask ignored)
    num_tokens: int


class MoELayer(nn.Module):
    """Top-k routed MoE feed-forward layer; ``forward(x) -> y`` with ``y.shape == x.shape``.

    Args:
        d_model: token width.
        d_hidden: hidden width of each expert.
        num_experts: E.
        top_k: experts per token (1 or 2). Clamped to the number of active experts.
        shared_expert: add an always-on ExpertFFN (a shared parameter) to every token.
        gate: ``"straight_through"`` (top-1: output unscaled, ``p / p.detach()`` passes the
            router gradient) or ``"softmax"`` (top-1: output times raw prob p, as in Switch).
            For k >= 2 both weight the k outputs by their probabilities renormalised to sum 1.
        activation: ``"gelu"``, ``"relu"`` or ``"silu"``.

    Attributes:
        active: non-persistent bool buffer [E]; False rows are masked out of routing.
        force_uniform_routing: route tokens round-robin over active experts (for tests
            and load monitoring); the router still runs and gets gradients via the gates.
        drop_inactive: route over ALL router rows; a (token, expert) pair whose expert is
            inactive contributes nothing (dropped) instead of rerouting to an active one.
        last: :class:`MoEStats` of the latest forward (None before the first).
    """

    def __init__(
        self,
        d_model: int,
        d_hidden: int,
        num_experts: int,
        top_k: int = 1,
        shared_expert: bool = False,
        gate: str = "straight_through",
        activation: str = "gelu",
    ):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if top_k not in (1, 2):
            raise ValueError(f"top_k must be 1 or 2, got {top_k}")
        if gate not in GATES:
            raise ValueError(f"unknown gate {gate!r}; allowed: {list(GATES)}")
        self.d_model, self.d_hidden = d_model, d_hidden
        self.num_experts, self.top_k, self.gate = num_experts, top_k, gate
        self.router = nn.Linear(d_model, num_experts)  # weight [E, d], bias [E]
        self.experts = nn.ModuleList(
            [ExpertFFN(d_model, d_hidden, activation) for _ in range(num_experts)]
        )
        self.shared = ExpertFFN(d_model, d_hidden, activation) if shared_expert else None
        self.register_buffer("active", torch.ones(num_experts, dtype=torch.bool), persistent=False)
        self.force_uniform_routing = False
        self.drop_inactive = False
        self.last: MoEStats | None = None

    def extra_repr(self) -> str:
        shared = self.shared is not None
        return f"E={self.num_experts}, k={self.top_k}, gate={self.gate}, shared={shared}"

    def set_active(self, mask: torch.Tensor | None) -> None:
        """Set the active-expert mask ([E] bool; None = all active)."""
        if mask is None:
            self.active.fill_(True)
            return
        mask = torch.as_tensor(mask, dtype=torch.bool, device=self.active.device)
        if mask.shape != self.active.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} != ({self.num_experts},)")
        if not bool(mask.any()):
            raise ValueError("an MoE layer needs at least one active expert to route tokens")
        self.active.copy_(mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, self.d_model)  # [N, d]
        N, E = x.shape[0], self.num_experts
        active = self.active
        all_active = bool(active.all())
        n_act = E if all_active else int(active.sum())
        if n_act == 0:
            raise RuntimeError("MoELayer has no active expert; call set_active_experts first")
        drop = self.drop_inactive and not all_active
        k = self.top_k if drop else min(self.top_k, n_act)

        # --- route ------------------------------------------------------------------
        logits = self.router(x).float()  # [N, E]
        masked = logits if (all_active or drop) else logits.masked_fill(~active, float("-inf"))
        probs = masked.softmax(dim=-1)  # [N, E]; 0 for inactive experts unless dropping
        if self.force_uniform_routing and not drop:
            ids = torch.nonzero(active).squeeze(1)  # [E_act]
            slot = torch.arange(N * k, device=x.device).remainder(n_act).view(N, k)
            top_i = ids[slot]  # [N, k] round-robin, distinct within a token
            top_p = probs.gather(1, top_i)
        else:
            top_i = masked.topk(k, dim=-1).indices  # [N, k]; ranks on logits so -inf never wins
            top_p = probs.gather(1, top_i)
        if k == 1:
            w = top_p / top_p.detach() if self.gate == "straight_through" else top_p
        else:
            w = top_p / top_p.sum(dim=-1, keepdim=True)  # renormalised over the top-k

        # --- dispatch: group the N*k (token, expert) pairs by expert ---------------
        kept = active[top_i] if drop else None  # [N, k]; None = every pair kept
        flat_e = (top_i if kept is None else torch.where(kept, top_i, E)).reshape(-1)  # [N*k]; dropped in bucket E
        order = torch.argsort(flat_e, stable=True)
        tok = torch.div(order, k, rounding_mode="floor")  # token of each sorted pair
        counts = torch.bincount(flat_e, minlength=E + 1).tolist()
        xs = x.index_select(0, tok).split(counts)  # E + 1 chunks of [n_e, d]
        outs = [self.experts[e](xs[e]) for e in range(E) if counts[e] > 0]
        outs.append(x.new_zeros(counts[E], self.d_model))  # dropped pairs add nothing
        out = torch.cat(outs)  # [N*k, d] sorted
        out = out * w.reshape(-1)[order].unsqueeze(1).to(out.dtype)
        y = x.new_zeros(N, self.d_model).index_add(0, tok, out)  # [N, d]
        if self.shared is not None:
            y = y + self.shared(x)

        # --- auxiliary losses and statistics --------------------------------------
        top1 = top_i[:, 0] if kept is None else torch.where(kept[:, 0], top_i[:, 0], -1)  # [N]; -1 = dropped
        tokens = torch.bincount(top1 if kept is None else top1[top1 >= 0], minlength=E).float()  # [E]
        if N > 0:
            f = tokens / N
            balance = (E if drop else n_act) * (f * probs.mean(dim=0)).sum()
            z_loss = torch.logsumexp(masked, dim=-1).square().mean()
        else:
            balance = z_loss = probs.sum() * 0.0  # keeps the graph, value 0
        self.last = MoEStats(
            balance_loss=balance,
            z_loss=z_loss,
            tokens_per_expert=tokens.detach(),
            gate_mass=probs.detach().sum(dim=0),
            top1=top1.detach(),
            top1_unmasked=logits.detach().argmax(dim=-1),
            num_tokens=N,
        )
        return y.reshape(shape)


@contextmanager
def dropping_inactive(model: nn.Module, on: bool = True):
    """Within the block, every :class:`MoELayer` of ``model`` drops tokens routed to an
    inactive expert (``drop_inactive``); the previous setting comes back afterwards."""
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    before = [layer.drop_inactive for layer in layers]
    for layer in layers:
        layer.drop_inactive = on
    try:
        yield
    finally:
        for layer, was in zip(layers, before):
            layer.drop_inactive = was


def make_ffn(
    d_model: int,
    d_hidden: int,
    num_experts: int,
    top_k: int = 1,
    shared_expert: bool = False,
    dense: bool = False,
    gate: str = "straight_through",
    activation: str = "gelu",
) -> nn.Module:
    """An MoE layer, or (``dense=True``) its dense twin: one FFN of the same active width.

    The twin's hidden width is ``d_hidden * top_k`` (+ ``d_hidden`` for the shared expert),
    so the FFN weight matrices used per token have the same size.
    """
    if dense:
        width = d_hidden * top_k + (d_hidden if shared_expert else 0)
        return ExpertFFN(d_model, width, activation)
    return MoELayer(d_model, d_hidden, num_experts, top_k, shared_expert, gate, activation)


# --- whole-model helpers -------------------------------------------------------------


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """The model's MoE layers in ``named_modules()`` order; list index = layer in expert keys."""
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def aux_loss(model: nn.Module, balance_weight: float = 0.1, z_weight: float = 1e-3) -> torch.Tensor:
    """``balance_weight * sum(balance) + z_weight * sum(z)`` over the last forward's layers."""
    total = None
    for layer in moe_layers(model):
        if layer.last is None:
            continue
        term = balance_weight * layer.last.balance_loss + z_weight * layer.last.z_loss
        total = term if total is None else total + term
    if total is None:
        p = next(model.parameters(), None)
        return torch.zeros((), device=p.device if p is not None else None)
    return total


def expert_keys(model: nn.Module) -> list[str]:
    """All expert keys of the model, ``"L{layer}.E{index}"``, in (layer, index) order."""
    return [expert_key(l, e) for l, m in enumerate(moe_layers(model)) for e in range(m.num_experts)]


def active_expert_keys(model: nn.Module) -> list[str]:
    """Keys of the currently active (unmasked) experts."""
    return [
        expert_key(l, int(e))
        for l, m in enumerate(moe_layers(model))
        for e in torch.nonzero(m.active).squeeze(1).tolist()
    ]


class UnknownExpertError(KeyError, ValueError):
    """An expert key the model/layout does not have (catchable as KeyError or ValueError)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


def active_param_count(model: nn.Module) -> int:
    """Parameters used per token: all parameters minus the experts a token does not visit.

    Each MoE layer uses ``min(top_k, active)`` of its experts per token; the rest are
    subtracted. Routers and the shared expert count as used.
    """
    total = sum(p.numel() for p in model.parameters())
    for m in moe_layers(model):
        per_expert = sum(p.numel() for p in m.experts[0].parameters())
        total -= (m.num_experts - min(m.top_k, int(m.active.sum()))) * per_expert
    return total

