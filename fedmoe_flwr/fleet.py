"""The simulated fleet: device tiers for virtual nodes and the simulated clock.

Each virtual node derives its device profile from its partition id and the fleet config.
The client reports simulated compute and transfer times computed here from exact byte
counts; the strategy turns the replies into the simulated round time. In a real deployment
the same report fields carry measured times instead (``simulated=False``).

Every random draw comes from a generator seeded by ``(seed, purpose, round, client)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedmoe_flwr.config import TierConfig
from fedmoe_flwr.seeding import rng_for


@dataclass(frozen=True)
class DeviceProfile:
    """What a simulated device is: its tier, expert budget in bytes, nominal speeds."""

    tier: str
    max_experts: int
    expert_memory_bytes: int
    samples_per_s: float
    uplink_Bps: float
    downlink_Bps: float
    reliability: float


def tier_of(partition_id: int, num_partitions: int, tiers: list[TierConfig], seed: int) -> TierConfig:
    """The tier of a node: tiers are dealt by fraction over a seeded permutation of nodes."""
    if not tiers:
        raise ValueError("fleet has no tiers")
    fractions = np.array([t.fraction for t in tiers], dtype=float)
    if (fractions < 0).any() or fractions.sum() <= 0:
        raise ValueError(f"tier fractions must be >= 0 and sum > 0, got {fractions.tolist()}")
    bounds = np.cumsum(fractions / fractions.sum()) * num_partitions
    order = rng_for(seed, "fleet").permutation(num_partitions)
    rank = int(np.flatnonzero(order == partition_id)[0])
    idx = int(np.searchsorted(bounds, rank, side="right"))
    return tiers[min(idx, len(tiers) - 1)]


def device_profile(
    partition_id: int,
    num_partitions: int,
    tiers: list[TierConfig],
    seed: int,
    expert_nbytes: int,
    num_experts: int,
) -> DeviceProfile:
    """The simulated device behind a virtual node.

    ``expert_nbytes`` is the size of the largest expert; the expert budget is
    ``max_experts * expert_nbytes`` so a tier that "holds 2 experts" holds exactly 2.
    """
    tier = tier_of(partition_id, num_partitions, tiers, seed)
    k = num_experts if tier.max_experts < 0 else min(tier.max_experts, num_experts)
    return DeviceProfile(
        tier=tier.name,
        max_experts=k,
        expert_memory_bytes=int(k * expert_nbytes),
        samples_per_s=float(tier.samples_per_s),
        uplink_Bps=float(tier.uplink_mbps) * 1e6 / 8,
        downlink_Bps=float(tier.downlink_mbps) * 1e6 / 8,
        reliability=float(tier.reliability),
    )


def simulate_times(
    profile: DeviceProfile,
    *,
    samples_processed: int,
    bytes_down: int,
    bytes_up: int,
    rng: np.random.Generator,
    jitter: float = 0.1,
) -> tuple[float, float, float]:
    """Simulated (download, compute, upload) seconds of one round on this device.

    Speeds vary round to round by a log-normal factor with spread ``jitter``.
    """
    f = np.exp(rng.normal(0.0, jitter, size=3)) if jitter > 0 else np.ones(3)
    down = bytes_down / (profile.downlink_Bps * f[0])
    compute = samples_processed / (profile.samples_per_s * f[1])
    up = bytes_up / (profile.uplink_Bps * f[2])
    return float(down), float(compute), float(up)


def drops_out(profile: DeviceProfile, rng: np.random.Generator) -> bool:
    """Whether the device fails to complete this round (drawn from its reliability)."""
    return bool(rng.random() >= profile.reliability)
