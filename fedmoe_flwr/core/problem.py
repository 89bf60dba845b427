"""What an assignment decides over, built from the alignment state, and solving it layer by
layer (docs/architecture.md#assignment).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..layout import parse_expert_key
from .assign import AssignmentResult, capacity_in_experts
from .profiles import cohort_time_costs
from .state import AlignmentState


@dataclass
class AssignmentProblem:
    """What a strategy's ``assign`` decides over: one row per cohort client."""

    round: int
    client_ids: list[str]
    rows: np.ndarray  # rows of the clients in the alignment state
    memory: np.ndarray  # [C] bytes each client can hold for experts
    expert_bytes: np.ndarray  # [K]
    max_experts: np.ndarray  # [C] experts each client can hold
    time_fixed: np.ndarray  # [C] seconds of a round without experts (shared part)
    time_per_expert: np.ndarray  # [C, K] seconds each expert adds
    rng: np.random.Generator
    cols: np.ndarray  # [K] the experts (columns of Q, price, expert_keys) this problem covers
    deadline: float | None = None  # the round deadline for this problem (None = none)
    measured: np.ndarray | None = None  # [C] whether the client's time model rests on measurements

    def scores(self, matrix: np.ndarray) -> np.ndarray:
        """``matrix[rows][:, cols]``: a per-(client, expert) state array cut to this problem."""
        return matrix[self.rows][:, self.cols]

    def predicted_time(self, x: np.ndarray) -> np.ndarray:
        """``[C]`` predicted round seconds of each client under assignment ``x`` ([C, K] bool)."""
        return self.time_fixed + (self.time_per_expert * np.asarray(x, dtype=bool)).sum(axis=1)

    def fastest_time(self) -> np.ndarray:
        """``[C]`` predicted seconds of each client holding only its cheapest expert."""
        return self.time_fixed + self.time_per_expert.min(axis=1, initial=np.inf)

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
            max_experts=capacity_in_experts(memory, self.expert_bytes[cols]),
            time_fixed=time_fixed, time_per_expert=self.time_per_expert[:, cols], cols=self.cols[cols],
        )


def build_problem(state: AlignmentState, client_ids: list[str], *, rnd: int, expert_bytes: np.ndarray,
                  shared_bytes: float, num_examples: dict[str, int], local_epochs: int,
                  deadline: float | None, rng: np.random.Generator) -> AssignmentProblem:
    """The assignment problem of a cohort: capacities from the profiles, the linear time model
    of :func:`~fedmoe_flwr.core.profiles.expert_time_costs` (vectorised)."""
    profiles = [state.profiles[c] for c in client_ids]
    memory = np.array([p.memory_bytes for p in profiles], dtype=np.float64)
    samples = np.array([num_examples.get(c, 0) for c in client_ids], dtype=np.float64)
    time_fixed, time_per_expert = cohort_time_costs(profiles, expert_bytes, shared_bytes, samples, local_epochs)
    measured = np.array([p.samples_per_s is not None or p.declared_samples_per_s is not None for p in profiles],
                        dtype=bool) & (samples > 0)
    return AssignmentProblem(
        round=rnd,
        client_ids=list(client_ids),
        rows=np.array([state.client_index[c] for c in client_ids], dtype=np.int64),
        memory=memory,
        expert_bytes=expert_bytes,
        max_experts=capacity_in_experts(memory, expert_bytes),
        time_fixed=time_fixed,
        time_per_expert=time_per_expert,
        rng=rng,
        cols=np.arange(len(expert_bytes)),
        deadline=deadline,
        measured=measured,
    )


def assign_by_layer(problem: AssignmentProblem, solve, expert_keys: list[str]) -> AssignmentResult:
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
    return AssignmentResult(
        x=x,
        status=",".join(sorted({r.status for r in results})),
        engine=",".join(sorted({r.engine for r in results})),
        solve_time_s=sum(r.solve_time_s for r in results),
        objective=sum(r.objective for r in results),
        mip_gap=max((r.mip_gap for r in results if r.mip_gap is not None), default=None),
        relaxed=sorted({why for r in results for why in r.relaxed}),
    )
