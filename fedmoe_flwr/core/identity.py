"""Which client id each newly registered node trains under (docs/robustness.md#identity).

A node declares a client id in its profile; the server keeps learned state (profile, fitness,
data size) per client id. The binding rules, pure over plain data:

- an id nobody connected holds goes to its claimant (a client back under a new node id takes
  its id, and its state, over);
- an id bound to another *connected* node is not given away: the claim is refused, and the
  claimant trains under a fresh id the server picks (``"<id>#2"``, ``"#3"``, ...). Refusing the
  node instead would let whoever answers first lock an honest client out of the federation;
  under a fresh id a thief gains nothing it could not get by declaring any unused id;
- several new nodes claiming one free id in the same batch: the claim with the smallest
  ``digest`` takes it and the others get fresh ids in digest order, so the outcome does not
  depend on the order replies arrive in (Flower's simulation engine returns them as they finish).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

FRESH_SEPARATOR = "#"


@dataclass(frozen=True)
class Claim:
    """One node's declared client id; ``digest`` orders claims of the same id in a batch."""

    node_id: int
    client_id: str
    digest: str


def bind_client_ids(claims: list[Claim], bound: Mapping[str, int], live: Collection[int]) -> dict[int, str]:
    """Node id -> the client id it trains under, for every claim (module doc for the rules).

    ``bound`` is client id -> node id of the bindings so far; ``live`` the connected node ids.
    The result keeps the claims' order for nodes given the id they claimed, then the fresh ids.
    """
    taken = {cid for cid, node in bound.items() if node in live}
    contenders: dict[str, list[Claim]] = {}
    for c in claims:
        holder = bound.get(c.client_id)
        if holder is None or holder == c.node_id or holder not in live:
            contenders.setdefault(c.client_id, []).append(c)
    winners = {cid: min(cs, key=lambda c: (c.digest, c.node_id)).node_id for cid, cs in contenders.items()}
    out = {c.node_id: c.client_id for c in claims if winners.get(c.client_id) == c.node_id}
    taken |= set(out.values())
    for c in sorted((c for c in claims if c.node_id not in out), key=lambda c: (c.client_id, c.digest, c.node_id)):
        out[c.node_id] = fresh_id(c.client_id, taken)
        taken.add(out[c.node_id])
    return out


def fresh_id(claimed: str, taken: Collection[str]) -> str:
    """The first ``"<claimed>#k"`` (k = 2, 3, ...) not in ``taken``."""
    k = 2
    while f"{claimed}{FRESH_SEPARATOR}{k}" in taken:
        k += 1
    return f"{claimed}{FRESH_SEPARATOR}{k}"
