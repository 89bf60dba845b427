"""fedmoe_flwr's Flower strategies, one module each; :data:`STRATEGIES` maps names to classes.

Import them from here (``from fedmoe_flwr.strategies import AlignedStrategy``): a module
named ``strategies`` in a user's own project cannot shadow this path. The top-level
``strategies`` package of this repository re-exports the same classes.
"""

from fedmoe_flwr.core import AssignmentProblem, FitnessSettings
from fedmoe_flwr.strategies.aligned import AlignedStrategy
from fedmoe_flwr.strategies.base import ExpertStrategy
from fedmoe_flwr.strategies.dense import DenseFedAvg
from fedmoe_flwr.strategies.dense_large import DenseLargeExclusive
from fedmoe_flwr.strategies.dense_small import DenseSmallFedAvg
from fedmoe_flwr.strategies.fedrolex import FedRolex
from fedmoe_flwr.strategies.fjord import FjORD
from fedmoe_flwr.strategies.flex import FlexStrategy
from fedmoe_flwr.strategies.full import FullStrategy
from fedmoe_flwr.strategies.greedy import GreedyStrategy
from fedmoe_flwr.strategies.heterofl import HeteroFL
from fedmoe_flwr.strategies.random import RandomStrategy
from fedmoe_flwr.strategies.record import RoundLog
from fedmoe_flwr.strategies.rolling import RollingStrategy
from fedmoe_flwr.strategies.width import WidthFedAvg

STRATEGIES = {
    "aligned": AlignedStrategy,
    "flex": FlexStrategy,
    "greedy": GreedyStrategy,
    "random": RandomStrategy,
    "full": FullStrategy,
    "dense": DenseFedAvg,
    "rolling": RollingStrategy,
    "dense-small": DenseSmallFedAvg,
    "dense-large-exclusive": DenseLargeExclusive,
    "heterofl": HeteroFL,
    "fjord": FjORD,
    "fedrolex": FedRolex,
}

__all__ = ["STRATEGIES", "AlignedStrategy", "AssignmentProblem", "DenseFedAvg", "DenseLargeExclusive", "DenseSmallFedAvg",
           "ExpertStrategy", "FedRolex", "FitnessSettings", "FjORD", "FlexStrategy", "FullStrategy", "GreedyStrategy",
           "HeteroFL", "RandomStrategy", "RollingStrategy", "RoundLog", "WidthFedAvg"]
