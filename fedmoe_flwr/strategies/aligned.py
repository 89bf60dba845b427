"""``aligned``: client-expert alignment (docs/architecture.md).

Fitness from the clients' routing histograms (optionally gate share and loss feedback,
optionally UCB exploration), measured capacity profiles, a round deadline, per-expert load
bounds with dual prices, and an exact assignment by HiGHS each round.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from fedmoe_flwr import core
from fedmoe_flwr.strategies.base import ExpertStrategy
from fedmoe_flwr.core import AssignmentProblem


class AlignedStrategy(ExpertStrategy):
    """The full design. Extra args over :class:`ExpertStrategy`:

    Args:
        band: load band around the mean slots per expert (0 = exact floor/ceil band, where
            prices cannot change the solution; > 0 lets the prices steer load over rounds).
        price_step: step of the per-expert dual price (0 = no prices).
        use_deadline: keep each client's predicted round time within ``deadline_s``.
        deadline_slack: plan with ``deadline_slack * deadline_s`` so speed jitter does not
            push planned replies past the deadline.
        pace_margin: close the round at ``pace_margin`` times the slowest predicted reply
            (never after the deadline) instead of always waiting for the deadline; the
            measured profiles make the prediction. 0 = always wait for the deadline.
    """

    name = "aligned"

    def __init__(self, layout, *, band: float = 0.0, price_step: float = 0.0, use_deadline: bool = True,
                 deadline_slack: float = 0.9, pace_margin: float = 1.2, **kwargs):
        super().__init__(layout, **kwargs)
        self.settings = replace(self.settings, price_step=price_step)
        self.deadline_slack = deadline_slack
        self.pace_margin = pace_margin
        self.band = band
        self.use_deadline = use_deadline

    def assign(self, problem: AssignmentProblem) -> core.AssignmentResult:
        f = self.fitness
        price = self.state.load.price if self.settings.price_step > 0 else None
        score = core.solver_score(self.state.fitness, problem.rows, price, kappa=f.kappa, anneal_rounds=f.anneal_rounds)
        score = score[:, problem.cols]
        lo, hi = core.coverage_bounds(int(problem.max_experts.sum()), len(problem.cols), self.band)
        deadline = problem.deadline * self.deadline_slack if (self.use_deadline and problem.deadline) else None
        return core.assign_experts(
            score,
            problem.expert_bytes,
            problem.memory,
            time_fixed=problem.time_fixed,
            time_per_expert=problem.time_per_expert,
            deadline=deadline,
            lo=lo,
            hi=hi,
        )

    def eligible_nodes(self, server_round: int, nodes: list[int]) -> list[int]:
        """Leave out clients that cannot finish a round with even one expert before the deadline.

        Their replies would arrive too late under any assignment; drawing someone else in
        their place keeps the cohort's updates useful (expert-aware client selection).
        Falls back to every node if fewer than ``min_train_nodes`` would remain.
        """
        if not (self.use_deadline and self.deadline_s) or not nodes:
            return nodes
        problem = self._problem(server_round, nodes)
        ok = (problem.fastest_time() <= self.deadline_s * self.deadline_slack) & (problem.max_experts > 0)
        kept = [n for n, keep in zip(nodes, ok) if keep]
        return kept if len(kept) >= self.min_train_nodes else nodes

    def round_close(self, problem: AssignmentProblem, x: np.ndarray) -> float | None:
        """``pace_margin`` x the slowest predicted reply, once every prediction rests on a
        measured (or declared) speed and a known data size; else the deadline."""
        if self.pace_margin <= 0 or not len(x) or not problem.measured.all():
            return self.deadline_s
        close = self.pace_margin * float(problem.predicted_time(x).max())
        return close if self.deadline_s is None else min(close, self.deadline_s)
