"""The alignment core: pure functions over plain data (docs/architecture.md).

profiles -> fitness -> load -> assign -> aggregate -> state; :func:`apply_round` is the
server half of one round over all of them. Numpy and scipy only: this
package imports neither Flower, Hydra/OmegaConf nor torch, so it is unit-tested in
milliseconds and reusable outside Flower.
"""

from __future__ import annotations

import importlib

_HOME = {
    "AlignmentState": "state",
    "AssignmentProblem": "problem",
    "AssignmentResult": "assign",
    "Claim": "identity",
    "ClientProfile": "profiles",
    "ClientReport": "round",
    "ClientUpdate": "aggregate",
    "DPSettings": "privacy",
    "FitnessSettings": "fitness",
    "FitnessState": "fitness",
    "LoadState": "load",
    "Received": "round",
    "RobustSettings": "robust",
    "RoundCost": "accounting",
    "RoundInputs": "round",
    "RoundSettings": "round",
    "RoundStats": "round",
    "Sent": "round",
    "ServerOptState": "aggregate",
    "add_group_noise": "privacy",
    "advance_round": "state",
    "aggregate_experts": "aggregate",
    "apply_round": "round",
    "assign_by_layer": "problem",
    "assign_experts": "assign",
    "assign_full": "assign",
    "assign_random": "assign",
    "assign_topk": "assign",
    "bench_solver": "assign_bench",
    "bind_client_ids": "identity",
    "build_problem": "problem",
    "capacity_in_experts": "assign",
    "check_reply": "round",
    "client_rows": "state",
    "cohort_time_costs": "profiles",
    "coverage_bounds": "load",
    "dp_problems": "privacy",
    "effective_close": "round",
    "ensure_client": "state",
    "ensure_clients": "state",
    "expected_names": "validate",
    "expert_time_costs": "profiles",
    "exploration_bonus": "fitness",
    "fitness_signal": "fitness",
    "grow_fitness": "fitness",
    "init_fitness": "fitness",
    "init_load": "load",
    "init_state": "state",
    "load_cv": "load",
    "noise_std": "privacy",
    "observe_fitness": "round",
    "observe_fitness_batch": "round",
    "round_cost": "accounting",
    "probe_cost": "accounting",
    "signal_problem": "robust",
    "sits_out": "robust",
    "sitting_out": "defences",
    "round_load": "load",
    "server_step": "aggregate",
    "solver_score": "fitness",
    "staleness": "load",
    "state_from_dict": "state",
    "state_to_dict": "state",
    "update_fitness": "fitness",
    "update_load": "load",
    "update_profile": "profiles",
    "update_profiles": "profiles",
    "validate_report": "validate",
    "validate_update": "validate",
}
"""Public name -> the submodule that defines it."""

__all__ = sorted(_HOME)


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOME))
