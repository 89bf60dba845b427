"""``greedy``: each client takes its top-``k_c`` experts by fitness, no balance (FedMoE-style)."""

from __future__ import annotations

import time

from fedmoe_flwr import core
from strategies.base import ExpertStrategy
from strategies.problem import AssignmentProblem


class GreedyStrategy(ExpertStrategy):
    name = "greedy"

    def assign(self, problem: AssignmentProblem) -> core.AssignmentResult:
        t0 = time.perf_counter()
        x = core.assign_topk(problem.scores(self.state.fitness.Q), problem.k_cap)
        return core.AssignmentResult(x=x, status="greedy", solve_time_s=time.perf_counter() - t0, objective=0.0, mip_gap=None)
