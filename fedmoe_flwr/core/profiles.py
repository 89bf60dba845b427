"""Client profiles: what the server knows of a client's capacity (docs/architecture.md#profiles).

A profile keeps *declared* values (from the fleet config or ``node_config``) apart from
*measured* ones (exponential moving averages of what rounds showed). The ``effective_*``
getters prefer measured, else declared, else a module default. The memory budget is
declared only and is a hard limit: it counts bytes available for EXPERTS (the budget left
after the shared parameters).

Everything here is pure: :func:`update_profile` returns a new profile.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Mapping

import numpy as np

DEFAULT_SAMPLES_PER_S = 100.0
"""Compute speed assumed for a client that declared none and was never measured."""
DEFAULT_BANDWIDTH_BPS = 1.0e6
"""Up- and downlink bandwidth (bytes/s) assumed when nothing is declared or measured."""
DEFAULT_RELIABILITY = 1.0
"""Prior completion probability of a client never seen (optimistic: it gets selected)."""


@dataclass(frozen=True)
class ClientProfile:
    """Capacity of one client.

    Attributes:
        memory_bytes: hard budget for expert bytes (``math.inf`` = can hold everything).
        compute_tier: optional tier name from the fleet config (informational).
        declared_samples_per_s, declared_uplink_Bps, declared_downlink_Bps,
        declared_reliability: declared values, ``None`` if not declared.
        samples_per_s, uplink_Bps, downlink_Bps: measured EMAs, ``None`` until measured.
        reliability: smoothed completion rate, ``None`` until the first round is seen.
        rounds_seen: rounds this client was asked to train.
        rounds_completed: rounds whose reply arrived (in time and valid).
        rounds_refused: rounds whose (completed) update the trust check refused.
        last_refused: the last such round (0 = never).
    """

    memory_bytes: float = math.inf
    compute_tier: str | None = None
    declared_samples_per_s: float | None = None
    declared_uplink_Bps: float | None = None
    declared_downlink_Bps: float | None = None
    declared_reliability: float | None = None
    samples_per_s: float | None = None
    uplink_Bps: float | None = None
    downlink_Bps: float | None = None
    reliability: float | None = None
    rounds_seen: int = 0
    rounds_completed: int = 0
    rounds_refused: int = 0
    last_refused: int = 0

    def effective_samples_per_s(self) -> float:
        """Measured compute speed, else declared, else :data:`DEFAULT_SAMPLES_PER_S`."""
        return _first(self.samples_per_s, self.declared_samples_per_s, DEFAULT_SAMPLES_PER_S)

    def effective_uplink_Bps(self) -> float:
        """Measured uplink bytes/s, else declared, else :data:`DEFAULT_BANDWIDTH_BPS`."""
        return _first(self.uplink_Bps, self.declared_uplink_Bps, DEFAULT_BANDWIDTH_BPS)

    def effective_downlink_Bps(self) -> float:
        """Measured downlink bytes/s, else declared, else :data:`DEFAULT_BANDWIDTH_BPS`."""
        return _first(self.downlink_Bps, self.declared_downlink_Bps, DEFAULT_BANDWIDTH_BPS)

    def effective_reliability(self) -> float:
        """Smoothed completion rate, else declared, else :data:`DEFAULT_RELIABILITY`."""
        return _first(self.reliability, self.declared_reliability, DEFAULT_RELIABILITY)

    def to_dict(self) -> dict:
        """JSON-serialisable dict (``inf`` memory is written as ``None``)."""
        # Every field is a scalar: a plain read gives asdict()'s result without its deep
        # copies, which were most of a 100,000-client checkpoint's time.
        d = {name: getattr(self, name) for name in _FIELD_NAMES}
        if math.isinf(d["memory_bytes"]):
            d["memory_bytes"] = None
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "ClientProfile":
        """Inverse of :meth:`to_dict`."""
        d = dict(d)
        d["memory_bytes"] = math.inf if d.get("memory_bytes") is None else d["memory_bytes"]
        return cls(**d)


_FIELD_NAMES = tuple(f.name for f in fields(ClientProfile))


def _first(*values: float | None) -> float:
    for v in values:
        if v is not None:
            return float(v)
    raise AssertionError("the last value is a default and never None")


def _ema(old: float | None, new: float, ema: float) -> float:
    """``new`` if nothing was measured yet, else ``(1 - ema) * old + ema * new``."""
    return float(new) if old is None else float((1.0 - ema) * old + ema * new)


def _rate(amount: float | None, seconds: float | None) -> float | None:
    """``amount / seconds`` when both are given and positive, else ``None`` (no measurement)."""
    if amount is None or seconds is None:
        return None
    if not (amount > 0 and seconds > 0 and math.isfinite(amount) and math.isfinite(seconds)):
        return None
    return float(amount) / float(seconds)


def update_profile(
    profile: ClientProfile,
    *,
    completed: bool,
    num_samples: float | None = None,
    train_time_s: float | None = None,
    bytes_down: float | None = None,
    down_time_s: float | None = None,
    bytes_up: float | None = None,
    up_time_s: float | None = None,
    ema: float = 0.3,
) -> ClientProfile:
    """Fold one round's observations of a client into its profile; returns a new profile.

    - ``samples_per_s`` EMA of ``num_samples / train_time_s`` (``num_samples`` counts
      samples processed over all local epochs); ``downlink_Bps`` of
      ``bytes_down / down_time_s``; ``uplink_Bps`` of ``bytes_up / up_time_s``. A quantity
      is measured only if both its amount and time are given and positive; the first
      measurement initialises the EMA directly.
    - ``reliability`` EMA of ``completed`` (1/0), starting from the declared value or
      :data:`DEFAULT_RELIABILITY` (a single failure does not zero it).
    - ``rounds_seen += 1``; ``rounds_completed += completed``.
    """
    if not 0.0 < ema <= 1.0:
        raise ValueError(f"ema must be in (0, 1], got {ema}")
    speed = _rate(num_samples, train_time_s)
    down = _rate(bytes_down, down_time_s)
    up = _rate(bytes_up, up_time_s)
    prior = _first(profile.reliability, profile.declared_reliability, DEFAULT_RELIABILITY)
    return replace(
        profile,
        samples_per_s=profile.samples_per_s if speed is None else _ema(profile.samples_per_s, speed, ema),
        downlink_Bps=profile.downlink_Bps if down is None else _ema(profile.downlink_Bps, down, ema),
        uplink_Bps=profile.uplink_Bps if up is None else _ema(profile.uplink_Bps, up, ema),
        reliability=_ema(prior, 1.0 if completed else 0.0, ema),
        rounds_seen=profile.rounds_seen + 1,
        rounds_completed=profile.rounds_completed + (1 if completed else 0),
    )


def update_profiles(
    profiles: Mapping[str, ClientProfile],
    observations: Mapping[str, Mapping],
    *,
    ema: float = 0.3,
) -> dict[str, ClientProfile]:
    """Apply :func:`update_profile` to each client in ``observations``.

    ``observations[client_id]`` holds the keyword arguments of :func:`update_profile`
    (``completed`` required). Clients without observations keep their profile; an
    observed client without a profile starts from ``ClientProfile()``.
    """
    out = dict(profiles)
    for cid, obs in observations.items():
        out[cid] = update_profile(out.get(cid, ClientProfile()), ema=ema, **obs)
    return out


def expert_time_costs(
    profile: ClientProfile,
    expert_bytes: np.ndarray,
    shared_bytes: float,
    num_samples: float,
    local_epochs: float = 1.0,
    *,
    expert_compute_frac: float = 0.0,
) -> tuple[float, np.ndarray]:
    """The linear round-time model used by the deadline constraint (docs/architecture.md#assignment).

    ``time_c(x) = fixed_s + sum_k per_expert_s[k] * x[k]`` with

    - ``compute_s = num_samples * local_epochs / samples_per_s`` (effective speed);
    - ``fixed_s = shared_bytes / downlink + shared_bytes / uplink + compute_s``;
    - ``per_expert_s[k] = expert_bytes[k] / downlink + expert_bytes[k] / uplink
      + expert_compute_frac * compute_s``.

    With top-1 routing every sample visits exactly one expert however many are held, so
    compute is (almost) independent of the held set: ``expert_compute_frac`` (default 0)
    is the extra fraction of compute one held expert adds (its optimizer step, the
    balance loss). Transfer dominates the per-expert cost. ``samples_per_s`` must be the
    speed measured on the model as the client trains it.
    """
    expert_bytes = np.asarray(expert_bytes, dtype=np.float64)
    down = profile.effective_downlink_Bps()
    up = profile.effective_uplink_Bps()
    compute_s = float(num_samples) * float(local_epochs) / profile.effective_samples_per_s()
    fixed_s = float(shared_bytes) / down + float(shared_bytes) / up + compute_s
    per_expert_s = expert_bytes / down + expert_bytes / up + expert_compute_frac * compute_s
    return fixed_s, per_expert_s


def cohort_time_costs(
    profiles: list[ClientProfile],
    expert_bytes: np.ndarray,
    shared_bytes: float,
    num_samples: np.ndarray,
    local_epochs: float = 1.0,
    *,
    expert_compute_frac: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`expert_time_costs` of many clients at once: ``([C] fixed_s, [C, K] per_expert_s)``.

    The same operations in the same order, element by element, so every value is
    bit-identical to the one-client function; one numpy pass instead of a few numpy calls
    per client (the server evaluates every known client's time model each round).
    """
    expert_bytes = np.asarray(expert_bytes, dtype=np.float64)
    down = np.array([p.effective_downlink_Bps() for p in profiles], dtype=np.float64)
    up = np.array([p.effective_uplink_Bps() for p in profiles], dtype=np.float64)
    speed = np.array([p.effective_samples_per_s() for p in profiles], dtype=np.float64)
    compute_s = np.asarray(num_samples, dtype=np.float64) * float(local_epochs) / speed
    shared = float(shared_bytes)
    fixed_s = shared / down + shared / up + compute_s
    per_expert_s = (expert_bytes[None, :] / down[:, None] + expert_bytes[None, :] / up[:, None]
                    + expert_compute_frac * compute_s[:, None])
    return fixed_s, per_expert_s.reshape(len(profiles), len(expert_bytes))
