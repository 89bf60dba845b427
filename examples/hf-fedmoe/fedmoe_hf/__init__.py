"""fedmoe_hf: a Flower app federating a Hugging Face Mixture-of-Experts LM (tiny Mixtral)."""
