"""What a round did, as every fedmoe strategy reports it (``strategy.last``)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RoundLog:
    """The last round of a strategy: read by the run recorder, details rows and tests.

    ``metrics`` holds the server-side figures (bytes, simulated time, solve time, counts);
    the client-side metrics are what ``aggregate_train``/``aggregate_evaluate`` return.
    """

    assignment: dict[str, list[str]] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    weights: dict[str, dict[str, float]] = field(default_factory=dict)  # client -> "shared"/expert key -> weight
    trust: dict[str, float] = field(default_factory=dict)  # client -> cosine with the server's reference update
    refused_claims: dict[int, tuple[str, str]] = field(default_factory=dict)  # node -> (id claimed, id given)
