"""The Flower layer: the round engine (``engine``), the strategies over it (``strategies``), the
ClientApp and the ServerApp on the Message API, over fedalign's pure algorithms.

Outside this package only the runner (which starts Flower's simulation) imports Flower, so every
algorithm stays usable without it.
"""
