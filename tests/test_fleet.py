"""Simulated fleet: tiers dealt by fraction, seeded; times from exact bytes."""

import numpy as np

from fedmoe_flwr.config import TierConfig
from fedmoe_flwr.fleet import device_profile, drops_out, simulate_times, tier_of
from fedmoe_flwr.seeding import rng_for

TIERS = [
    TierConfig("small", 0.4, 2, 100.0, 1.0, 4.0, 0.5),
    TierConfig("mid", 0.4, 4, 400.0, 5.0, 20.0, 1.0),
    TierConfig("large", 0.2, -1, 2000.0, 50.0, 200.0, 1.0),
]


def test_tiers_follow_fractions_and_seed():
    names = [tier_of(i, 100, TIERS, seed=3).name for i in range(100)]
    assert names.count("small") == 40 and names.count("mid") == 40 and names.count("large") == 20
    assert names == [tier_of(i, 100, TIERS, seed=3).name for i in range(100)]
    assert names != [tier_of(i, 100, TIERS, seed=4).name for i in range(100)]


def test_profile_memory_holds_exactly_its_experts():
    p = device_profile(0, 10, [TIERS[0]], seed=0, expert_nbytes=1000, num_experts=8)
    assert p.max_experts == 2 and p.expert_memory_bytes == 2000
    q = device_profile(0, 10, [TIERS[2]], seed=0, expert_nbytes=1000, num_experts=8)
    assert q.max_experts == 8 and q.expert_memory_bytes == 8000
    assert p.uplink_Bps == 1.0e6 / 8


def test_simulated_times_are_bytes_over_bandwidth_without_jitter():
    p = device_profile(0, 10, [TIERS[0]], seed=0, expert_nbytes=1000, num_experts=8)
    down, comp, up = simulate_times(p, samples_processed=200, bytes_down=500_000, bytes_up=125_000, rng=rng_for(0), jitter=0.0)
    assert down == 500_000 / (4e6 / 8) and up == 125_000 / (1e6 / 8) and comp == 2.0


def test_dropouts_follow_reliability_and_are_reproducible():
    p = device_profile(0, 10, [TIERS[0]], seed=0, expert_nbytes=1, num_experts=8)
    draws = [drops_out(p, rng_for(0, "dropout", r, 0)) for r in range(2000)]
    assert 0.45 < np.mean(draws) < 0.55
    assert draws == [drops_out(p, rng_for(0, "dropout", r, 0)) for r in range(2000)]
