"""The offline datasets as clients see them: compact sample pools and one builder per dataset.

Each builder turns a raw source (:mod:`~fedmoe_flwr.data.sources`,
:mod:`~fedmoe_flwr.data.shakespeare`) into a :class:`Source`: a pool of samples, which of them
may go to clients, the global test set, and natural ids where the data has them.
:func:`~fedmoe_flwr.data.federated.load_federated` partitions the candidates.

=============  =============================  ==========  ================================
name           input per sample               classes     global test set
=============  =============================  ==========  ================================
fashion_mnist  float32 [1, 28, 28] in [0, 1]  10          the official 10,000
mnist5k        float32 [1, 28, 28] in [0, 1]  10          stratified test_fraction (0.2)
digits         float32 [64] in [0, 1] (8x8)   10          stratified test_fraction (0.2)
synthetic      float32 [60]                   10          test_fraction (0.1) per device
mixed_digits   float32 [1, 28, 28] in [0, 1]  20 (joint)  the union of the three sources' test
                                                          sets, as each builder alone defines it
shakespeare    int64 [seq_len] char indices   81 (vocab)  tail test_fraction (0.1) of each
                                                          role's text, <= 10,000 windows
=============  =============================  ==========  ================================

The default partition is Dirichlet for the image datasets, natural (one client per device or
per role) for synthetic and shakespeare. All splits are seeded.

``mixed_digits`` is one task over three input domains, the source of each sample: Fashion-MNIST
(domain 0, labels shifted to 10..19), MNIST-5k (domain 1, digits 0..9) and sklearn's digits
upsampled to 28x28 (domain 2, digits 0..9, shared with MNIST). Its ``domain`` partition puts each
client in one source (:func:`~fedmoe_flwr.data.partition.source_domain_partition_indices`).
Test data are never among the candidates given to clients.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from fedmoe_flwr.data import shakespeare as shk
from fedmoe_flwr.data import sources
from fedmoe_flwr.data.partition import _derived_seed

DATASETS = ("fashion_mnist", "mnist5k", "digits", "synthetic", "shakespeare", "mixed_digits")


class ArrayPool:
    """Samples stored as one array; :meth:`take` returns model-ready inputs.

    ``x`` keeps its compact dtype (e.g. uint8); taken rows are reshaped to ``(n, *shape)`` and,
    when ``scale`` is given, converted to float32 and multiplied by it, else cast to ``dtype``.
    """

    def __init__(
        self,
        x: np.ndarray,
        y: np.ndarray,
        shape: tuple[int, ...],
        scale: float | None = None,
        dtype: Any = np.float32,
    ) -> None:
        self.x, self.y = x, np.asarray(y, dtype=np.int64)
        self.shape, self.scale, self.dtype = tuple(shape), scale, dtype

    def __len__(self) -> int:
        return len(self.y)

    @property
    def labels(self) -> np.ndarray:
        return self.y

    def take(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = self.x[idx].reshape((len(idx), *self.shape))
        if self.scale is not None:
            return x.astype(np.float32) * np.float32(self.scale), self.y[idx]
        return x.astype(self.dtype), self.y[idx]


class WindowPool:
    """Next-character samples: sample ``j`` is ``codes[s:s+seq_len] -> codes[s+seq_len]``
    with ``s = starts[j]``; windows are cut on access, so the pool stays one byte per char."""

    def __init__(self, codes: np.ndarray, starts: np.ndarray, seq_len: int) -> None:
        self.codes, self.starts, self.seq_len = codes, np.asarray(starts, dtype=np.int64), seq_len
        self.y = codes[self.starts + seq_len].astype(np.int64)

    def __len__(self) -> int:
        return len(self.starts)

    @property
    def labels(self) -> np.ndarray:
        return self.y

    def take(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return shk.windows(self.codes, self.starts[idx], self.seq_len)


class Source(NamedTuple):
    """What a dataset builder hands to the generic partitioning step."""

    task: str
    num_classes: int
    input_shape: tuple[int, ...]
    pool: Any
    candidates: np.ndarray  # pool indices that may go to clients
    test_pool: Any
    test_indices: np.ndarray
    natural_ids: np.ndarray | None = None  # per candidate, for the natural partition
    natural_names: tuple[str, ...] | None = None  # name of natural id k
    domain_kind: str | None = None
    image_shape: tuple[int, int] | None = None
    vocab_size: int | None = None
    # Natural input domains (several sources in one pool): the domain of every pool sample, of
    # every test_pool sample, and the domains' names. The domain partition then follows them.
    domain_ids: np.ndarray | None = None
    test_domain_ids: np.ndarray | None = None
    domain_names: tuple[str, ...] | None = None


def _stratified_test(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices): a seeded ``fraction`` of every class goes to test."""
    rng = np.random.default_rng(_derived_seed(seed, 0x7E57))
    mask = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        mask[rng.permutation(members)[: int(round(fraction * len(members)))]] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def _src_fashion_mnist(seed, num_clients, partitioner, root=None):
    d = sources.load_fashion_mnist(root)
    pool = ArrayPool(d.x_train, d.y_train, (1, 28, 28), scale=1 / 255)
    test = ArrayPool(d.x_test, d.y_test, (1, 28, 28), scale=1 / 255)
    return Source("classification", 10, (1, 28, 28), pool, np.arange(len(pool)), test,
                  np.arange(len(test)), domain_kind="rotate")


def _src_mnist5k(seed, num_clients, partitioner, test_fraction=0.2):
    d = sources.load_mnist5k(seed)
    pool = ArrayPool(d.x_train, d.y_train, (1, 28, 28), scale=1 / 255)
    train, test = _stratified_test(pool.labels, test_fraction, seed)
    return Source("classification", 10, (1, 28, 28), pool, train, pool, test, domain_kind="rotate")


def _src_digits(seed, num_clients, partitioner, test_fraction=0.2):
    d = sources.load_digits()
    pool = ArrayPool(d.x_train, d.y_train, (64,))
    train, test = _stratified_test(pool.labels, test_fraction, seed)
    return Source("classification", 10, (64,), pool, train, pool, test,
                  domain_kind="rotate", image_shape=(8, 8))


MIXED_DIGITS_DOMAINS = ("fashion_mnist", "mnist5k", "digits")
FASHION_LABEL_OFFSET = 10  # Fashion-MNIST classes 0..9 are joint classes 10..19


def _src_mixed_digits(seed, num_clients, partitioner, root=None, test_fraction=0.2):
    fm, mn, dg = sources.load_fashion_mnist(root), sources.load_mnist5k(seed), sources.load_digits_28()
    mn_train, mn_test = _stratified_test(mn.y_train, test_fraction, seed)
    dg_train, dg_test = _stratified_test(dg.y_train, test_fraction, seed)
    blocks = [  # (images [n, 784] uint8, joint labels, domain)
        (fm.x_train.reshape(len(fm.x_train), -1), fm.y_train + FASHION_LABEL_OFFSET, 0),
        (fm.x_test.reshape(len(fm.x_test), -1), fm.y_test + FASHION_LABEL_OFFSET, 0),
        (mn.x_train, mn.y_train, 1),
        (dg.x_train, dg.y_train, 2),
    ]
    start = np.cumsum([0] + [len(b[1]) for b in blocks])
    pool = ArrayPool(np.concatenate([b[0] for b in blocks]), np.concatenate([b[1] for b in blocks]),
                     (1, 28, 28), scale=1 / 255)
    domains = np.concatenate([np.full(len(b[1]), b[2]) for b in blocks])
    candidates = np.concatenate([start[0] + np.arange(len(fm.y_train)), start[2] + mn_train, start[3] + dg_train])
    test = np.concatenate([start[1] + np.arange(len(fm.y_test)), start[2] + mn_test, start[3] + dg_test])
    return Source("classification", 10 + FASHION_LABEL_OFFSET, (1, 28, 28), pool, candidates, pool, test,
                  domain_ids=domains, test_domain_ids=domains,
                  domain_names=MIXED_DIGITS_DOMAINS)


def _src_synthetic(seed, num_clients, partitioner, synthetic_alpha=1.0, synthetic_beta=1.0,
                   num_devices=None, test_fraction=0.1):
    n_dev = int(num_devices or num_clients)
    devs = sources.synthetic(float(synthetic_alpha), float(synthetic_beta), n_dev, seed)
    pool = ArrayPool(np.concatenate(devs.x), np.concatenate(devs.y), (devs.x[0].shape[1],))
    ids = np.repeat(np.arange(devs.num_devices), [len(y) for y in devs.y])
    train, test = [], []
    rng = np.random.default_rng(_derived_seed(seed, 0x7E57))
    for k in range(devs.num_devices):
        perm = rng.permutation(np.flatnonzero(ids == k))
        n_test = int(round(test_fraction * len(perm)))
        test.append(perm[:n_test])
        train.append(perm[n_test:])
    train_idx = np.sort(np.concatenate(train))
    names = tuple(f"device-{k}" for k in range(devs.num_devices))
    return Source("classification", devs.num_classes, pool.shape, pool, train_idx, pool,
                  np.sort(np.concatenate(test)), ids[train_idx], names, domain_kind="permute")


def _src_shakespeare(seed, num_clients, partitioner, seq_len=80, min_samples=64, stride=1,
                     test_fraction=0.1, max_test_samples=10_000):
    data = shk.load_shakespeare(int(seq_len), int(min_samples))
    order = np.random.default_rng(_derived_seed(seed, 0x5A)).permutation(data.num_roles)
    if partitioner == "natural":
        n = data.num_roles if num_clients is None else num_clients
        if n > data.num_roles:
            raise ValueError(f"shakespeare has {data.num_roles} roles with >= {min_samples} "
                             f"samples, asked for {n} clients")
        order = order[:n]
    codes = np.concatenate([data.codes[r] for r in order])
    offsets = np.concatenate([[0], np.cumsum([len(data.codes[r]) for r in order])])
    train, test, ids = [], [], []
    for k, r in enumerate(order):
        length = len(data.codes[r])
        cut = int(length * (1 - test_fraction))
        if test_fraction <= 0 or cut - seq_len < 1:  # too short to give test windows
            cut = length
        tr = offsets[k] + np.arange(0, cut - seq_len, stride)  # windows inside [0, cut)
        te = offsets[k] + np.arange(cut, length - seq_len, stride)  # windows inside [cut, end)
        train.append(tr)
        test.append(te)
        ids.append(np.full(len(tr), k))
    train_s, test_s = np.concatenate(train), np.concatenate(test)
    pool = WindowPool(codes, np.concatenate([train_s, test_s]), int(seq_len))
    test_idx = len(train_s) + np.arange(len(test_s))
    if max_test_samples is not None and len(test_idx) > max_test_samples:
        rng = np.random.default_rng(_derived_seed(seed, 0x7E57))
        test_idx = np.sort(rng.choice(test_idx, int(max_test_samples), replace=False))
    names = tuple(data.roles[r] for r in order)
    return Source("next_char", data.vocab_size, (int(seq_len),), pool, np.arange(len(train_s)),
                  pool, test_idx, np.concatenate(ids), names, vocab_size=data.vocab_size)


BUILDERS = {
    "fashion_mnist": _src_fashion_mnist, "mnist5k": _src_mnist5k, "digits": _src_digits,
    "synthetic": _src_synthetic, "shakespeare": _src_shakespeare, "mixed_digits": _src_mixed_digits,
}
SOURCE_KW = {
    "fashion_mnist": {"root"},
    "mnist5k": {"test_fraction"},
    "digits": {"test_fraction"},
    "synthetic": {"synthetic_alpha", "synthetic_beta", "num_devices", "test_fraction"},
    "shakespeare": {"seq_len", "min_samples", "stride", "test_fraction", "max_test_samples"},
    "mixed_digits": {"root", "test_fraction"},
}
