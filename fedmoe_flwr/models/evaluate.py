"""Loss and accuracy of a model on arrays: the one evaluation of the shipped models, used by
the server (global test set) and the clients (held-out splits)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _per_sample_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per sample; sequence targets [B, T] are averaged over positions."""
    if logits.dim() == 3 and y.dim() == 1:  # LM predicting one next char: last position
        logits = logits[:, -1]
    if logits.dim() == 3:
        b, t, v = logits.shape
        return F.cross_entropy(logits.reshape(b * t, v), y.reshape(b * t), reduction="none").view(b, t).mean(1)
    return F.cross_entropy(logits, y, reduction="none")


def _correct(logits: torch.Tensor, y: torch.Tensor) -> tuple[int, int]:
    if logits.dim() == 3 and y.dim() == 1:
        logits = logits[:, -1]
    pred = logits.argmax(-1)
    return int((pred == y).sum()), int(y.numel())


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 512) -> tuple[float, float, int]:
    """``(loss, accuracy, n)`` of the model as it is (its current expert mask applies)."""
    model.eval()
    xt, yt = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))
    loss, correct, count = 0.0, 0, 0
    for i in range(0, len(xt), batch_size):
        logits = model(xt[i : i + batch_size])
        yb = yt[i : i + batch_size]
        loss += float(_per_sample_loss(logits, yb).sum())
        c, n = _correct(logits, yb)
        correct += c
        count += n
    model.train()
    n = len(xt)
    return loss / max(n, 1), correct / max(count, 1), n
