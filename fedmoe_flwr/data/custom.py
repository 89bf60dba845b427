"""A user's own dataset, named by an import string (``dataset=custom dataset.loader=my_pkg.data:load``).

The loader is called with no arguments (``seed=`` when it takes one) and returns one of:

- ``(x, y)``: inputs ``[n, ...]`` (float arrays become float32, integer arrays int64, e.g.
  token ids) and integer class labels ``[n]`` in ``0..C-1``;
- ``(x, y, client_ids)``: plus a natural client id per sample (any hashable values), for
  ``dataset.partitioner=natural``;
- a Hugging Face ``datasets.Dataset``: ``feature_column`` (default: the one column that is
  neither the label nor the id column), ``label_column`` (``"label"``), optional ``id_column``.

A seeded, stratified ``test_fraction`` of the samples is the global test set; the rest is
split among the clients by the partitioners of :func:`~fedmoe_flwr.data.load_federated`
(``iid``, ``dirichlet``, ``shards``, or ``natural`` by the client ids). Anything else the
loader returns raises ValueError naming ``dataset.loader``.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from fedmoe_flwr.data.catalog import ArrayPool, Source, _stratified_test
from fedmoe_flwr.data.federated import FederatedData, federate
from fedmoe_flwr.imports import call_with_accepted, import_object

CUSTOM_PARTITIONERS = ("iid", "dirichlet", "shards", "natural")
SETTING = "dataset.loader"


def _from_hf(ds, feature_column: str, label_column: str, id_column: str, where: str):
    cols = list(ds.column_names)
    for role, col in (("label_column", label_column), ("id_column", id_column), ("feature_column", feature_column)):
        if col and col not in cols:
            raise ValueError(f"{where}: the dataset has no column {col!r} (dataset.{role}); its columns: {cols}")
    if not feature_column:
        rest = [c for c in cols if c not in (label_column, id_column)]
        if len(rest) != 1:
            raise ValueError(f"{where}: set dataset.feature_column to one of {rest} (columns: {cols})")
        feature_column = rest[0]
    if label_column not in cols:
        raise ValueError(f"{where}: the dataset has no label column {label_column!r} (dataset.label_column); its columns: {cols}")
    table = ds.with_format("numpy")
    out = [np.asarray(table[feature_column]), np.asarray(table[label_column])]
    if id_column:
        out.append(np.asarray(table[id_column]))
    return tuple(out)


def _arrays(raw, feature_column: str, label_column: str, id_column: str, where: str):
    """``(x, y, ids or None)`` from what the loader returned, checked."""
    if hasattr(raw, "column_names") and hasattr(raw, "with_format"):  # a datasets.Dataset
        raw = _from_hf(raw, feature_column, label_column, id_column, where)
    if not isinstance(raw, (tuple, list)) or len(raw) not in (2, 3):
        raise ValueError(f"{where} returned {type(raw).__name__}; expected (x, y), (x, y, client_ids) "
                         "or a datasets.Dataset")
    try:
        x, y = np.asarray(raw[0]), np.asarray(raw[1])
    except (TypeError, ValueError) as ex:
        raise ValueError(f"{where}: x and y must be arrays ({ex})") from ex
    ids = np.asarray(raw[2]) if len(raw) == 3 else None
    n = len(y)
    if x.ndim < 2 or y.ndim != 1 or len(x) != n or (ids is not None and (ids.ndim != 1 or len(ids) != n)):
        shapes = [np.shape(v) for v in raw]
        raise ValueError(f"{where} returned shapes {shapes}; expected x [n, ...], y [n]"
                         + (", client_ids [n]" if ids is not None else ""))
    if n < 2:
        raise ValueError(f"{where} returned {n} samples")
    if x.dtype.kind not in "fiub":
        raise ValueError(f"{where}: x has dtype {x.dtype}; expected numbers")
    if y.dtype.kind not in "iu" and not (y.dtype.kind == "f" and np.all(np.mod(y, 1) == 0)):
        raise ValueError(f"{where}: y must hold integer class labels, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if y.min() < 0:
        raise ValueError(f"{where}: class labels must be >= 0, got {int(y.min())}")
    x = x.astype(np.float32) if x.dtype.kind == "f" else x.astype(np.int64)
    return x, y, ids


@lru_cache(maxsize=4)
def load_custom(
    loader: str,
    num_clients: int,
    partitioner: str = "dirichlet",
    alpha: float = 0.3,
    seed: int = 0,
    holdout_fraction: float = 0.2,
    max_train_samples: int | None = None,
    *,
    feature_column: str = "",
    label_column: str = "label",
    id_column: str = "",
    test_fraction: float = 0.2,
) -> FederatedData:
    """The user's dataset ``loader`` (an import string) split among ``num_clients`` clients."""
    if partitioner not in CUSTOM_PARTITIONERS:
        raise ValueError(f"unknown partitioner {partitioner!r} for a custom dataset; allowed: {', '.join(CUSTOM_PARTITIONERS)}")
    where = f"{SETTING}={loader!r}"
    fn = import_object(loader, SETTING)
    x, y, ids = _arrays(call_with_accepted(fn, {"seed": int(seed)}, SETTING), feature_column, label_column, id_column, where)
    if partitioner == "natural" and ids is None:
        raise ValueError(f"{where}: partitioner=natural needs client ids: return (x, y, client_ids) or set dataset.id_column")
    pool = ArrayPool(x, y, x.shape[1:], dtype=x.dtype)
    train, test = _stratified_test(y, float(test_fraction), int(seed))
    names = codes = None
    if ids is not None:
        uniq, inverse = np.unique(ids.astype(str), return_inverse=True)
        names, codes = tuple(str(u) for u in uniq), inverse.astype(np.int64)[train]
    num_classes = int(y.max()) + 1
    src = Source("classification", num_classes, tuple(int(s) for s in x.shape[1:]), pool, train, pool, test,
                 natural_ids=codes, natural_names=names)
    return federate("custom", src, int(num_clients), partitioner, float(alpha), int(seed), float(holdout_fraction),
                    None if max_train_samples is None else int(max_train_samples), (("loader", loader),))
