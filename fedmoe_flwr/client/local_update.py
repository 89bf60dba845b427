"""Local training, routing statistics and evaluation for the shipped models.

Plain PyTorch over numpy arrays; nothing here knows about Flower. Tokens are what an MoE
layer routes: one per sample for the MLP and CNN, one per position for the LM.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

from fedmoe_flwr.models import aux_loss, moe_layers
from fedmoe_flwr.models.adapters import model_experts, router_logits
from fedmoe_flwr.models.evaluate import _per_sample_loss


OPTIMIZERS = ("sgd", "adam")


@dataclass
class LocalResult:
    """What one local update measured. Per-expert arrays are flat over all expert keys."""

    num_examples: int
    train_loss: float
    tokens: np.ndarray  # [K] tokens routed to each expert during training
    expert_loss: np.ndarray  # [K] mean loss of samples routed to each expert; NaN if none


def _batches(n: int, batch_size: int, rng: np.random.Generator | None, max_batches: int | None = None):
    order = rng.permutation(n) if rng is not None else np.arange(n)
    for b, i in enumerate(range(0, n, batch_size)):
        if max_batches is not None and b >= max_batches:
            return
        yield order[i : i + batch_size]


def train_local(
    model: torch.nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    rng: np.random.Generator,
    momentum: float = 0.0,
    proximal_mu: float = 0.0,
    balance_weight: float = 0.1,
    z_weight: float = 1e-3,
    max_batches: int | None = None,
    all_positions: bool = False,
    optimizer: str = "sgd",
) -> LocalResult:
    """Local SGD on ``(x, y)`` with the MoE auxiliary losses and an optional proximal term.

    Only parameters that get gradients move, so experts masked out stay bit-identical.
    ``all_positions``: for a next-char LM (``x`` [n, T] ids, ``y`` [n] the next id), the loss
    covers every position of the window (targets ``x[:, 1:]`` then ``y``), as char-LMs are
    usually trained, instead of the last position only. ``optimizer``: ``"sgd"`` (with
    ``momentum``) or ``"adam"`` (a fresh Adam each call; parameters without a gradient, such
    as masked experts, are skipped by both).
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; allowed: {sorted(OPTIMIZERS)}")
    layers = moe_layers(model)
    # Expert keys come from the adapters (any MoE); per-expert loss is attributed through
    # fedmoe's own MoELayer statistics only (other models report NaN for it).
    sizes = [layer.num_experts for layer in model_experts(model).layers]
    if len(layers) != len(sizes):
        layers = []
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    k_total = int(offsets[-1])
    tok = torch.zeros(k_total, dtype=torch.float64)
    loss_sum = torch.zeros(k_total, dtype=torch.float64)
    # A compact model's absent experts are parameters on the meta device: nothing to train.
    params = [p for p in model.parameters() if not p.is_meta]
    anchor = [p.detach().clone() for p in params] if proximal_mu > 0 else None
    opt = (torch.optim.Adam(params, lr=lr) if optimizer == "adam"
           else torch.optim.SGD(params, lr=lr, momentum=momentum))
    xt, yt = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))
    model.train()
    total, seen = 0.0, 0
    for _ in range(epochs):
        for idx in _batches(len(xt), batch_size, rng, max_batches):
            xb, yb = xt[idx], yt[idx]
            # LoRA (parametrized weights): each adapted weight is computed once per step, not
            # once per use (transformers' expert loop indexes a fused weight per expert).
            with parametrize.cached():
                logits = model(xb)
                if all_positions and logits.dim() == 3 and yb.dim() == 1:
                    yb = torch.cat([xb[:, 1:], yb[:, None]], dim=1)  # [B, T]: each position's next id
                per_sample = _per_sample_loss(logits, yb)  # [B]
                loss = per_sample.mean() + aux_loss(model, balance_weight, z_weight)
                if anchor is not None:
                    prox = sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))
                    loss = loss + 0.5 * proximal_mu * prox
                opt.zero_grad(set_to_none=True)
                loss.backward()
            opt.step()
            total += float(per_sample.detach().sum())
            seen += len(idx)
            # Attribute each sample's loss to the experts its tokens were routed to.
            ls = per_sample.detach().double()
            for l, m in enumerate(layers):
                top1 = m.last.top1  # [B * T]; -1 = a token dropped (its expert not held)
                owner = torch.arange(len(idx)).repeat_interleave(top1.numel() // len(idx))
                routed = top1 >= 0
                top1, owner = top1[routed], owner[routed]
                tok.index_add_(0, top1 + int(offsets[l]), torch.ones_like(ls[owner]))
                loss_sum.index_add_(0, top1 + int(offsets[l]), ls[owner])
    tokens = tok.numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        expert_loss = np.where(tokens > 0, loss_sum.numpy() / np.maximum(tokens, 1), np.nan)
    return LocalResult(seen // max(epochs, 1), total / max(seen, 1), tokens, expert_loss)


@torch.no_grad()
def routing_stats(model: torch.nn.Module, x: np.ndarray, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Top-1 routing histogram and gate-mass share over ALL router rows, per expert key.

    Both are shares: within each MoE layer they sum to 1 over that layer's experts.
    """
    model.eval()
    with router_logits(model) as captured:
        xt = torch.from_numpy(np.ascontiguousarray(x))
        for i in range(0, len(xt), batch_size):
            model(xt[i : i + batch_size])
    hist, gate = [], []
    for logits in captured:
        z = torch.cat(logits) if logits else torch.zeros(0, 1)
        e = z.shape[1]
        n = max(z.shape[0], 1)
        hist.append(torch.bincount(z.argmax(1), minlength=e).double() / n)
        gate.append(torch.softmax(z.double(), dim=1).sum(0) / n)
    model.train()
    if not hist:
        return np.zeros(0), np.zeros(0)
    return torch.cat(hist).numpy(), torch.cat(gate).numpy()
