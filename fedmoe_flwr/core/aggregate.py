"""Per-expert aggregation and server optimizers (docs/architecture.md#aggregation).

Tensors are plain ``dict[str, np.ndarray]`` keyed by state-dict name; a
:class:`~fedmoe_flwr.layout.ParamLayout` says which names are shared, routers or experts.

- shared (non-router) tensors: mean of deltas weighted by ``num_samples``;
- expert ``k``: mean of deltas over only the clients that held it, weighted by the tokens
  routed to ``k`` (``weighting="tokens"``);
- router row ``e`` of layer ``l``: mean over the clients that held expert ``L{l}.E{e}``,
  weighted by ``num_samples``; rows nobody held are left bit-identical;
- a tensor no client touched is returned as the very same array object (bit-identical);
- LoRA adapters (the layout's ``lora_pairs``, with ``lora="product"``): the weighted mean
  of each holder's product ``B_i @ A_i``, re-factorised at rank r (:mod:`.lora`), instead
  of averaging A and B separately (biased).

Means fold each update into running weighted sums (no stacking); the robust
``median`` / ``trimmed_mean`` need every contributor's value per coordinate and so stack
the deltas of one tensor at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..layout import ParamLayout, expert_key
from .lora import LORA_AGGREGATIONS, merge_pair
from .selection import SELECTIONS, assumed_byzantine, enough, select

__all__ = ["ClientUpdate", "ServerOptState", "aggregate_experts", "server_step"]


@dataclass(frozen=True)
class ClientUpdate:
    """One client's reply, after validation.

    Attributes:
        client_id: stable client id.
        params: trained VALUES (not deltas) of the tensors it held: shared + its experts.
        held: expert keys it held and trained.
        num_samples: samples it trained on (weight of shared and router tensors).
        tokens: expert key -> tokens routed to it during training (weight of experts).
    """

    client_id: str
    params: dict[str, np.ndarray]
    held: frozenset[str]
    num_samples: int
    tokens: dict[str, float] = field(default_factory=dict)


def _row_weights(name: str, layer: int, u: ClientUpdate, rows: int) -> np.ndarray:
    """Per-row weight of a router tensor: ``num_samples`` on rows of held experts, else 0."""
    held = np.array([expert_key(layer, e) in u.held for e in range(rows)])
    return np.where(held, float(u.num_samples), 0.0)


def _contributions(global_params, updates, layout, weighting, clip_norm, clipped: list):
    """Yield ``(client_id, name, weight, delta)`` per update and tensor; weight is a scalar or ``[rows]``.

    ``clip_norm`` scales each client's whole delta (all its counted tensors) to norm <=
    clip_norm; ids of clipped clients are appended to ``clipped``.
    """
    owner = layout.expert_of
    for u in updates:
        unknown = [n for n in u.params if n not in global_params]
        if unknown:
            raise ValueError(f"update from {u.client_id!r} has unknown tensors {unknown[:3]}")
        names = [n for n in u.params if n not in owner or owner[n] in u.held]
        deltas = {n: np.asarray(u.params[n], np.float64) - global_params[n] for n in names}
        scale = 1.0
        if clip_norm is not None:
            norm = float(np.sqrt(sum(float(np.sum(d * d)) for d in deltas.values())))
            if norm > clip_norm:
                scale = clip_norm / norm
                clipped.append(u.client_id)
        for n, d in deltas.items():
            if n in layout.router_params:
                w = _row_weights(n, layout.router_params[n], u, d.shape[0])
            elif n in owner:
                w = _expert_weight(u, owner[n], weighting)
            else:
                w = float(u.num_samples)
            yield u.client_id, n, w, d * scale if scale != 1.0 else d


def _expert_weight(u: ClientUpdate, key: str, weighting: str) -> float:
    if weighting == "tokens":
        return float(u.tokens.get(key, 0.0))
    if weighting == "samples":
        return float(u.num_samples)
    if weighting == "uniform":
        return 1.0
    raise ValueError(f"weighting must be 'tokens', 'samples' or 'uniform', got {weighting!r}")


def _bcast(w, d: np.ndarray) -> np.ndarray:
    """A scalar weight, or a per-row weight shaped to broadcast over ``d``."""
    w = np.asarray(w, dtype=np.float64)
    return w.reshape(w.shape + (1,) * (d.ndim - w.ndim))


class _Mean:
    """Running weighted sum of one tensor's deltas (fedjax-style folding).

    Weights are scalars, or ``[rows]`` for routers. An unweighted sum is kept too, so that
    coordinates whose contributors all have weight 0 (e.g. an expert that got 0 tokens
    everywhere) fall back to equal weights.
    """

    def __init__(self, shape):
        self.acc = np.zeros(shape)
        self.eq_acc = np.zeros(shape)
        self.wsum = 0.0
        self.eq_cnt = 0.0

    def add(self, w, d: np.ndarray) -> None:
        wb = _bcast(w, d)
        present = _bcast(np.asarray(w) > 0, d) if np.ndim(w) else 1.0  # router: held rows
        self.acc += wb * d
        self.eq_acc += present * d
        self.wsum = self.wsum + wb
        self.eq_cnt = self.eq_cnt + present

    def result(self) -> np.ndarray:
        wsum = np.broadcast_to(self.wsum, self.acc.shape)
        cnt = np.broadcast_to(self.eq_cnt, self.acc.shape)
        with np.errstate(invalid="ignore", divide="ignore"):
            weighted = self.acc / wsum
            equal = self.eq_acc / cnt
        return np.where(wsum > 0, weighted, np.where(cnt > 0, equal, 0.0))


def _combine_robust(items, shape, method, trim_ratio, trim_count: int | None = None):
    """Coordinate-wise median / trimmed mean over contributors (zero-weight rows excluded);
    the trimmed mean cuts ``trim_count`` values at each end if given (at most ``(m - 1) // 2``),
    else ``floor(trim_ratio * m)``."""
    stack = np.full((len(items),) + tuple(shape), np.nan)
    for i, (w, d) in enumerate(items):
        mask = _bcast(np.asarray(w) > 0, d) if np.ndim(w) else True
        stack[i] = np.where(mask, d, np.nan)
    valid = np.isfinite(stack)
    m = valid.sum(axis=0)
    if method == "median":
        with np.errstate(all="ignore"):
            out = np.nanmedian(np.where(m > 0, stack, 0.0), axis=0)
        return np.where(m > 0, out, 0.0)
    srt = np.sort(stack, axis=0)  # NaN sort last
    t = np.floor(trim_ratio * m).astype(np.int64) if trim_count is None else np.minimum(trim_count, (m - 1) // 2)
    idx = np.arange(len(items)).reshape((-1,) + (1,) * len(shape))
    keep = (idx >= t) & (idx < m - t)
    cnt = keep.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(keep, srt, 0.0).sum(axis=0) / cnt
    return np.where(cnt > 0, out, 0.0)


def aggregate_experts(
    global_params: dict[str, np.ndarray],
    updates: list[ClientUpdate],
    layout: ParamLayout,
    *,
    weighting: str = "tokens",
    method: str = "mean",
    clip_norm: float | None = None,
    trim_ratio: float = 0.1,
    lora: str = "product",
    byzantine_fraction: float = 0.2,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict]:
    """Aggregate validated client updates per expert (module docstring).

    Args:
        global_params: the round's global tensors (every name in the model).
        updates: validated :class:`ClientUpdate` s.
        layout: which names are experts / routers / shared.
        weighting: expert weights: ``"tokens"`` routed to the expert (default),
            ``"samples"`` or ``"uniform"``. If an expert's contributors all have weight 0
            (e.g. 0 tokens), they are weighted equally (so it still moves).
        method: ``"mean"`` (weighted), the unweighted coordinate-wise ``"median"`` /
            ``"trimmed_mean"`` (``trim_ratio`` of contributors cut at each end), or a
            selection per group, ``"krum"`` / ``"multikrum"`` / ``"bulyan"``
            (:mod:`.selection`; ``byzantine_fraction`` sets each group's ``f``; groups too
            small for the rule fall back to the median, counted in ``stats["fallbacks"]``).
        clip_norm: if given, each update's delta (over all its tensors) is scaled down
            to at most this L2 norm before aggregation.
        lora: ``"product"`` (default): with ``method="mean"``, each of the layout's
            ``lora_pairs`` becomes the re-factorised weighted mean of its holders' products
            (their clipped values, the same weights); ``"factors"``: A and B averaged
            separately like any tensor (biased; kept to measure the bias).

    Returns:
        ``(new_params, delta, stats)``: ``new_params = global + delta`` in each tensor's
        dtype (untouched tensors are the input arrays themselves; untouched router rows
        are copied bit-for-bit); ``delta`` maps each *touched* name to its float64
        aggregated delta (the pseudo-gradient for :func:`server_step`; zero on router rows
        nobody held); ``stats`` has ``touched`` (sorted names), ``row_masks`` (router name
        -> bool [rows] of rows with contributors), ``expert_clients`` / ``expert_weight``
        (per expert key), ``untrained_experts``, ``clipped`` (updates scaled down) and
        ``num_updates``.
    """
    if method not in ("mean", "median", "trimmed_mean") + SELECTIONS:
        raise ValueError(f"method must be 'mean', 'median', 'trimmed_mean' or one of {SELECTIONS}, got {method!r}")
    if lora not in LORA_AGGREGATIONS:
        raise ValueError(f"lora must be one of {LORA_AGGREGATIONS}, got {lora!r}")
    pairs = layout.lora_pairs if lora == "product" and method == "mean" else {}
    factor_of = {n for a, b in pairs.items() for n in (a, b)}
    lora_items: dict[str, list] = {}  # factor name -> [(weight, clipped delta)] in update order
    folds: dict[str, _Mean] = {}
    stacks: dict[str, list] = {}
    row_masks: dict[str, np.ndarray] = {}
    clipped: list[str] = []
    items = list(_contributions(global_params, updates, layout, weighting, clip_norm, clipped))
    rule: dict[str, tuple[str, int]] = {}  # group -> (how its tensors combine, f)
    if method in SELECTIONS:
        items, rule = _select_groups(items, layout, method, byzantine_fraction)
    for cid, name, w, d in items:
        if name in layout.router_params:
            held = np.asarray(w) > 0
            row_masks[name] = row_masks[name] | held if name in row_masks else held
        if name in factor_of:
            lora_items.setdefault(name, []).append((w, d))
        how = rule.get(layout.expert_of.get(name, SHARED_GROUP), (method, 0))[0]
        if how in ("mean", "krum", "multikrum"):
            folds.setdefault(name, _Mean(d.shape)).add(w, d)
        else:
            stacks.setdefault(name, []).append((w, d))
    delta: dict[str, np.ndarray] = {}
    new_params = dict(global_params)
    for name in list(folds) + list(stacks):
        g = global_params[name]
        mask = row_masks.get(name)
        if mask is not None and not mask.any():
            del row_masks[name]
            continue
        how, f = rule.get(layout.expert_of.get(name, SHARED_GROUP), (method, 0))
        if name in folds:
            d = folds[name].result()
        elif how == "bulyan":
            d = _combine_robust(stacks[name], g.shape, "trimmed_mean", trim_ratio, trim_count=f)
        else:
            d = _combine_robust(stacks[name], g.shape, how, trim_ratio)
        delta[name] = d
        new = (np.asarray(g, np.float64) + d).astype(g.dtype)
        if mask is not None:
            new = np.where(_bcast(mask, new), new, g)
        new_params[name] = new
    for a, b in pairs.items():
        _merge_product(a, b, lora_items, global_params, new_params, delta)
    stats = _stats(updates, layout, weighting, delta, row_masks, clipped)
    stats["fallbacks"] = sorted(g for g, (how, _) in rule.items() if how == "median")
    return new_params, delta, stats


SHARED_GROUP = "shared"
"""The group of the tensors no expert owns (routers included), for the selection rules."""


def _select_groups(items: list, layout: ParamLayout, method: str, fraction: float):
    """The contributions the selection rule keeps, and per group ``(how, f)``: ``method``,
    or ``"median"`` where the group has too few contributors (:mod:`.selection`)."""
    vectors: dict[str, dict[str, list]] = {}
    for cid, name, _, d in items:
        vectors.setdefault(layout.expert_of.get(name, SHARED_GROUP), {}).setdefault(cid, []).append((name, d))
    keep, rule = set(), {}
    for group, by_client in vectors.items():
        cids = sorted(by_client)
        f = assumed_byzantine(len(cids), fraction)
        if not enough(method, len(cids), f):
            rule[group] = ("median", f)
            keep |= {(group, c) for c in cids}
            continue
        stack = np.stack([np.concatenate([d.ravel() for _, d in sorted(by_client[c], key=lambda t: t[0])]) for c in cids])
        rule[group] = (method, f)
        keep |= {(group, cids[i]) for i in select(stack, method, f)}
    kept = [it for it in items if (layout.expert_of.get(it[1], SHARED_GROUP), it[0]) in keep]
    return kept, rule


def _merge_product(a: str, b: str, items: dict[str, list], global_params, new_params, delta) -> None:
    """Overwrite the factor means of adapter (a, b) by the re-factorised mean product.

    Both factors of an adapter travel together (same owner, same holders, same weight);
    a pair with a mismatch keeps its factor means.
    """
    ia, ib = items.get(a, []), items.get(b, [])
    if not ia or len(ia) != len(ib):
        return
    ga, gb = np.asarray(global_params[a], np.float64), np.asarray(global_params[b], np.float64)
    weights = [float(np.max(w)) for w, _ in ia]
    new_a, new_b = merge_pair([ga + d for _, d in ia], [gb + d for _, d in ib], weights)
    for name, g, new in ((a, ga, new_a), (b, gb, new_b)):
        delta[name] = np.asarray(new, np.float64) - g
        new_params[name] = np.asarray(new).astype(global_params[name].dtype)


def _stats(updates, layout, weighting, delta, row_masks, clipped) -> dict:
    """Per-expert counts and weights, touched names, clipped clients."""
    clients = {k: 0 for k in layout.expert_keys}
    weight = {k: 0.0 for k in layout.expert_keys}
    for u in updates:
        for k in u.held:
            if k in clients and any(n in u.params for n in layout.expert_params[k]):
                clients[k] += 1
                weight[k] += _expert_weight(u, k, weighting)
    return {
        "num_updates": len(updates),
        "touched": sorted(delta),
        "row_masks": row_masks,
        "expert_clients": clients,
        "expert_weight": weight,
        "untrained_experts": [k for k, c in clients.items() if c == 0],
        "clipped": len(clipped),
        "clipped_clients": clipped,
    }


@dataclass(frozen=True, eq=False)
class ServerOptState:
    """Moments of the adaptive server optimizers, per tensor name (float64 arrays).

    A tensor gets moments the first time it is touched; untouched tensors keep theirs
    frozen (no decay), so an expert's moments reflect only the rounds it was trained.
    """

    m: dict[str, np.ndarray] = field(default_factory=dict)
    v: dict[str, np.ndarray] = field(default_factory=dict)
    step: int = 0

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Flat ``{"m/<name>": ..., "v/<name>": ...}`` for a tensor checkpoint."""
        return {**{f"m/{k}": a for k, a in self.m.items()}, **{f"v/{k}": a for k, a in self.v.items()}}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], step: int) -> "ServerOptState":
        """Inverse of :meth:`to_arrays`."""
        m = {k[2:]: np.asarray(a) for k, a in arrays.items() if k.startswith("m/")}
        v = {k[2:]: np.asarray(a) for k, a in arrays.items() if k.startswith("v/")}
        return cls(m=m, v=v, step=int(step))


def server_step(
    global_params: dict[str, np.ndarray],
    delta: dict[str, np.ndarray],
    opt_state: ServerOptState | None = None,
    *,
    kind: str = "avg",
    lr: float = 1.0,
    beta1: float = 0.9,
    beta2: float = 0.99,
    tau: float = 1e-3,
    touched: set[str] | None = None,
    row_masks: dict[str, np.ndarray] | None = None,
) -> tuple[dict[str, np.ndarray], ServerOptState]:
    """Apply the aggregated delta with a server optimizer; returns (new params, new state).

    - ``"avg"``: ``x <- x + lr * delta`` (``lr = 1`` is plain FedAvg);
    - ``"fedadam"`` / ``"fedyogi"`` (Reddi et al. 2021, "Adaptive Federated Optimization",
      Alg. 2, no bias correction, ``v`` starts at ``tau**2``):
      ``m <- beta1 m + (1 - beta1) delta``;
      Adam ``v <- beta2 v + (1 - beta2) delta**2``,
      Yogi ``v <- v - (1 - beta2) delta**2 sign(v - delta**2)``;
      ``x <- x + lr * m / (sqrt(v) + tau)``.

    Only names in ``touched`` (default: the keys of ``delta``) move; with ``row_masks``
    (``aggregate_experts``' ``stats["row_masks"]``) only those rows of a router tensor
    move. Everything else, parameters and moments, stays bit-identical.
    """
    if kind not in ("avg", "fedadam", "fedyogi"):
        raise ValueError(f"kind must be 'avg', 'fedadam' or 'fedyogi', got {kind!r}")
    state = opt_state or ServerOptState()
    names = set(delta) if touched is None else set(touched) & set(delta)
    row_masks = row_masks or {}
    new_params = dict(global_params)
    m, v = dict(state.m), dict(state.v)
    for n in sorted(names):
        g = global_params[n]
        d = np.asarray(delta[n], dtype=np.float64)
        rows = _bcast(row_masks[n], d) if n in row_masks else True
        if kind == "avg":
            step = lr * d
        else:
            m0 = state.m.get(n, np.zeros(d.shape))
            v0 = state.v.get(n, np.full(d.shape, tau**2))
            m1 = beta1 * m0 + (1.0 - beta1) * d
            d2 = d * d
            if kind == "fedadam":
                v1 = beta2 * v0 + (1.0 - beta2) * d2
            else:
                v1 = v0 - (1.0 - beta2) * d2 * np.sign(v0 - d2)
            m[n] = np.where(rows, m1, m0)
            v[n] = np.where(rows, v1, v0)
            step = lr * m1 / (np.sqrt(v1) + tau)
        new = (np.asarray(g, np.float64) + step).astype(g.dtype)
        new_params[n] = np.where(rows, new, g) if n in row_masks else new
    return new_params, ServerOptState(m=m, v=v, step=state.step + 1)
