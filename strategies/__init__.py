"""fedmoe_flwr's Flower strategies, one module each; :data:`STRATEGIES` maps names to classes.

``dense`` (the non-MoE reference) is Flower's own FedAvg and is built by the ServerApp.
"""

from strategies.aligned import AlignedStrategy
from strategies.base import ExpertStrategy, FitnessSettings
from strategies.problem import AssignmentProblem
from strategies.dense import DenseFedAvg
from strategies.flex import FlexStrategy
from strategies.full import FullStrategy
from strategies.greedy import GreedyStrategy
from strategies.random import RandomStrategy

STRATEGIES = {
    "aligned": AlignedStrategy,
    "flex": FlexStrategy,
    "greedy": GreedyStrategy,
    "random": RandomStrategy,
    "full": FullStrategy,
}

__all__ = ["STRATEGIES", "AlignedStrategy", "DenseFedAvg", "AssignmentProblem", "ExpertStrategy", "FitnessSettings",
           "FlexStrategy", "FullStrategy", "GreedyStrategy", "RandomStrategy"]
