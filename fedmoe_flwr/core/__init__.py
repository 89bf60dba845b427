"""The alignment core: pure functions over plain data (DESIGN §3-§6).

profiles -> fitness -> load -> assign -> aggregate -> state. Numpy and scipy only: this
package imports neither Flower, Hydra/OmegaConf nor torch, so it is unit-tested in
milliseconds and reusable outside Flower.
"""

from .aggregate import ClientUpdate, ServerOptState, aggregate_experts, server_step
from .assign import (
    AssignmentResult,
    assign_experts,
    assign_full,
    assign_random,
    assign_topk,
    capacity_in_experts,
)
from .fitness import (
    FitnessState,
    exploration_bonus,
    fitness_signal,
    grow_fitness,
    init_fitness,
    solver_score,
    update_fitness,
)
from .load import LoadState, coverage_bounds, init_load, load_cv, round_load, staleness, update_load
from .profiles import ClientProfile, expert_time_costs, update_profile, update_profiles
from .state import (
    AlignmentState,
    advance_round,
    client_rows,
    ensure_client,
    ensure_clients,
    init_state,
    state_from_dict,
    state_to_dict,
)
from .validate import expected_names, validate_report, validate_update

__all__ = [
    "AlignmentState",
    "AssignmentResult",
    "ClientProfile",
    "ClientUpdate",
    "FitnessState",
    "LoadState",
    "ServerOptState",
    "advance_round",
    "aggregate_experts",
    "assign_experts",
    "assign_full",
    "assign_random",
    "assign_topk",
    "bench_solver",
    "capacity_in_experts",
    "client_rows",
    "coverage_bounds",
    "ensure_client",
    "ensure_clients",
    "expected_names",
    "expert_time_costs",
    "exploration_bonus",
    "fitness_signal",
    "grow_fitness",
    "init_fitness",
    "init_load",
    "init_state",
    "load_cv",
    "round_load",
    "server_step",
    "solver_score",
    "staleness",
    "state_from_dict",
    "state_to_dict",
    "update_fitness",
    "update_load",
    "update_profile",
    "update_profiles",
    "validate_report",
    "validate_update",
]


def __getattr__(name: str):
    """``bench_solver`` is imported on first use, so ``python -m fedmoe_flwr.core.assign_bench``
    runs the module once (no runpy double import)."""
    if name == "bench_solver":
        from .assign_bench import bench_solver

        return bench_solver
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
