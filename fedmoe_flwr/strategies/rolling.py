"""``rolling``: the MoE with round-robin expert coverage (FedRolex's idea on experts).

In each MoE layer the round's cohort, in client-id order, takes consecutive blocks of
experts: client ``i`` holds its ``k_i`` experts from ``(round + k_0 + ... + k_{i-1}) mod E``
on, wrapping. So every round covers the experts as evenly as the capacities allow (loads
differ by at most one), and over ``E`` rounds a client in the same position holds every
expert. No fitness, no randomness: the strongest non-fitness MoE baseline.
"""

from __future__ import annotations

import time

import numpy as np

from fedmoe_flwr import core
from fedmoe_flwr.core import AssignmentProblem
from fedmoe_flwr.strategies.base import ExpertStrategy


def rolling_assignment(k: np.ndarray, num_experts: int, rnd: int) -> np.ndarray:
    """``[C, E]`` bool: client ``i`` holds ``k[i]`` consecutive experts from ``(rnd + sum(k[:i])) mod E``."""
    k = np.clip(np.asarray(k, dtype=np.int64), 0, num_experts)
    starts = (int(rnd) + np.concatenate([[0], np.cumsum(k)[:-1]])) % max(num_experts, 1)
    x = np.zeros((k.size, num_experts), dtype=bool)
    for i, (s, n) in enumerate(zip(starts, k)):
        x[i, (s + np.arange(n)) % num_experts] = True
    return x


class RollingStrategy(ExpertStrategy):
    name = "rolling"

    def assign(self, problem: AssignmentProblem) -> core.AssignmentResult:
        t0 = time.perf_counter()
        x = rolling_assignment(problem.max_experts, len(problem.cols), problem.round)
        return core.AssignmentResult(x=x, status="rolling", solve_time_s=time.perf_counter() - t0, objective=0.0, mip_gap=None)
