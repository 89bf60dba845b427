"""``full``: every client trains every expert, capacity ignored (accuracy reference, byte upper bound)."""

from __future__ import annotations

from fedmoe_flwr import core
from fedmoe_flwr.strategies.base import ExpertStrategy
from fedmoe_flwr.core import AssignmentProblem


class FullStrategy(ExpertStrategy):
    name = "full"

    def assign(self, problem: AssignmentProblem) -> core.AssignmentResult:
        x = core.assign_full(len(problem.client_ids), len(problem.cols))
        return core.AssignmentResult(x=x, status="full", solve_time_s=0.0, objective=0.0, mip_gap=None)
