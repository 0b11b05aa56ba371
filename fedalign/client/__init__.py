"""The client side: local training loops, optimizers and client objectives."""
