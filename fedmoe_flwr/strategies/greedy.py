"""``greedy``: each client takes its top-``k_c`` experts by fitness, no balance (FedMoE-style)."""

from __future__ import annotations

import time

from fedmoe_flwr import core
from fedmoe_flwr.strategies.base import ExpertStrategy
from fedmoe_flwr.core import AssignmentProblem


class GreedyStrategy(ExpertStrategy):
    name = "greedy"

    def assign(self, problem: AssignmentProblem) -> core.AssignmentResult:
        t0 = time.perf_counter()
        x = core.assign_topk(problem.scores(self.state.fitness.Q), problem.max_experts)
        return core.AssignmentResult(x=x, status="greedy", solve_time_s=time.perf_counter() - t0, objective=0.0, mip_gap=None)
