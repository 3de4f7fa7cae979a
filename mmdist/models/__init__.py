"""Plain-PyTorch models and losses (no Ray): the DiT, the minimax objective, the sampler, test networks."""
