"""The user's own model, data and training code: an MoE written from plain PyTorch modules.

Nothing here imports fedmoe_flwr except :class:`MoESpec`, the one line that tells it where the
router and the experts are (see docs/models.md#adapters). The router is an ``nn.Linear``
returning logits; fedmoe_flwr masks an absent expert by setting its logit to minus infinity,
so this forward's top-1 choice never picks an expert the node does not hold.
"""

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedmoe_flwr.models import MoESpec


class Expert(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class Net(nn.Module):
    """8x8 digits -> 32-d embedding -> own top-1 MoE (4 experts) -> 10 classes."""

    moe_spec = MoESpec(router="router", experts="experts")

    def __init__(self, num_experts: int = 4):
        super().__init__()
        self.embed = nn.Linear(64, 32)
        self.router = nn.Linear(32, num_experts)
        self.experts = nn.ModuleList([Expert(32, 32) for _ in range(num_experts)])
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.embed(x))
        gates = F.softmax(self.router(h), dim=-1)  # [B, E]; masked experts get 0
        top = gates.argmax(-1)  # [B]
        out = torch.zeros_like(h)
        for e, expert in enumerate(self.experts):
            rows = (top == e).nonzero(as_tuple=True)[0]
            if len(rows):  # an expert no sample picked is never called
                out[rows] = gates[rows, e : e + 1] * expert(h[rows])
        return self.head(h + out)


def _digits() -> tuple[np.ndarray, np.ndarray]:
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y))
    return (x[order] / 16.0).astype(np.float32), y[order].astype(np.int64)


def load_data(partition_id: int, num_partitions: int, batch_size: int = 32):
    """This partition's train and validation loaders (an IID split of 80% of digits)."""
    x, y = _digits()
    n_test = len(y) // 5
    parts = np.array_split(np.arange(n_test, len(y)), num_partitions)[partition_id]
    cut = int(0.8 * len(parts))
    train = TensorDataset(torch.from_numpy(x[parts[:cut]]), torch.from_numpy(y[parts[:cut]]))
    val = TensorDataset(torch.from_numpy(x[parts[cut:]]), torch.from_numpy(y[parts[cut:]]))
    generator = torch.Generator().manual_seed(partition_id)
    return DataLoader(train, batch_size=batch_size, shuffle=True, generator=generator), DataLoader(val, batch_size=256)


def load_test_data() -> DataLoader:
    x, y = _digits()
    n_test = len(y) // 5
    return DataLoader(TensorDataset(torch.from_numpy(x[:n_test]), torch.from_numpy(y[:n_test])), batch_size=256)


def train(net: nn.Module, trainloader: DataLoader, epochs: int, lr: float) -> float:
    """Local SGD; returns the mean training loss."""
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    total, batches = 0.0, 0
    for _ in range(epochs):
        for x, y in trainloader:
            opt.zero_grad()
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            opt.step()
            total, batches = total + loss.item(), batches + 1
    return total / max(batches, 1)


@torch.no_grad()
def test(net: nn.Module, loader: DataLoader) -> tuple[float, float]:
    """(loss, accuracy) on ``loader``."""
    net.eval()
    loss, correct, n = 0.0, 0, 0
    for x, y in loader:
        out = net(x)
        loss += float(F.cross_entropy(out, y, reduction="sum"))
        correct += int((out.argmax(1) == y).sum())
        n += len(y)
    return loss / n, correct / n
