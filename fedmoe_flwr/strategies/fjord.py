"""``fjord``: ordered dropout (FjORD, Horvath et al., NeurIPS 2021).

A client of width ratio ``r`` receives the first ``r`` share of every FFN's hidden units (as
in HeteroFL) and, at every local step, trains only the first ``p`` share for a ``p`` drawn
uniformly from the ``width_levels`` not above ``r`` (the ClientApp's ordered dropout,
:func:`fedmoe_flwr.models.width.ordered_dropout`). Aggregation is per element over holders.
"""

from __future__ import annotations

from fedmoe_flwr.strategies.width import WidthFedAvg


class FjORD(WidthFedAvg):
    name = "fjord"

    def od_levels(self, ratio: float) -> list[float]:
        return [l for l in self.width_levels if l <= ratio + 1e-9]
