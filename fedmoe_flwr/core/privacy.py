"""Client-level differential privacy at the server: Gaussian noise per aggregation group
(docs/architecture.md#differential-privacy).

Each client's whole delta is clipped to ``C`` (``clip=fixed``, ``clip_norm``) and the
aggregate is the unweighted mean over the contributors of each group: expert ``k``'s
tensors (and its router rows) over its ``m_k`` holders, the shared tensors over all ``m``
accepted clients. The server then adds to each group's mean

    N(0, (z * C / m_g)^2)   per coordinate, z = ``dp_noise_multiplier``,

drawn from a generator seeded by ``(seed, round)``, so runs stay reproducible. One client
moves group ``g``'s mean by at most ``|delta_g| / m_g`` with ``sum_g |delta_g|^2 <= C^2``,
so the round's whole release is one Gaussian mechanism of noise multiplier ``z`` on that
client's update. The accountant lives above the core (:mod:`fedmoe_flwr.privacy`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..layout import ParamLayout, expert_key
from .robust import RobustSettings

SHARED = "shared"
"""The group of the shared (non-expert, non-router) tensors."""


@dataclass
class DPSettings:
    """Client-level DP (the strategy config extends this class); off while the multiplier is 0."""

    dp_noise_multiplier: float = 0.0  # z: noise std = z * clip_norm / contributors of the group; 0 = off
    dp_delta: float = 1e-5  # the delta of the (epsilon, delta) the accountant reports

    @property
    def dp_enabled(self) -> bool:
        return self.dp_noise_multiplier > 0


def dp_problems(dp: DPSettings, robust: RobustSettings) -> list[str]:
    """Why these settings cannot give the documented guarantee (empty when they can)."""
    bad = []
    if not (np.isfinite(dp.dp_noise_multiplier) and dp.dp_noise_multiplier >= 0):
        bad.append(f"dp_noise_multiplier must be >= 0, got {dp.dp_noise_multiplier!r}")
    if not 0 < dp.dp_delta < 1:
        bad.append(f"dp_delta must be in (0, 1), got {dp.dp_delta!r}")
    if dp.dp_noise_multiplier > 0:
        if robust.clip != "fixed" or not (robust.clip_norm or 0) > 0:
            bad.append(f"differential privacy needs clip=fixed with clip_norm > 0 (the sensitivity), got clip={robust.clip!r}")
        if robust.aggregator != "mean":
            bad.append(f"differential privacy needs aggregator=mean (the noise is calibrated to a mean), got {robust.aggregator!r}")
    return bad


def noise_std(noise_multiplier: float, clip_norm: float, contributors: int) -> float:
    """The std of the noise added to a group's mean: ``z * C / m``."""
    if contributors < 1:
        raise ValueError(f"a group needs >= 1 contributor, got {contributors}")
    return float(noise_multiplier) * float(clip_norm) / int(contributors)


def add_group_noise(delta: dict[str, np.ndarray], layout: ParamLayout, contributors: dict[str, int],
                    row_masks: dict[str, np.ndarray], noise_multiplier: float, clip_norm: float,
                    rng: np.random.Generator) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """``delta`` plus each group's Gaussian noise (module doc); returns it and the std per group.

    ``contributors`` maps ``"shared"`` and each expert key to its number of contributors;
    a router row is noised with its expert's std, and only rows in ``row_masks`` (the
    rows someone held; the others do not move). Names are visited in sorted order, so the
    draws depend only on ``rng``.
    """
    out = dict(delta)
    stds: dict[str, float] = {}

    def std(group: str) -> float:
        if group not in stds:
            stds[group] = noise_std(noise_multiplier, clip_norm, contributors[group])
        return stds[group]

    for name in sorted(delta):
        d = np.asarray(delta[name], dtype=np.float64)
        if name in layout.router_params:
            layer, mask = layout.router_params[name], row_masks.get(name, np.ones(d.shape[0], bool))
            row_std = np.array([std(expert_key(layer, e)) if mask[e] else 0.0 for e in range(d.shape[0])])
            out[name] = d + rng.standard_normal(d.shape) * row_std.reshape((-1,) + (1,) * (d.ndim - 1))
        else:
            group = layout.expert_of.get(name, SHARED)
            out[name] = d + rng.standard_normal(d.shape) * std(group)
    return out, stds
