"""``heterofl``: static width slicing (HeteroFL, Diao et al., ICLR 2021).

A client of capacity ``c`` (its share of the MoE's experts) trains the first
``width_units(r, W)`` hidden units of every FFN of the large dense model, ``r`` the largest
of ``width_levels`` not above ``c``; every element is averaged over the clients that held it.
"""

from __future__ import annotations

from fedmoe_flwr.strategies.width import WidthFedAvg


class HeteroFL(WidthFedAvg):
    name = "heterofl"
