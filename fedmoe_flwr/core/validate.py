"""Validation of client replies before aggregation (docs/architecture.md#one-round).

Each check returns ``(ok, reason)``; ``reason`` names the problem (and the tensor or
expert) so the strategy can log and drop the reply. Nothing here raises on bad input.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from ..layout import ParamLayout

__all__ = ["expected_names", "validate_report", "validate_update"]


def expected_names(layout: ParamLayout, held) -> set[str]:
    """Tensor names a client holding experts ``held`` must return: shared + those experts'."""
    return set(layout.param_names(held))


def validate_update(
    params: Mapping[str, np.ndarray],
    *,
    expected_names: set[str],
    reference: Mapping[str, np.ndarray],
    norm_bound: float | None = None,
    layout: ParamLayout | None = None,
) -> tuple[bool, str]:
    """Check a client's returned tensors against what it was sent.

    Args:
        params: returned VALUES (not deltas), name -> array.
        expected_names: shared + assigned experts' tensor names (:func:`expected_names`).
        reference: the global tensors it was sent (shapes, dtypes, delta base).
        norm_bound: maximum L2 norm of the whole delta ``params - reference``; None = none.
        layout: optional, to name the expert of an unexpected tensor in the reason.

    Checks, in order: missing tensors, unexpected or unknown tensors, non-arrays, shape,
    dtype, non-finite values, delta norm. Returns ``(True, "ok")`` or ``(False, reason)``.
    """
    names = set(params)
    missing = sorted(set(expected_names) - names)
    if missing:
        return False, f"missing tensor {missing[0]!r}" + _more(missing)
    extra = sorted(names - set(expected_names))
    if extra:
        n = extra[0]
        owner = layout.expert_of.get(n) if layout is not None else None
        if n not in reference:
            what = "unknown tensor"
        elif owner is not None:
            what = f"unexpected tensor (expert {owner} not assigned)"
        else:
            what = "unexpected tensor"
        return False, f"{what} {n!r}" + _more(extra)
    sq = 0.0
    for n in sorted(names):
        a, ref = params[n], reference[n]
        if not isinstance(a, np.ndarray):
            return False, f"tensor {n!r} is not a numpy array ({type(a).__name__})"
        if a.shape != ref.shape:
            return False, f"shape mismatch for {n!r}: got {a.shape}, expected {ref.shape}"
        if a.dtype != ref.dtype:
            return False, f"dtype mismatch for {n!r}: got {a.dtype}, expected {ref.dtype}"
        if a.dtype.kind in "fc" and not np.isfinite(a).all():
            bad = "NaN" if np.isnan(a).any() else "Inf"
            return False, f"non-finite values ({bad}) in {n!r}"
        if norm_bound is not None:
            d = a.astype(np.float64) - ref.astype(np.float64)
            sq += float(np.sum(d * d))
    if norm_bound is not None:
        norm = math.sqrt(sq)
        if not norm <= norm_bound:
            return False, f"delta norm {norm:.6g} > bound {norm_bound:.6g}"
    return True, "ok"


def _more(items: list) -> str:
    return f" (and {len(items) - 1} more)" if len(items) > 1 else ""


def _finite_nonneg(x) -> bool:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return False
    return math.isfinite(v) and v >= 0


def validate_report(
    tokens: Mapping[str, float],
    held,
    num_samples,
    *,
    hist: Mapping[str, float] | None = None,
    expert_keys=None,
) -> tuple[bool, str]:
    """Check a reply's statistics.

    - ``num_samples`` is a finite number > 0;
    - ``tokens`` keys are a subset of ``held`` (tokens can only reach held experts),
      values finite and >= 0;
    - ``hist`` (optional routing histogram over all router rows): keys in
      ``expert_keys`` (if given), values finite and >= 0.
    """
    if not _finite_nonneg(num_samples) or float(num_samples) <= 0:
        return False, f"num_samples must be a finite number > 0, got {num_samples!r}"
    held = set(held)
    for k, v in tokens.items():
        if k not in held:
            return False, f"tokens reported for expert {k!r} not held"
        if not _finite_nonneg(v):
            return False, f"token count for {k!r} must be finite and >= 0, got {v!r}"
    if hist is not None:
        known = None if expert_keys is None else set(expert_keys)
        for k, v in hist.items():
            if known is not None and k not in known:
                return False, f"histogram has unknown expert {k!r}"
            if not _finite_nonneg(v):
                return False, f"histogram value for {k!r} must be finite and >= 0, got {v!r}"
    return True, "ok"
