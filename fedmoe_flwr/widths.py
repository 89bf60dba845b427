"""Width slicing of a dense model's feed-forward layers, server side (numpy, no torch).

The width baselines (docs/architecture.md#strategies) train sub-models of the dense model
of the MoE's total size (``dense-large`` in :mod:`fedmoe_flwr.variants`): every FFN block
``fc2(act(fc1(x)))`` keeps only a set of its hidden units. A hidden unit ``j`` is row ``j``
of ``fc1.weight`` and ``fc1.bias`` and column ``j`` of ``fc2.weight``; everything else
(embeddings, attention, norms, ``fc2.bias``) is shared and sent whole, as the MoE's shared
tensors are. The rules of each baseline, for a client of width ratio ``r`` in round ``t``
and an FFN of ``W`` hidden units, ``n = width_units(r, W)``:

- HeteroFL (Diao et al. 2021): the first ``n`` units, fixed (:func:`static_indices`);
- FjORD (Horvath et al. 2021): the first ``n`` units, of which each local step trains the
  first ``width_units(p, W)`` for a ``p <= r`` drawn per step (ordered dropout);
- FedRolex (Alam et al. 2022): ``n`` units starting at ``t * step mod W``, wrapping
  (:func:`rolling_indices`): the window rolls every round so every unit gets trained.

Aggregation (:func:`aggregate_sliced`): each element is the weighted mean over the clients
that held it; an element nobody held keeps its value (HeteroFL's rule).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

_FFN = re.compile(r"^(?P<prefix>.*\bffn)\.(?P<param>fc1\.weight|fc1\.bias|fc2\.weight)$")
SLICE_AXIS = {"fc1.weight": 0, "fc1.bias": 0, "fc2.weight": 1}


@dataclass(frozen=True)
class WidthLayout:
    """Which tensors carry FFN hidden units: ``name -> (ffn prefix, axis)``, and each FFN's width."""

    sliced: dict[str, tuple[str, int]]
    widths: dict[str, int]

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, tuple[int, ...]]) -> "WidthLayout":
        """From a dense model's ``{name: shape}``; ValueError when it has no FFN block to slice."""
        sliced, widths = {}, {}
        for name, shape in shapes.items():
            m = _FFN.match(name)
            if m is None:
                continue
            axis = SLICE_AXIS[m.group("param")]
            sliced[name] = (m.group("prefix"), axis)
            w = int(shape[axis])
            if widths.setdefault(m.group("prefix"), w) != w:
                raise ValueError(f"{name}: {w} hidden units, but its FFN has {widths[m.group('prefix')]}")
        if not sliced:
            raise ValueError("no FFN block (<...>.ffn.fc1/fc2) to slice: width baselines need a dense zoo model")
        return cls(sliced, widths)


def width_units(ratio: float, full: int) -> int:
    """Hidden units a width ratio keeps of ``full``: ``round(ratio * full)``, at least 1."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"width ratio must be in (0, 1], got {ratio}")
    return max(1, min(full, int(round(ratio * full))))


def width_level(capacity: float, levels: Iterable[float]) -> float | None:
    """The largest level not above ``capacity`` (a share of the MoE's experts); None if none fits.

    A tolerance of 1e-9 keeps a capacity computed as a ratio of byte counts from falling a
    rounding error below its level."""
    fit = [float(l) for l in levels if 0.0 < float(l) <= capacity + 1e-9]
    return max(fit) if fit else None


def static_indices(ratio: float, full: int) -> np.ndarray:
    """HeteroFL's and FjORD's slice: the first ``width_units(ratio, full)`` units."""
    return np.arange(width_units(ratio, full))


def rolling_indices(ratio: float, full: int, rnd: int, step: int = 1) -> np.ndarray:
    """FedRolex's window: ``width_units(ratio, full)`` units from ``rnd * step mod full``, wrapping."""
    n = width_units(ratio, full)
    return (int(rnd) * int(step) + np.arange(n)) % full


def slice_arrays(arrays: Mapping[str, np.ndarray], layout: WidthLayout, indices: Mapping[str, np.ndarray]) -> dict:
    """The sub-model: sliced tensors cut to each FFN's ``indices[prefix]``, the rest whole."""
    out = {}
    for name, a in arrays.items():
        if name in layout.sliced:
            prefix, axis = layout.sliced[name]
            a = np.take(a, indices[prefix], axis=axis)
        out[name] = np.ascontiguousarray(a)
    return out


def aggregate_sliced(current: Mapping[str, np.ndarray], layout: WidthLayout,
                     updates: list[tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray], float]]) -> dict:
    """Per-element weighted mean over the clients that held each element.

    ``updates``: ``(sub-model arrays, indices per FFN prefix, weight)`` per accepted client.
    Elements no client held keep ``current``'s value. Raises ValueError on a shape that does
    not match the client's indices.
    """
    if not updates:
        return {k: np.array(v, copy=True) for k, v in current.items()}
    out = {}
    for name, cur in current.items():
        total = np.zeros(cur.shape, dtype=np.float64)
        count = np.zeros(cur.shape, dtype=np.float64)
        for arrays, idx, w in updates:
            a = np.asarray(arrays[name], dtype=np.float64)
            if name in layout.sliced:
                prefix, axis = layout.sliced[name]
                sel = [slice(None)] * cur.ndim
                sel[axis] = idx[prefix]
                sel = tuple(sel)
                if total[sel].shape != a.shape:
                    raise ValueError(f"{name}: update of shape {a.shape} for a slice of shape {total[sel].shape}")
                total[sel] += w * a
                count[sel] += w
            else:
                if a.shape != cur.shape:
                    raise ValueError(f"{name}: update of shape {a.shape}, expected {cur.shape}")
                total += w * a
                count += w
        held = count > 0
        new = np.array(cur, dtype=np.float64, copy=True)
        new[held] = total[held] / count[held]
        out[name] = new.astype(cur.dtype)
    return out
