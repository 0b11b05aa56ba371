"""The algorithms: pure functions over tensors and state dicts (no Flower, no config)."""
