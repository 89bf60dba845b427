"""Datasets that need the Hugging Face Hub, loaded through ``flwr_datasets.FederatedDataset``.

=======  ==================  ====================================  =======  ===========
name     Hub dataset         input per sample                      classes  natural id
=======  ==================  ====================================  =======  ===========
cifar10  uoft-cs/cifar10     float32 [3, 32, 32] in [0, 1]         10       -
femnist  flwrlabs/femnist    float32 [1, 28, 28] in [0, 1]         62       writer_id
ag_news  fancyzhx/ag_news    int64 [max_len] hashed word ids, 0 pad  4      -
=======  ==================  ====================================  =======  ===========

:func:`load_online` returns the same :class:`~fedmoe_flwr.data.federated.FederatedData` as the
offline loaders. Without the Hub (``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` set, or the
endpoint unreachable within ``timeout`` seconds) it raises ``RuntimeError`` at once, naming the
offline datasets, instead of hanging in a download. A dataset already in the local HF cache
still loads when the offline flags were set before ``datasets`` was imported.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import zlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from urllib.parse import urlparse

import numpy as np

from fedmoe_flwr.data.catalog import ArrayPool
from fedmoe_flwr.data.federated import FederatedData, split_holdout
from fedmoe_flwr.data.partition import _derived_seed


@dataclass(frozen=True)
class OnlineSpec:
    """How to read one Hub dataset: columns, kind of input, splits."""

    hf_name: str
    x_column: str
    y_column: str
    kind: str  # "image" | "text"
    num_classes: int
    test_split: str | None  # None: carve a seeded test slice out of the clients' data
    natural_id: str | None = None


ONLINE_DATASETS = {
    "cifar10": OnlineSpec("uoft-cs/cifar10", "img", "label", "image", 10, "test"),
    "femnist": OnlineSpec("flwrlabs/femnist", "image", "character", "image", 62, None, "writer_id"),
    "ag_news": OnlineSpec("fancyzhx/ag_news", "text", "label", "text", 4, "test"),
}
ONLINE_PARTITIONERS = ("iid", "dirichlet", "shards", "natural")
OFFLINE_HINT = (
    "Offline alternatives (no download): load_federated('fashion_mnist' | 'mnist5k' | "
    "'digits' | 'synthetic' | 'shakespeare', ...); fashion_mnist needs "
    "`apt-get install dataset-fashion-mnist`."
)
_TRUE = ("1", "true", "yes", "on")
_TOKEN = re.compile(r"[a-z0-9']+")


def hub_endpoint() -> str:
    """The Hub endpoint ``datasets`` would use (``$HF_ENDPOINT`` or https://huggingface.co)."""
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def hub_reachable(endpoint: str | None = None, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the endpoint opens within ``timeout`` s (DNS included)."""
    url = urlparse(endpoint or hub_endpoint())
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    ok: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)  # getaddrinfo has no timeout of its own
    t.start()
    t.join(timeout)
    return bool(ok)


def _offline_reason(timeout: float) -> str | None:
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return f"{var} is set"
    if not hub_reachable(timeout=timeout):
        return f"{hub_endpoint()} is not reachable within {timeout:g} s"
    return None


def _cached_offline_ok(hf_name: str) -> bool:
    """True when ``datasets`` runs in offline mode and holds ``hf_name`` in its cache."""
    import datasets.config as dc

    return bool(dc.HF_HUB_OFFLINE) and (dc.HF_DATASETS_CACHE / hf_name.replace("/", "___")).exists()


def hash_tokens(texts, max_len: int = 64, vocab_size: int = 2**15) -> np.ndarray:
    """Texts -> int64 ``[n, max_len]``: lower-cased words hashed (crc32) into
    ``1..vocab_size-1``; 0 pads."""
    out = np.zeros((len(texts), max_len), dtype=np.int64)
    for i, text in enumerate(texts):
        toks = _TOKEN.findall(str(text).lower())[:max_len]
        out[i, : len(toks)] = [1 + zlib.crc32(t.encode()) % (vocab_size - 1) for t in toks]
    return out


def _image_array(values) -> np.ndarray:
    """PIL images / arrays / nested lists -> uint8 ``[n, C, H, W]``."""
    if not len(values):
        return np.zeros((0, 1, 1, 1), np.uint8)
    arr = np.stack([np.asarray(v) for v in values])
    if arr.dtype != np.uint8:  # floats in [0, 1] or other integer types
        arr = arr * 255.0 if arr.max(initial=0) <= 1.0 else arr
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    if arr.ndim == 3:  # [n, H, W] grayscale
        arr = arr[:, None]
    elif arr.ndim == 4 and arr.shape[-1] in (1, 3, 4) and arr.shape[1] not in (1, 3, 4):
        arr = arr.transpose(0, 3, 1, 2)  # channels last -> channels first
    return np.ascontiguousarray(arr)


def hf_to_numpy(ds, x_column: str, y_column: str, kind: str, *, max_len: int = 64,
                vocab_size: int = 2**15) -> tuple[np.ndarray, np.ndarray]:
    """One ``datasets.Dataset`` (e.g. a FederatedDataset partition) -> (x, y int64).

    ``kind="image"``: x uint8 ``[n, C, H, W]`` (PIL images, arrays and lists accepted).
    ``kind="text"``: x int64 ``[n, max_len]`` from :func:`hash_tokens`.
    """
    if kind not in ("image", "text"):
        raise ValueError(f"unknown kind {kind!r}; allowed: image, text")
    # Whole columns at once: datasets 4 iterates a Column row by row.
    table = ds.with_format("arrow")[:]
    y = table.column(y_column).to_numpy().astype(np.int64)
    if kind == "text":
        return hash_tokens(table.column(x_column).to_pylist(), max_len, vocab_size), y
    images = ds.select_columns([x_column]).with_format("numpy")[:][x_column]  # decodes PIL/bytes
    return _image_array(list(images)), y
    raise ValueError(f"unknown kind {kind!r}; allowed: image, text")


def assemble(
    name: str,
    spec: OnlineSpec,
    parts: list[tuple[np.ndarray, np.ndarray]],
    test: tuple[np.ndarray, np.ndarray] | None,
    *,
    seed: int = 0,
    holdout_fraction: float = 0.2,
    test_fraction: float = 0.1,
    vocab_size: int | None = None,
    client_names: tuple[str, ...] | None = None,
    config: tuple = (),
) -> FederatedData:
    """Per-client arrays (+ an optional test set) -> :class:`FederatedData`.

    Without ``test``, a seeded ``test_fraction`` of every client's data becomes the global test set.
    """
    sizes = [len(y) for _, y in parts]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    xs = [x for x, _ in parts] + ([test[0]] if test is not None else [])
    ys = [y for _, y in parts] + ([test[1]] if test is not None else [])
    x_all, y_all = np.concatenate(xs), np.concatenate(ys)
    if spec.kind == "image":
        pool = ArrayPool(x_all, y_all, tuple(x_all.shape[1:]), scale=1 / 255)
    else:
        pool = ArrayPool(x_all, y_all, tuple(x_all.shape[1:]), dtype=np.int64)
    client_idx = [np.arange(offsets[i], offsets[i + 1]) for i in range(len(parts))]
    if test is not None:
        test_idx = offsets[-1] + np.arange(len(test[1]))
    else:
        rng = np.random.default_rng(_derived_seed(seed, 0x7E57))
        held = []
        for i, idx in enumerate(client_idx):
            perm = rng.permutation(idx)
            k = min(int(round(test_fraction * len(perm))), max(len(perm) - 2, 0))
            held.append(perm[:k])
            client_idx[i] = np.sort(perm[k:])
        test_idx = np.sort(np.concatenate(held))
    train, hold = split_holdout(client_idx, holdout_fraction, seed)
    task = "classification" if spec.kind == "image" else "text_classification"
    return FederatedData(
        name, task, spec.num_classes, pool.shape, pool, train, hold, pool, test_idx,
        vocab_size=vocab_size, client_names=client_names, config=config,
    )


def _make_partitioner(
    spec: OnlineSpec, partitioner: str, num_clients: int, alpha: float, seed: int,
    shards_per_partition: int,
):
    from flwr_datasets import partitioner as P

    if partitioner == "iid":
        return P.IidPartitioner(num_clients)
    if partitioner == "dirichlet":
        return P.DirichletPartitioner(
            num_clients, spec.y_column, alpha=alpha, min_partition_size=10, seed=seed
        )
    if partitioner == "shards":
        return P.ShardPartitioner(
            num_clients, spec.y_column, num_shards_per_partition=shards_per_partition, seed=seed
        )
    if spec.natural_id is None:
        raise ValueError("this dataset has no natural partition; use iid, dirichlet or shards")
    return P.NaturalIdPartitioner(partition_by=spec.natural_id)


@lru_cache(maxsize=4)
def load_online(
    name: str,
    num_clients: int,
    partitioner: str = "dirichlet",
    alpha: float = 0.3,
    seed: int = 0,
    holdout_fraction: float = 0.2,
    max_train_samples: int | None = None,
    *,
    test_fraction: float = 0.1,
    shards_per_partition: int = 2,
    max_len: int = 64,
    vocab_size: int = 2**15,
    timeout: float = 3.0,
    cache_dir: str | None = None,
) -> FederatedData:
    """Download (or read from the HF cache) ``name``; split it with ``flwr_datasets``.

    Args match :func:`~fedmoe_flwr.data.federated.load_federated`. ``partitioner="natural"``
    (femnist only: one client per writer) takes ``num_clients`` writers in a seeded order.
    ``max_train_samples`` keeps a proportional share of every client's data. ``max_len`` and
    ``vocab_size`` shape the hashed tokens of ag_news. ``timeout`` bounds the connectivity check.
    ``cache_dir`` overrides the HF datasets cache.

    Raises:
        ValueError: unknown name or partitioner (naming the allowed values).
        RuntimeError: the Hub is unavailable or loading failed; the message names the offline
            alternatives.
    """
    if name not in ONLINE_DATASETS:
        raise ValueError(f"unknown online dataset {name!r}; allowed: {', '.join(ONLINE_DATASETS)}")
    if partitioner not in ONLINE_PARTITIONERS:
        allowed = ", ".join(ONLINE_PARTITIONERS)
        raise ValueError(f"unknown partitioner {partitioner!r}; allowed: {allowed}")
    spec = ONLINE_DATASETS[name]
    reason = _offline_reason(timeout)
    if reason is not None and not _cached_offline_ok(spec.hf_name):
        raise RuntimeError(
            f"cannot load {name} ({spec.hf_name}) from the Hugging Face Hub: {reason}. "
            + OFFLINE_HINT
        )
    try:
        from flwr_datasets import FederatedDataset

        part = _make_partitioner(spec, partitioner, num_clients, alpha, seed, shards_per_partition)
        extra = {} if cache_dir is None else {"cache_dir": cache_dir}
        fds = FederatedDataset(
            dataset=spec.hf_name, partitioners={"train": part}, shuffle=True, seed=seed, **extra
        )
        fds.load_partition(0, "train")  # downloads, and hands the train split to the partitioner
        total = part.num_partitions if partitioner == "natural" else num_clients
        if total < num_clients:
            raise ValueError(f"{name} has {total} natural partitions; asked for {num_clients}")
        pids = np.random.default_rng(_derived_seed(seed, 0x5A)).permutation(total)[:num_clients]
        n_train = fds.load_split("train").num_rows

        def convert(ds):
            return hf_to_numpy(ds, spec.x_column, spec.y_column, spec.kind,
                               max_len=max_len, vocab_size=vocab_size)

        parts = []
        for pid in pids:
            ds = fds.load_partition(int(pid), "train")
            if max_train_samples is not None and max_train_samples < n_train:
                keep = max(1, int(np.ceil(ds.num_rows * max_train_samples / n_train)))
                ds = ds.select(range(min(keep, ds.num_rows)))  # partitions come shuffled
            parts.append(convert(ds))
        test = None if spec.test_split is None else convert(fds.load_split(spec.test_split))
    except (ValueError, TypeError):
        raise
    except Exception as e:  # network, Hub and format errors alike: report them one way
        raise RuntimeError(f"loading {name} ({spec.hf_name}) failed: {e!r}. {OFFLINE_HINT}") from e
    names = None
    if partitioner == "natural":
        names = tuple(str(part.partition_id_to_natural_id[int(p)]) for p in pids)
    config: tuple[tuple[str, Any], ...] = (
        ("partitioner", partitioner), ("alpha", alpha), ("seed", seed),
        ("holdout_fraction", holdout_fraction), ("max_train_samples", max_train_samples),
    )
    return assemble(name, spec, parts, test, seed=seed, holdout_fraction=holdout_fraction,
                    test_fraction=test_fraction,
                    vocab_size=vocab_size if spec.kind == "text" else None,
                    client_names=names, config=config)
