"""Running fedmoe_flwr on a real Flower federation (SuperLink + SuperNodes).

- :mod:`.app_config`: the ``[tool.flwr.app.config]`` section of ``pyproject.toml`` is the
  flattened quickstart config, so ``flwr run`` and ``run.py`` start from the same values;
  ``python -m fedmoe_flwr.deploy.app_config --check`` verifies it, ``--write`` rewrites it.
- :mod:`.grid`: the ServerApp's grid wrapper in deployment (a cap on how long a round
  waits for replies, and a per-message log of what each node was sent and declared).
- :mod:`.launcher`: start and stop a SuperLink, SuperNodes and ``flwr run`` as processes
  (loopback federations for tests and the overhead measurement; TLS and node keys).
"""
