"""The per-client view of a federated dataset, used by the ClientApp and the server's evaluation.

:func:`load_federated` builds (once per process, cached) a :class:`FederatedData`: every
client's train and held-out split, the global test set, and each client's domain. Inputs are
kept compact (uint8 images, encoded text) and turned into model-ready arrays on access. The
datasets, their input shapes and test sets are listed in :mod:`fedmoe_flwr.data.catalog`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Any

import numpy as np

from fedmoe_flwr.data.catalog import BUILDERS, DATASETS, SOURCE_KW, ArrayPool, Source, WindowPool
from fedmoe_flwr.data.partition import (
    DomainTransform,
    _derived_seed,
    domain_partition_indices,
    partition_indices,
    source_domain_partition_indices,
)

PARTITIONERS = ("iid", "dirichlet", "shards", "domain", "natural")
TASKS = ("classification", "next_char", "text_classification")
__all__ = ["DATASETS", "PARTITIONERS", "TASKS", "ArrayPool", "FederatedData", "WindowPool",
           "federate", "load_federated", "split_holdout"]


@dataclass(frozen=True, eq=False)
class FederatedData:
    """A dataset split among ``num_clients`` clients (Flower partition ids ``0..num_clients-1``).

    Attributes:
        name: dataset name.
        task: ``"classification"``, ``"next_char"`` (x int64 character indices ``[n, seq_len]``,
            y the next character) or ``"text_classification"`` (x int64 token ids).
        num_classes: number of classes (the vocabulary size for ``next_char``).
        input_shape: shape of one input, e.g. ``(1, 28, 28)``.
        pool: where the clients' samples live; ``train_indices``/``holdout_indices`` index it.
        train_indices: per client, sorted indices into ``pool`` of its train split.
        holdout_indices: per client, sorted indices into ``pool`` of its held-out split
            (disjoint from its train split; seeded per client).
        test_pool: where the global test samples live (may be ``pool`` itself).
        test_indices: indices into ``test_pool`` of the global test set.
        client_domains: per client, its domain (domain partition only), else None.
        test_domains: per test sample, its domain (sample ``j`` -> ``j % K``, or its source for
            data with natural domains), else None.
        transform: the domain transform applied on access, else None (also for natural domains).
        vocab_size: token vocabulary for text tasks, else None.
        client_names: a readable name per client (role, device), else None.
        config: the arguments that built it, for logs.
        domain_names: the name of each natural domain (e.g. its source dataset), else None.

    ``client_train``/``client_holdout`` return fresh arrays, safe to modify; ``test`` is built
    once and shared: do not modify it in place.
    """

    name: str
    task: str
    num_classes: int
    input_shape: tuple[int, ...]
    pool: ArrayPool | WindowPool
    train_indices: tuple[np.ndarray, ...]
    holdout_indices: tuple[np.ndarray, ...]
    test_pool: ArrayPool | WindowPool
    test_indices: np.ndarray
    client_domains: np.ndarray | None = None
    test_domains: np.ndarray | None = None
    transform: DomainTransform | None = None
    vocab_size: int | None = None
    client_names: tuple[str, ...] | None = None
    config: tuple[tuple[str, Any], ...] = ()
    domain_names: tuple[str, ...] | None = None

    @property
    def num_clients(self) -> int:
        return len(self.train_indices)

    @property
    def num_domains(self) -> int | None:
        if self.transform is not None:
            return self.transform.num_domains
        return None if self.domain_names is None else len(self.domain_names)

    def _check(self, i: int) -> int:
        if not 0 <= int(i) < self.num_clients:
            raise IndexError(f"client {i} out of range [0, {self.num_clients})")
        return int(i)

    def _view(self, i: int, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x, y = self.pool.take(idx)
        if self.transform is not None and self.client_domains is not None:
            x = self.transform(x, int(self.client_domains[i]))
        return x, y

    def client_train(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Client ``i``'s train split: (x, y int64), its domain transform applied."""
        i = self._check(i)
        return self._view(i, self.train_indices[i])

    def client_holdout(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Client ``i``'s held-out split (personalised evaluation), its domain transform applied."""
        i = self._check(i)
        return self._view(i, self.holdout_indices[i])

    def client_domain(self, i: int) -> int | None:
        """Client ``i``'s domain, or None when the split has no domains."""
        i = self._check(i)
        return None if self.client_domains is None else int(self.client_domains[i])

    def root_sample(self, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """``n`` samples drawn uniformly from the union of the clients' train splits (seeded),
        each with its client's domain transform: the server's small clean root set, sampled
        as FLTrust's evaluation does (Cao et al., NDSS 2021). All of them when ``n`` exceeds it."""
        if int(n) < 1:
            raise ValueError(f"a root sample needs n >= 1, got {n}")
        owner = np.concatenate([np.full(len(t), i) for i, t in enumerate(self.train_indices)])
        index = np.concatenate(self.train_indices)
        rng = np.random.default_rng([int(seed), 0x2007])
        pick = np.sort(rng.choice(len(index), min(int(n), len(index)), replace=False))
        parts = [self._view(int(i), index[pick[owner[pick] == i]]) for i in np.unique(owner[pick])]
        return np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])

    @cached_property
    def test(self) -> tuple[np.ndarray, np.ndarray]:
        """The global test set (x, y), every domain represented; built once and cached."""
        x, y = self.test_pool.take(self.test_indices)
        if self.transform is not None and self.test_domains is not None:
            x = self.transform.apply(x, self.test_domains)
        return x, y

    @property
    def train_sizes(self) -> np.ndarray:
        return np.array([len(t) for t in self.train_indices], dtype=np.int64)

    @property
    def holdout_sizes(self) -> np.ndarray:
        return np.array([len(t) for t in self.holdout_indices], dtype=np.int64)

    def label_counts(self, split: str = "train") -> np.ndarray:
        """``[num_clients, num_classes]`` label counts of the ``"train"``/``"holdout"`` splits."""
        parts = {"train": self.train_indices, "holdout": self.holdout_indices}[split]
        labels = self.pool.labels
        return np.stack([np.bincount(labels[p], minlength=self.num_classes) for p in parts])

    def describe(self) -> dict[str, Any]:
        """A small summary for logs."""
        sizes = self.train_sizes
        return {
            "name": self.name, "task": self.task, "num_clients": self.num_clients,
            "num_classes": self.num_classes, "input_shape": self.input_shape,
            "train_total": int(sizes.sum()),
            "train_min": int(sizes.min()),
            "train_max": int(sizes.max()),
            "holdout_total": int(self.holdout_sizes.sum()), "test": len(self.test_indices),
            "num_domains": self.num_domains, **dict(self.config),
        }


def split_holdout(
    parts, holdout_fraction: float, seed: int
) -> tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]:
    """(train, holdout) per client: client ``i`` holds out a random ``holdout_fraction`` of its
    indices (rounded), seeded by ``(seed, i)``.

    A client with n >= 2 samples keeps at least one for training; one with a single sample
    holds none out.
    """
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
    train, hold = [], []
    for i, p in enumerate(parts):
        perm = np.random.default_rng([seed, i, 0x401D]).permutation(np.asarray(p, dtype=np.int64))
        k = min(int(round(holdout_fraction * len(perm))), max(len(perm) - 1, 0))
        hold.append(np.sort(perm[:k]))
        train.append(np.sort(perm[k:]))
    return tuple(train), tuple(hold)


_PARTITION_KW = {
    "shards_per_partition", "min_partition_size", "self_balancing", "num_domains",
    "domain_transform",
}
_ALLOWED_PARTITIONERS = {"shakespeare": ("natural", "iid"), "synthetic": PARTITIONERS}


def load_federated(
    name: str,
    num_clients: int | None,
    partitioner: str | None = None,
    alpha: float = 0.3,
    seed: int = 0,
    holdout_fraction: float = 0.2,
    max_train_samples: int | None = None,
    **kw: Any,
) -> FederatedData:
    """Build (or return the cached) federated split of dataset ``name``.

    Args:
        name: one of :data:`DATASETS`.
        num_clients: number of clients. For the natural partition: devices (synthetic) or
            roles (shakespeare: the first ``num_clients`` roles in a seeded order; None = all).
        partitioner: one of :data:`PARTITIONERS`; None means ``"natural"`` for synthetic and
            shakespeare, ``"dirichlet"`` otherwise. ``"domain"``: client ``i`` in domain
            ``i % num_domains`` (``num_domains`` kw, default 4) whose inputs get that domain's
            fixed transform (``domain_transform`` kw: ``"rotate"`` by 0/90/180/270 degrees for
            images and digits, ``"permute"`` features for synthetic), labels Dirichlet(alpha)
            inside a domain; the test set cycles through the domains. For mixed_digits the
            domains are its 3 sources (no transform; ``num_domains``, if given, must be 3):
            clients per source in proportion to its train samples, interleaved
            (:func:`~fedmoe_flwr.data.partition.source_domain_partition_indices`); test samples
            keep their source. Shakespeare allows ``"natural"`` and ``"iid"`` only.
        alpha: Dirichlet concentration (dirichlet and domain partitioners).
        seed: seeds everything: test slice, subsample, partition, holdout split.
        holdout_fraction: each client's held-out share (seeded per client).
        max_train_samples: subsample the train pool (seeded) before partitioning; for natural
            partitions each client keeps a proportional share (at least one sample).
        **kw: ``shards_per_partition`` (2), ``min_partition_size``, ``self_balancing`` (False),
            ``num_domains`` (4), ``domain_transform``, and per dataset: fashion_mnist ``root``;
            mnist5k/digits ``test_fraction`` (0.2); mixed_digits ``root``, ``test_fraction`` (0.2,
            of MNIST-5k and digits); synthetic ``synthetic_alpha`` (1.0),
            ``synthetic_beta`` (1.0), ``num_devices`` (= num_clients), ``test_fraction`` (0.1);
            shakespeare ``seq_len`` (80), ``min_samples`` (64), ``stride`` (1),
            ``test_fraction`` (0.1), ``max_test_samples`` (10,000).

    Raises:
        ValueError: unknown dataset or partitioner (naming the allowed values) or bad sizes.
        TypeError: a keyword this dataset does not take.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; allowed: {', '.join(DATASETS)}")
    if partitioner is None:
        partitioner = "natural" if name in ("synthetic", "shakespeare") else "dirichlet"
    allowed = _ALLOWED_PARTITIONERS.get(name, PARTITIONERS[:4])
    if partitioner not in allowed:
        raise ValueError(
            f"unknown partitioner {partitioner!r} for {name}; allowed: {', '.join(allowed)}"
        )
    bad = set(kw) - SOURCE_KW[name] - _PARTITION_KW
    if bad:
        raise TypeError(f"load_federated({name!r}) got unexpected keywords {sorted(bad)}; "
                        f"allowed: {sorted(SOURCE_KW[name] | _PARTITION_KW)}")
    if num_clients is None and not (name == "shakespeare" and partitioner == "natural"):
        raise ValueError("num_clients is required (None: all roles, shakespeare natural only)")
    return _load_cached(
        name,
        None if num_clients is None else int(num_clients),
        partitioner,
        float(alpha),
        int(seed),
        float(holdout_fraction),
        None if max_train_samples is None else int(max_train_samples),
        tuple(sorted(kw.items())),
    )


def _groups(ids: np.ndarray) -> list[np.ndarray]:
    """Positions of each distinct id, in sorted id order (one argsort, not one scan per id)."""
    order = np.argsort(ids, kind="stable")
    _, counts = np.unique(ids[order], return_counts=True)
    return np.split(order, np.cumsum(counts)[:-1])


def _subsample(src: Source, partitioner: str, max_train_samples: int | None, seed: int):
    """(candidates, natural ids) after the seeded ``max_train_samples`` cap."""
    cand, nat = src.candidates, src.natural_ids
    if max_train_samples is None or max_train_samples >= len(cand):
        return cand, nat
    rng = np.random.default_rng(_derived_seed(seed, 0x5B))
    if partitioner == "natural":  # every natural client keeps a proportional share, at least 1
        frac = max_train_samples / len(cand)
        keep = [rng.permutation(g)[: max(1, int(np.ceil(len(g) * frac)))] for g in _groups(nat)]
        sel = np.sort(np.concatenate(keep))
    else:
        sel = np.sort(rng.choice(len(cand), int(max_train_samples), replace=False))
    return cand[sel], None if nat is None else nat[sel]


def _natural(
    name: str, src: Source, nat: np.ndarray | None, labels: np.ndarray, num_clients: int | None,
    seed: int,
) -> tuple[list[np.ndarray], tuple[str, ...] | None]:
    """Natural partition: ``num_clients`` natural ids in a seeded order, with their names."""
    if nat is None:
        raise ValueError(f"{name} has no natural partition; use iid, dirichlet, shards or domain")
    if name == "shakespeare":  # the builder already chose the roles in seeded order: ids 0..n-1
        return _groups(nat), src.natural_names
    parts = partition_indices(labels, "natural", None, seed, natural_ids=nat)  # sorted id order
    if len(parts) < num_clients:
        raise ValueError(f"{name} has {len(parts)} natural partitions, asked for {num_clients}")
    pick = np.random.default_rng(_derived_seed(seed, 0x5A)).permutation(len(parts))[:num_clients]
    ids = np.unique(nat)
    names = None
    if src.natural_names is not None:
        names = tuple(src.natural_names[int(ids[k])] for k in pick)
    return [parts[k] for k in pick], names


@lru_cache(maxsize=8)
def _load_cached(
    name, num_clients, partitioner, alpha, seed, holdout_fraction, max_train_samples, kw_items
):
    kw = dict(kw_items)
    src_kw = {k: v for k, v in kw.items() if k in SOURCE_KW[name]}
    src = BUILDERS[name](seed, num_clients, partitioner, **src_kw)
    return federate(name, src, num_clients, partitioner, alpha, seed, holdout_fraction, max_train_samples, kw_items)


def federate(
    name: str, src: Source, num_clients: int | None, partitioner: str, alpha: float, seed: int,
    holdout_fraction: float, max_train_samples: int | None, kw_items: tuple = (),
) -> FederatedData:
    """Split a :class:`~fedmoe_flwr.data.catalog.Source` among clients (the generic step of
    :func:`load_federated`; also used for a user's own data, :mod:`fedmoe_flwr.data.custom`)."""
    kw = dict(kw_items)
    cand, nat = _subsample(src, partitioner, max_train_samples, seed)
    labels = src.pool.labels[cand]
    names = client_domains = test_domains = transform = None
    if partitioner == "natural":
        parts, names = _natural(name, src, nat, labels, num_clients, seed)
    elif partitioner == "domain" and src.domain_ids is not None:
        parts, client_domains, test_domains = _source_domains(name, src, cand, labels, num_clients, alpha, seed, kw)
    elif partitioner == "domain":
        k = int(kw.get("num_domains", 4))
        kind = kw.get("domain_transform", src.domain_kind)
        if kind == "rotate" and src.image_shape is None and len(src.input_shape) < 2:
            raise ValueError(f"{name} inputs are not images; use domain_transform='permute'")
        transform = DomainTransform(kind, k, src.image_shape if kind == "rotate" else None)
        parts, client_domains = domain_partition_indices(
            labels, num_clients, k, seed, alpha=alpha,
            min_partition_size=kw.get("min_partition_size"),
        )
        test_domains = np.arange(len(src.test_indices)) % k
    else:
        parts = partition_indices(
            labels, partitioner, num_clients, seed, alpha=alpha,
            shards_per_partition=int(kw.get("shards_per_partition", 2)),
            min_partition_size=kw.get("min_partition_size"),
            self_balancing=bool(kw.get("self_balancing", False)),
        )
    train, hold = split_holdout([cand[p] for p in parts], holdout_fraction, seed)
    config = (
        ("partitioner", partitioner), ("alpha", alpha), ("seed", seed),
        ("holdout_fraction", holdout_fraction), ("max_train_samples", max_train_samples),
        *kw_items,
    )
    return FederatedData(
        name, src.task, src.num_classes, src.input_shape, src.pool, train, hold,
        src.test_pool, np.asarray(src.test_indices), client_domains, test_domains,
        transform, src.vocab_size, names, config, src.domain_names,
    )


def _source_domains(name, src: Source, cand, labels, num_clients, alpha, seed, kw):
    """The domain partition of data with natural domains: (parts, client domains, test domains)."""
    k = len(src.domain_names or np.unique(src.domain_ids))
    if "num_domains" in kw and int(kw["num_domains"]) != k:
        raise ValueError(f"{name} has {k} domains (its sources), got num_domains={kw['num_domains']}")
    if kw.get("domain_transform") is not None:
        raise ValueError(f"{name}'s domains are its sources; it takes no domain_transform")
    parts, client_domains = source_domain_partition_indices(
        labels, src.domain_ids[cand], num_clients, seed, alpha=alpha,
        min_partition_size=kw.get("min_partition_size"),
    )
    return parts, client_domains, np.asarray(src.test_domain_ids)[np.asarray(src.test_indices)]
