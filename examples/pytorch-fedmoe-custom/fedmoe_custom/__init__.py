"""fedmoe_custom: a Flower PyTorch app whose Mixture-of-Experts is the user's own code."""
