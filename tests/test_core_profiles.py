"""Client profiles: EMAs with hand-computed numbers, effective values, time model; core purity."""

import json
import math

import numpy as np
import pytest

from fedmoe_flwr.core.profiles import (
    DEFAULT_BANDWIDTH_BPS,
    DEFAULT_SAMPLES_PER_S,
    ClientProfile,
    expert_time_costs,
    update_profile,
    update_profiles,
)


def test_speed_ema_first_measurement_initialises_then_smooths():
    p = update_profile(ClientProfile(), completed=True, num_samples=100, train_time_s=2.0)
    assert p.samples_per_s == 50.0
    p = update_profile(p, completed=True, num_samples=200, train_time_s=2.0, ema=0.3)
    assert p.samples_per_s == pytest.approx(0.7 * 50 + 0.3 * 100)  # 65


def test_bandwidth_emas():
    p = update_profile(ClientProfile(), completed=True, bytes_down=1e6, down_time_s=2.0,
                       bytes_up=4e5, up_time_s=4.0)
    assert (p.downlink_Bps, p.uplink_Bps) == (5e5, 1e5)
    p = update_profile(p, completed=True, bytes_down=3e6, down_time_s=1.0)
    assert p.downlink_Bps == pytest.approx(0.7 * 5e5 + 0.3 * 3e6)  # 1.25e6
    assert p.uplink_Bps == 1e5  # not measured this round: unchanged


def test_reliability_ema_from_prior():
    p = ClientProfile()
    p = update_profile(p, completed=False)
    assert p.reliability == pytest.approx(0.7)
    p = update_profile(p, completed=False)
    assert p.reliability == pytest.approx(0.49)
    p = update_profile(p, completed=True)
    assert p.reliability == pytest.approx(0.7 * 0.49 + 0.3)  # 0.643
    assert (p.rounds_seen, p.rounds_completed) == (3, 1)
    q = update_profile(ClientProfile(declared_reliability=0.5), completed=True)
    assert q.reliability == pytest.approx(0.65)


def test_missing_or_zero_times_are_no_measurement():
    p = update_profile(ClientProfile(), completed=True, num_samples=100, train_time_s=0.0,
                       bytes_down=10, down_time_s=None)
    assert p.samples_per_s is None and p.downlink_Bps is None


def test_update_returns_new_object():
    p0 = ClientProfile()
    p1 = update_profile(p0, completed=True, num_samples=10, train_time_s=1)
    assert p0.samples_per_s is None and p1 is not p0


def test_effective_prefers_measured_then_declared_then_default():
    p = ClientProfile(declared_samples_per_s=20.0, declared_uplink_Bps=7.0)
    assert p.effective_samples_per_s() == 20.0
    assert p.effective_uplink_Bps() == 7.0
    assert p.effective_downlink_Bps() == DEFAULT_BANDWIDTH_BPS
    assert ClientProfile().effective_samples_per_s() == DEFAULT_SAMPLES_PER_S
    assert ClientProfile().effective_reliability() == 1.0
    p = update_profile(p, completed=True, num_samples=30, train_time_s=1.0)
    assert p.effective_samples_per_s() == 30.0
    assert p.declared_samples_per_s == 20.0  # declared kept apart


def test_update_profiles_batch():
    profiles = {"a": ClientProfile(memory_bytes=5)}
    out = update_profiles(profiles, {"a": {"completed": True}, "b": {"completed": False}})
    assert out["a"].memory_bytes == 5 and out["a"].rounds_completed == 1
    assert out["b"].reliability == pytest.approx(0.7)
    assert profiles["a"].rounds_seen == 0


def test_expert_time_costs_hand_computed():
    p = ClientProfile(declared_downlink_Bps=1e6, declared_uplink_Bps=5e5, declared_samples_per_s=50)
    fixed, per = expert_time_costs(p, np.array([2e5, 4e5]), shared_bytes=1e6, num_samples=100,
                                   local_epochs=2)
    # download 1 s + upload 2 s + compute 100*2/50 = 4 s
    assert fixed == pytest.approx(7.0)
    np.testing.assert_allclose(per, [0.2 + 0.4, 0.4 + 0.8])
    _, per2 = expert_time_costs(p, np.array([2e5, 4e5]), 1e6, 100, 2, expert_compute_frac=0.1)
    np.testing.assert_allclose(per2, [1.0, 1.6])


def test_profile_json_round_trip_with_inf_memory():
    p = update_profile(ClientProfile(compute_tier="low", declared_uplink_Bps=3.5), completed=True,
                       num_samples=7, train_time_s=3)
    d = json.loads(json.dumps(p.to_dict()))
    assert d["memory_bytes"] is None
    assert ClientProfile.from_dict(d) == p
    q = ClientProfile(memory_bytes=123.0)
    assert ClientProfile.from_dict(json.loads(json.dumps(q.to_dict()))) == q
    assert math.isinf(ClientProfile.from_dict(ClientProfile().to_dict()).memory_bytes)
