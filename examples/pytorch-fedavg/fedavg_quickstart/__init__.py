"""fedavg_quickstart: a Flower PyTorch app training a small Mixture-of-Experts on digits."""
