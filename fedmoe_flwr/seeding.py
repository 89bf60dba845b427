"""Seeded randomness: every random draw of a run derives from ``(seed, purpose, round, client)``.

One helper, used by the strategies (cohorts, assignments), the simulated fleet (tiers,
speeds, dropouts) and the client (batches, torch seeds), so the same seed gives the same
run in every backend and on resume (docs/architecture.md#reproducibility).
"""

from __future__ import annotations

import numpy as np


def rng_for(seed: int, *parts: int | str) -> np.random.Generator:
    """A generator determined by ``seed`` and the given parts (round, client, purpose)."""
    words = [int(seed) & 0xFFFFFFFF]
    for p in parts:
        if isinstance(p, str):
            words.extend(p.encode())
        else:
            words.append(int(p) & 0xFFFFFFFF)
    return np.random.default_rng(np.random.SeedSequence(words))


def sample_cohort(nodes: list, seed: int, purpose: str, rnd: int, fraction: float, minimum: int,
                  exclude: frozenset | set = frozenset()) -> list:
    """``max(round(len(nodes) * fraction), minimum)`` of ``nodes`` drawn from ``(seed, purpose, round)``.

    The draw is over positions, and the result keeps the input order, so a caller that
    orders nodes by stable client id gets cohorts independent of Flower's node ids.
    ``exclude``d nodes count for the cohort's size but are not drawn: their places go to
    the others (while there are others).
    """
    size = max(int(round(len(nodes) * fraction)), minimum)
    pool = [n for n in nodes if n not in exclude] if exclude else nodes
    pick = rng_for(seed, purpose, rnd).choice(len(pool), size=min(len(pool), size), replace=False)
    return [pool[i] for i in sorted(pick)]
