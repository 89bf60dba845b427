"""Where a round's time goes: ``full`` over the in-process grid under cProfile, by step.

Used by ``python -m fedmoe_flwr.bench.overhead --quickstart``. cProfile slows Python code
more than compiled kernels, so the shares overstate message handling against training a
little; the per-step split is what to read, the ratios come from the untraced runs.
"""

from __future__ import annotations

import cProfile
import pstats

# (label, file suffix, function name): each step's cumulative time
STEPS = [
    ("ClientApp calls (all of the client side)", "flwr/clientapp/client_app.py", "__call__"),
    ("  local training (train_local)", "client/local_update.py", "train_local"),
    ("  routing statistics before training (routing_stats)", "client/local_update.py", "routing_stats"),
    ("  load the received tensors (load_assigned)", "client/helper.py", "load_assigned"),
    ("  reply tensors into an ArrayRecord (to_array_record)", "models/slicing.py", "to_array_record"),
    ("server: cohort, assignment, messages (configure_train)", "strategies/base.py", "configure_train"),
    ("server: decode the replies (_decode_train_replies)", "strategies/base.py", "_decode_train_replies"),
    ("server: validate, aggregate, state (apply_round)", "core/round.py", "apply_round"),
    ("Flower Array -> numpy (np.load of .npy bytes), both sides", "flwr/app/message/array.py", "numpy"),
    ("Flower numpy -> Array (np.save to .npy bytes), both sides", "flwr/app/message/array.py", "from_numpy_ndarray"),
]


def _cumulative(stats: pstats.Stats, suffix: str, func: str) -> float:
    return sum(v[3] for (path, _, name), v in stats.stats.items() if name == func and path.endswith(suffix))


def profile_full_rounds(cfg, rounds: int, top: int = 12) -> dict:
    """Profile ``rounds`` rounds of (b) on ``cfg``; print and return ms per TRAIN message by step."""
    from fedmoe_flwr.bench.overhead import flower_rounds

    prof = cProfile.Profile()
    prof.enable()
    flower_rounds(cfg, rounds, "full")
    prof.disable()
    stats = pstats.Stats(prof)
    messages = rounds * cfg.dataset.num_clients
    total = stats.total_tt
    steps = {label: _cumulative(stats, suffix, func) / messages * 1e3 for label, suffix, func in STEPS}
    print(f"\nprofile of (b), {rounds} rounds, {messages} TRAIN messages (+ round 1's profile queries); "
          f"{total / messages * 1e3:.1f} ms per TRAIN message in all (profiled)")
    for label, ms in steps.items():
        print(f"  {label:<62} {ms:>7.2f} ms/message")
    own = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    hot = [{"function": f"{path.split('site-packages/')[-1]}:{name}", "self_ms_per_message": v[2] / messages * 1e3}
           for (path, _, name), v in own]
    print("  most self time:")
    for h in hot:
        print(f"    {h['function']:<70} {h['self_ms_per_message']:>7.2f} ms/message")
    return {"messages": messages, "profiled_ms_per_message": total / messages * 1e3, "steps_ms_per_message": steps,
            "top_self_time": hot}
