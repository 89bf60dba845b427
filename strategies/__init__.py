"""The strategies of fedmoe_flwr under the short name of the design card.

The code lives in :mod:`fedmoe_flwr.strategies`; prefer that import in your own project
(a ``strategies.py`` of yours would shadow this package).
"""

from fedmoe_flwr.strategies import *  # noqa: F401,F403
from fedmoe_flwr.strategies import __all__  # noqa: F401
