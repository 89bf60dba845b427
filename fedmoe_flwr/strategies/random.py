"""``random``: each client trains ``k_c`` experts drawn at random (``k_c`` from its memory)."""

from __future__ import annotations

import time

from fedmoe_flwr import core
from fedmoe_flwr.strategies.base import ExpertStrategy
from fedmoe_flwr.core import AssignmentProblem


class RandomStrategy(ExpertStrategy):
    name = "random"

    def assign(self, problem: AssignmentProblem) -> core.AssignmentResult:
        t0 = time.perf_counter()
        x = core.assign_random(problem.max_experts, len(problem.cols), problem.rng)
        return core.AssignmentResult(x=x, status="random", solve_time_s=time.perf_counter() - t0, objective=0.0, mip_gap=None)
