"""The Flower layer: a ClientApp and a ServerApp on the Message API over fedalign's pure algorithms.

Nothing outside this package imports Flower, so every algorithm stays usable without it.
"""
