"""The user's own model, data and training code (nothing here knows about federated experts).

The model is a small Mixture-of-Experts classifier built around ``fedmoe_flwr.models.MoELayer``
(any ``torch.nn.Module`` containing ``MoELayer`` modules works with fedmoe_flwr).
"""

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedmoe_flwr.models import MoELayer, aux_loss


class Net(nn.Module):
    """8x8 digits -> 32-d embedding -> one MoE layer (4 experts, top-1) -> 10 classes."""

    def __init__(self, num_experts: int = 4):
        super().__init__()
        self.embed = nn.Linear(64, 32)
        self.moe = MoELayer(d_model=32, d_hidden=32, num_experts=num_experts)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.embed(x))
        return self.head(h + self.moe(h))


def _digits() -> tuple[np.ndarray, np.ndarray]:
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y))
    return (x[order] / 16.0).astype(np.float32), y[order].astype(np.int64)


def load_data(partition_id: int, num_partitions: int, batch_size: int = 32):
    """This partition's train and validation loaders (an IID split of 80% of digits)."""
    x, y = _digits()
    n_test = len(y) // 5  # the first 20% are the server's test set
    parts = np.array_split(np.arange(n_test, len(y)), num_partitions)[partition_id]
    cut = int(0.8 * len(parts))
    train = TensorDataset(torch.from_numpy(x[parts[:cut]]), torch.from_numpy(y[parts[:cut]]))
    val = TensorDataset(torch.from_numpy(x[parts[cut:]]), torch.from_numpy(y[parts[cut:]]))
    generator = torch.Generator().manual_seed(partition_id)
    return DataLoader(train, batch_size=batch_size, shuffle=True, generator=generator), DataLoader(val, batch_size=256)


def load_test_data() -> DataLoader:
    """The server's held-out test set (20% of digits)."""
    x, y = _digits()
    n_test = len(y) // 5
    return DataLoader(TensorDataset(torch.from_numpy(x[:n_test]), torch.from_numpy(y[:n_test])), batch_size=256)


def train(net: nn.Module, trainloader: DataLoader, epochs: int, lr: float) -> float:
    """Local SGD with the MoE balance loss; returns the mean training loss."""
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    criterion = nn.CrossEntropyLoss()
    total, batches = 0.0, 0
    for _ in range(epochs):
        for x, y in trainloader:
            opt.zero_grad()
            loss = criterion(net(x), y) + aux_loss(net, balance_weight=0.1)
            loss.backward()
            opt.step()
            total, batches = total + loss.item(), batches + 1
    return total / max(batches, 1)


@torch.no_grad()
def test(net: nn.Module, loader: DataLoader) -> tuple[float, float]:
    """(loss, accuracy) on ``loader``."""
    net.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    loss, correct, n = 0.0, 0, 0
    for x, y in loader:
        out = net(x)
        loss += float(criterion(out, y))
        correct += int((out.argmax(1) == y).sum())
        n += len(y)
    return loss / n, correct / n
