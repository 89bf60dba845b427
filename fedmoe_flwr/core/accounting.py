"""Bytes and simulated time of a round: the one accounting rule every strategy uses
(docs/architecture.md#accounting), the dense baseline included.

- bytes down: what the server sent to every cohort client (counted on the messages);
- bytes up: what the aggregated replies carried (counted on the replies, never taken
  from a client's own report);
- simulated round time: the slowest aggregated reply, or the round's close time when the
  server waited for a reply that never came in time (a dropout, an error, a late reply).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class RoundCost:
    bytes_down: int
    bytes_up: int
    sim_time_s: float


def round_cost(bytes_down: Iterable[int], accepted: Iterable[tuple[float, int]], close_s: float | None,
               *, incomplete: bool, before: RoundCost | None = None) -> RoundCost:
    """Cost of one round.

    Args:
        bytes_down: bytes of each TRAIN message sent.
        accepted: ``(seconds, bytes_up)`` of each aggregated reply.
        close_s: when the server stops waiting (None = it waits for every reply).
        incomplete: some cohort client's reply was dropped (error, timeout, late).
        before: a phase the server waited for before sending TRAIN messages (the cohort
            probe of ``reprobe``): its bytes and time add to the round's.
    """
    accepted = list(accepted)
    slowest = max((s for s, _ in accepted), default=0.0)
    sim = close_s if (incomplete and close_s is not None) else slowest
    before = before or RoundCost(0, 0, 0.0)
    return RoundCost(bytes_down=int(sum(bytes_down)) + before.bytes_down,
                     bytes_up=int(sum(b for _, b in accepted)) + before.bytes_up,
                     sim_time_s=float(sim) + before.sim_time_s)


def probe_cost(bytes_down: Iterable[int], seconds: Iterable[float]) -> RoundCost:
    """Cost of a probe phase: the QUERY messages' bytes, and the slowest answer (the server
    waits for the whole cohort before it assigns). The replies carry no tensors."""
    return RoundCost(bytes_down=int(sum(bytes_down)), bytes_up=0, sim_time_s=float(max(seconds, default=0.0)))
