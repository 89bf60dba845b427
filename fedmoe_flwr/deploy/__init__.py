"""Running fedmoe_flwr on a real Flower federation (SuperLink + SuperNodes).

- :mod:`.app_config`: the ``[tool.flwr.app.config]`` section of ``pyproject.toml`` is the
  flattened quickstart config, so ``flwr run`` and ``run.py`` start from the same values;
  ``python -m fedmoe_flwr.deploy.app_config --check`` verifies it, ``--write`` rewrites it.
- :mod:`.grid`: the ServerApp's grid wrapper in deployment (a cap on how long a round
  waits for replies, and a per-message log of what each node was sent and declared).
- :mod:`.commands`: the SuperLink, Fleet gateway and SuperNode command lines (the runbook's);
  :mod:`.fleet_gateway`: the only public address of a SuperLink (the Fleet API, nothing else).
- :mod:`.launcher`: start and stop a SuperLink, SuperNodes and ``flwr run`` as processes
  (loopback federations for tests and the overhead measurement), built on :mod:`.processes`
  (process supervision), :mod:`.credentials` (TLS certificates, node keys), :mod:`.federation`
  (``flwr`` and its ``FLWR_HOME`` connections) and :mod:`.tomlio` (the one TOML writer).
"""
