"""Split sample indices among clients with flwr-datasets partitioners, plus domain skew.

flwr-datasets partitioners work on a Hugging Face ``datasets.Dataset``. For speed we never hand
them the inputs: the Dataset has only a ``label`` column and an ``idx`` column (the row in the
caller's arrays), built in memory, so everything is offline. After ``partitioner.dataset = ds``
each ``load_partition(i)`` is read back as its ``idx`` values.

What flwr-datasets lacks, domain skew, is here too: :func:`domain_partition_indices` gives each
client one of K domains (client ``i`` -> domain ``i % K``) and splits labels inside a domain
Dirichlet(alpha); :class:`DomainTransform` is the fixed input transform of each domain
(rotations for images, feature permutations for flat inputs). Data whose samples already come
from different domains (several source datasets) use :func:`source_domain_partition_indices`.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

SCHEMES = ("iid", "dirichlet", "shards", "natural")
DOMAIN_KINDS = ("rotate", "permute")
_PERMUTE_SEED = 0x5EED_D0  # domain permutations are fixed: independent of the run's seed


@lru_cache(maxsize=1)
def _columnar_dataset_class():
    import datasets  # heavy import, deferred: only partitioning needs it

    class ColumnarDataset(datasets.Dataset):
        """datasets 4 answers ``ds["label"]`` with a lazy Column that ``np.array()`` reads row
        by row (~1 s per 60k rows, inside DirichletPartitioner); read the arrow column instead."""

        def __getitem__(self, key):
            if isinstance(key, str) and self._indices is None:
                return self._data.column(key).to_numpy()
            return super().__getitem__(key)

    return ColumnarDataset


def _label_dataset(labels: np.ndarray, idx: np.ndarray, natural_ids: np.ndarray | None = None):
    """An in-memory ``datasets.Dataset`` with columns ``label``, ``idx`` (and ``nid``)."""
    cols = {"label": np.asarray(labels, dtype=np.int64), "idx": np.asarray(idx, dtype=np.int64)}
    if natural_ids is not None:
        cols["nid"] = np.asarray(natural_ids)
    return _columnar_dataset_class().from_dict(cols)


def _read_back(partitioner, ds, num_partitions: int) -> list[np.ndarray]:
    """Each partition's ``idx`` column, sorted. Silences the partitioners' progress bar
    (NaturalIdPartitioner) and pyarrow's FutureWarning from sorting (ShardPartitioner)."""
    partitioner.dataset = ds
    out = []
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore", FutureWarning)
        for i in range(num_partitions):
            table = partitioner.load_partition(i).with_format("arrow")[:]  # a pyarrow Table
            out.append(np.sort(table.column("idx").to_numpy().astype(np.int64)))
    return out


def default_min_partition_size(num_samples: int, num_partitions: int) -> int:
    """Dirichlet's first-try minimum partition size: ``min(10, avg_size // 4)``, at least 1."""
    return max(1, min(10, num_samples // max(1, 4 * num_partitions)))


def _dirichlet(labels, num_partitions, seed, alpha, min_partition_size, self_balancing):
    from flwr_datasets.partitioner import DirichletPartitioner

    if not alpha > 0:
        raise ValueError(f"Dirichlet alpha must be > 0, got {alpha}")
    ds = _label_dataset(labels, np.arange(len(labels)))
    m = (
        default_min_partition_size(len(labels), num_partitions)
        if min_partition_size is None
        else int(min_partition_size)
    )
    # flwr-datasets redraws up to 11 times until every partition has >= m samples and then
    # raises; halving m down to 0 (always satisfied) guarantees termination.
    while True:
        part = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=float(alpha),
            min_partition_size=m,
            self_balancing=self_balancing,
            seed=seed,
        )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return _read_back(part, ds, num_partitions)
        except ValueError:
            if m == 0:
                raise
            m //= 2


def _shards(labels, num_partitions, seed, shards_per_partition):
    from flwr_datasets.partitioner import ShardPartitioner

    n = len(labels)
    if num_partitions * shards_per_partition > n:
        raise ValueError(
            f"{num_partitions} partitions x {shards_per_partition} shards need at least "
            f"{num_partitions * shards_per_partition} samples, got {n}"
        )
    part = ShardPartitioner(
        num_partitions=num_partitions,
        partition_by="label",
        num_shards_per_partition=int(shards_per_partition),
        seed=seed,
    )
    parts = _read_back(part, _label_dataset(labels, np.arange(n)), num_partitions)
    # flwr-datasets drops the remainder (fewer than num_partitions * shards samples) when the
    # shard size does not divide n. Give each left-over sample to the partition already holding
    # that label with the fewest samples (the smallest partition if none holds it), so every
    # sample is used exactly once and the label skew is kept.
    used = np.zeros(n, dtype=bool)
    for p in parts:
        used[p] = True
    classes, codes = np.unique(labels, return_inverse=True)
    holds = np.stack([np.bincount(codes[p], minlength=len(classes)) > 0 for p in parts])
    extra: list[list[int]] = [[] for _ in parts]
    sizes = np.array([len(p) for p in parts])
    for j in np.flatnonzero(~used):
        holders = np.flatnonzero(holds[:, codes[j]])
        i = int(holders[np.argmin(sizes[holders])]) if len(holders) else int(np.argmin(sizes))
        extra[i].append(int(j))
        sizes[i] += 1
    return [np.sort(np.concatenate([p, np.asarray(e, dtype=np.int64)]))
            for p, e in zip(parts, extra)]


def partition_indices(
    labels: np.ndarray,
    scheme: str,
    num_partitions: int | None,
    seed: int = 0,
    *,
    alpha: float = 0.3,
    shards_per_partition: int = 2,
    natural_ids: Sequence | np.ndarray | None = None,
    min_partition_size: int | None = None,
    self_balancing: bool = False,
) -> list[np.ndarray]:
    """Split ``range(len(labels))`` into partitions; returns sorted int64 index arrays.

    Args:
        labels: int labels, one per sample.
        scheme: ``"iid"`` (IidPartitioner over a seeded shuffle), ``"dirichlet"``
            (DirichletPartitioner: per class, proportions ~ Dir(alpha) over partitions),
            ``"shards"`` (ShardPartitioner: sort by label, cut into
            ``num_partitions * shards_per_partition`` shards, deal ``shards_per_partition`` to
            each; the remainder flwr-datasets would drop is dealt to partitions holding that
            label), ``"natural"`` (NaturalIdPartitioner over ``natural_ids``: one partition per
            distinct id, in sorted id order).
        num_partitions: number of partitions; for ``"natural"`` None or the number of ids.
        seed: seeds the partitioner; same seed, same partition.
        alpha: Dirichlet concentration (smaller is more skewed).
        shards_per_partition: shards per partition for ``"shards"``.
        natural_ids: per-sample ids for ``"natural"``.
        min_partition_size: Dirichlet's minimum partition size; default
            :func:`default_min_partition_size`. If it cannot be met it is halved (down to 0),
            so the call always terminates.
        self_balancing: Dirichlet option: stop giving samples to partitions above average size.

    Raises:
        ValueError: unknown scheme (naming the allowed ones) or impossible arguments.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if scheme not in SCHEMES:
        raise ValueError(f"unknown partition scheme {scheme!r}; allowed: {', '.join(SCHEMES)}")
    if scheme == "natural":
        from flwr_datasets.partitioner import NaturalIdPartitioner

        if natural_ids is None or len(natural_ids) != n:
            raise ValueError("scheme 'natural' needs natural_ids, one per sample")
        ids = np.asarray(natural_ids)
        k = len(np.unique(ids))
        if num_partitions is not None and num_partitions != k:
            raise ValueError(f"natural_ids hold {k} distinct ids, num_partitions={num_partitions}")
        ds = _label_dataset(labels, np.arange(n), ids)
        return _read_back(NaturalIdPartitioner(partition_by="nid"), ds, k)
    if num_partitions is None or not 1 <= num_partitions <= n:
        raise ValueError(f"num_partitions must be in [1, {n}], got {num_partitions}")
    if scheme == "iid":
        from flwr_datasets.partitioner import IidPartitioner

        perm = np.random.default_rng(seed).permutation(n)  # IidPartitioner cuts contiguous blocks
        ds = _label_dataset(labels[perm], perm)
        return _read_back(IidPartitioner(num_partitions), ds, num_partitions)
    if scheme == "dirichlet":
        return _dirichlet(labels, num_partitions, seed, alpha, min_partition_size, self_balancing)
    return _shards(labels, num_partitions, seed, shards_per_partition)


def _derived_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def domain_partition_indices(
    labels: np.ndarray,
    num_partitions: int,
    num_domains: int,
    seed: int = 0,
    *,
    alpha: float | None = 0.3,
    min_partition_size: int | None = None,
) -> tuple[list[np.ndarray], np.ndarray]:
    """Domain-skewed partition: returns (per-client sorted indices, per-client domain).

    Client ``i`` belongs to domain ``i % num_domains``. Samples are first dealt to domains,
    stratified by label, in proportion to each domain's number of clients; inside a domain
    labels are split among its clients Dirichlet(alpha) (``alpha=None``: IID). Every sample is
    used exactly once. Apply :class:`DomainTransform` to each client's inputs.
    """
    labels = np.asarray(labels)
    if num_domains < 1 or num_partitions < 1:
        raise ValueError("num_domains and num_partitions must be >= 1")
    client_domains = np.arange(num_partitions) % num_domains
    share = np.bincount(client_domains, minlength=num_domains) / num_partitions
    rng = np.random.default_rng(_derived_seed(seed, 0xD0))
    sample_domain = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        cuts = np.round(np.cumsum(share)[:-1] * len(idx)).astype(int)
        for d, chunk in enumerate(np.split(idx, cuts)):
            sample_domain[chunk] = d
    return _split_inside_domains(labels, sample_domain, client_domains, seed, alpha, min_partition_size), client_domains


def _split_inside_domains(labels, sample_domain, client_domains, seed, alpha, min_partition_size):
    """Per client, its share of its domain's samples: Dirichlet(alpha) over labels (None: IID)."""
    parts: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * len(client_domains)
    for d in range(int(client_domains.max()) + 1):
        members = np.flatnonzero(client_domains == d)
        if len(members) == 0:
            continue
        pool = np.flatnonzero(sample_domain == d)
        scheme = "iid" if alpha is None else "dirichlet"
        sub = partition_indices(
            labels[pool], scheme, len(members), _derived_seed(seed, d),
            alpha=alpha or 1.0, min_partition_size=min_partition_size,
        )
        for client, p in zip(members, sub):
            parts[client] = np.sort(pool[p])
    return parts


def clients_per_domain(domain_sizes: Sequence[int] | np.ndarray, num_partitions: int) -> np.ndarray:
    """Clients of each domain, proportional to its samples (largest remainder), at least one each:
    a domain short of one takes it from the domain with the most clients."""
    sizes = np.asarray(domain_sizes, dtype=np.float64)
    if len(sizes) < 1 or (sizes < 1).any():
        raise ValueError(f"every domain needs samples, got sizes {sizes.astype(int).tolist()}")
    if num_partitions < len(sizes):
        raise ValueError(f"{len(sizes)} domains need at least {len(sizes)} clients, got {num_partitions}")
    quota = sizes / sizes.sum() * num_partitions
    counts = np.floor(quota).astype(np.int64)
    order = np.argsort(-(quota - counts), kind="stable")
    counts[order[: num_partitions - counts.sum()]] += 1
    for d in np.flatnonzero(counts == 0):
        counts[np.argmax(counts)] -= 1
        counts[d] = 1
    return counts


def source_domain_partition_indices(
    labels: np.ndarray,
    sample_domains: np.ndarray,
    num_partitions: int,
    seed: int = 0,
    *,
    alpha: float | None = 0.3,
    min_partition_size: int | None = None,
) -> tuple[list[np.ndarray], np.ndarray]:
    """Partition by natural domains (e.g. the source dataset of each sample): returns
    (per-client sorted indices, per-client domain).

    Domain ``d`` gets :func:`clients_per_domain` clients, in proportion to its samples; client
    ids interleave the domains (client ``i`` takes the domain whose next client is due first,
    ``(j + 0.5) / n_d`` for its ``j``-th of ``n_d``; equal counts give ``i % K``). Inside a domain
    labels are split among its clients Dirichlet(alpha) (``alpha=None``: IID). Every sample is
    used exactly once; no input transform.
    """
    labels, sample_domains = np.asarray(labels), np.asarray(sample_domains, dtype=np.int64)
    if len(sample_domains) != len(labels) or (len(labels) and sample_domains.min() < 0):
        raise ValueError("sample_domains must hold one domain id >= 0 per label")
    counts = clients_per_domain(np.bincount(sample_domains), num_partitions)
    due = np.concatenate([(np.arange(n) + 0.5) / n for n in counts])
    client_domains = np.repeat(np.arange(len(counts)), counts)[np.argsort(due, kind="stable")]
    return _split_inside_domains(labels, sample_domains, client_domains, seed, alpha, min_partition_size), client_domains


@dataclass(frozen=True)
class DomainTransform:
    """The fixed input transform of each of ``num_domains`` domains; domain 0 is the identity.

    Attributes:
        kind: ``"rotate"``: domain ``d`` rotates images by ``360 * d / num_domains`` degrees
            counter-clockwise (0/90/180/270 for 4 domains, exact via ``np.rot90``; other angles
            use bilinear ``scipy.ndimage.rotate``) over the last two axes, or over
            ``image_shape`` when inputs are flat (e.g. digits: ``(8, 8)``).
            ``"permute"``: domain ``d`` permutes the last axis with a fixed permutation
            (seeded by ``d`` only, the same in every run).
        num_domains: K.
        image_shape: (H, W) view of flat inputs for ``"rotate"``; None for inputs ``[..., H, W]``.
    """

    kind: str
    num_domains: int
    image_shape: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.kind not in DOMAIN_KINDS:
            allowed = ", ".join(DOMAIN_KINDS)
            raise ValueError(f"unknown domain transform {self.kind!r}; allowed: {allowed}")
        if self.num_domains < 1:
            raise ValueError(f"num_domains must be >= 1, got {self.num_domains}")

    def angle(self, domain: int) -> float:
        """Rotation of ``domain`` in degrees (``"rotate"`` only)."""
        return 360.0 * domain / self.num_domains

    def permutation(self, domain: int, dim: int) -> np.ndarray:
        """Feature permutation of ``domain`` for ``dim`` features (``"permute"`` only)."""
        if domain % self.num_domains == 0:
            return np.arange(dim)
        rng = np.random.default_rng([_PERMUTE_SEED, domain % self.num_domains, dim])
        return rng.permutation(dim)

    def __call__(self, x: np.ndarray, domain: int) -> np.ndarray:
        """Transform a batch ``x`` (first axis = samples) that all belong to ``domain``."""
        domain = int(domain) % self.num_domains
        if domain == 0:
            return x
        if self.kind == "permute":
            return np.ascontiguousarray(x[..., self.permutation(domain, x.shape[-1])])
        flat_shape = x.shape
        if self.image_shape is not None:
            x = x.reshape(x.shape[:-1] + tuple(self.image_shape))
        angle = self.angle(domain)
        if angle % 90 == 0:
            out = np.rot90(x, k=int(angle // 90), axes=(-2, -1))
        else:
            from scipy.ndimage import rotate

            # axes=(-1, -2) turns the same way as np.rot90(axes=(-2, -1)): counter-clockwise.
            out = rotate(x, angle, axes=(-1, -2), reshape=False, order=1, mode="constant")
        return np.ascontiguousarray(out.reshape(flat_shape), dtype=x.dtype)

    def apply(self, x: np.ndarray, domains: np.ndarray) -> np.ndarray:
        """Transform each sample ``x[j]`` with its own ``domains[j]``."""
        out = np.empty_like(x)
        for d in np.unique(domains):
            sel = domains == d
            out[sel] = self(x[sel], int(d))
        return out
