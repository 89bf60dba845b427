"""``flex``: the FLEX-MoE recipe (arXiv 2512.23070).

Fitness ``Q <- (1-beta) Q + beta exp(-alpha loss)`` from training feedback only (unassigned
pairs unchanged), and each round an LP maximising total fitness with a fixed per-client
expert count ``k_c`` (from memory) and fixed per-expert load bounds. No measured profiles,
no exploration, no deadline.
"""

from __future__ import annotations

from fedmoe_flwr import core
from fedmoe_flwr.strategies.base import ExpertStrategy
from fedmoe_flwr.core import AssignmentProblem


class FlexStrategy(ExpertStrategy):
    name = "flex"

    def __init__(self, layout, *, band: float = 0.0, **kwargs):
        fit = kwargs.pop("fitness", None) or core.FitnessSettings()
        # FLEX-MoE's fitness is loss feedback alone, without exploration.
        kwargs["fitness"] = core.FitnessSettings(w_hist=0.0, w_gate=0.0, w_loss=1.0, loss_alpha=fit.loss_alpha, beta=fit.beta, kappa=0.0)
        kwargs["probe"] = False
        super().__init__(layout, **kwargs)
        self.band = band

    def assign(self, problem: AssignmentProblem) -> core.AssignmentResult:
        score = problem.scores(self.state.fitness.Q)
        lo, hi = core.coverage_bounds(int(problem.max_experts.sum()), len(problem.cols), self.band)
        return core.assign_experts(score, problem.expert_bytes, problem.memory, lo=lo, hi=hi, k_fixed=problem.max_experts)
