"""What a strategy's ``assign`` decides over, and solving it layer by layer.

Kept apart from the Flower adapter (:mod:`strategies.base`): plain numpy and the core.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from fedmoe_flwr import core
from fedmoe_flwr.layout import parse_expert_key


@dataclass
class AssignmentProblem:
    """What :meth:`ExpertStrategy.assign` decides over: one row per cohort client."""

    round: int
    client_ids: list[str]
    rows: np.ndarray  # rows of the clients in the alignment state
    memory: np.ndarray  # [C] bytes each client can hold for experts
    expert_bytes: np.ndarray  # [K]
    k_cap: np.ndarray  # [C] experts each client can hold
    time_fixed: np.ndarray  # [C] seconds of a round without experts (shared part)
    time_per_expert: np.ndarray  # [C, K] seconds each expert adds
    rng: np.random.Generator
    cols: np.ndarray  # [K] the experts (columns of Q, price, expert_keys) this problem covers
    deadline: float | None = None  # the round deadline for this problem (None = none)

    def scores(self, matrix: np.ndarray) -> np.ndarray:
        """``matrix[rows][:, cols]``: a per-(client, expert) state array cut to this problem."""
        return matrix[self.rows][:, self.cols]

    def for_layer(self, cols: np.ndarray, num_layers: int) -> "AssignmentProblem":
        """The sub-problem of one MoE layer's experts with 1/L of the memory and time slack.

        Models with several MoE layers need an expert in every layer; solving each layer on
        its share of the budget guarantees that and keeps every layer balanced.
        """
        memory = self.memory / num_layers
        slack = None if self.deadline is None else (self.deadline - self.time_fixed) / num_layers
        time_fixed = self.time_fixed if slack is None else self.deadline - slack
        return replace(
            self, memory=memory, expert_bytes=self.expert_bytes[cols],
            k_cap=core.capacity_in_experts(memory, self.expert_bytes[cols]),
            time_fixed=time_fixed, time_per_expert=self.time_per_expert[:, cols], cols=self.cols[cols],
        )



def assign_by_layer(problem: AssignmentProblem, solve, expert_keys: list[str]) -> core.AssignmentResult:
    """``solve(problem)``; for a model with several MoE layers, once per layer.

    A client must hold an expert in every MoE layer to route its tokens, so each layer is
    solved on its share of the client's budget (:meth:`AssignmentProblem.for_layer`) and the
    layers' assignments are joined.
    """
    layer_of = np.array([parse_expert_key(k)[0] for k in expert_keys])
    layers = np.unique(layer_of)
    if len(layers) <= 1:
        return solve(problem)
    x = np.zeros((len(problem.client_ids), len(expert_keys)), dtype=bool)
    results = []
    for layer in layers:
        cols = np.flatnonzero(layer_of == layer)
        res = solve(problem.for_layer(cols, len(layers)))
        x[:, cols] = res.x
        results.append(res)
    return core.AssignmentResult(
        x=x,
        status=",".join(sorted({r.status for r in results})),
        solve_time_s=sum(r.solve_time_s for r in results),
        objective=sum(r.objective for r in results),
        mip_gap=max((r.mip_gap for r in results if r.mip_gap is not None), default=None),
        relaxed=sorted({why for r in results for why in r.relaxed}),
    )
