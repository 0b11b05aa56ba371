"""fedalign: federated learning simulations with neuron alignment.

The algorithm packages (:mod:`fedalign.align`, :mod:`fedalign.fusion`, :mod:`fedalign.analysis`,
:mod:`fedalign.stats`) are pure functions over tensors and state dicts and never import Flower;
:mod:`fedalign.fl` is the thin Flower layer over them.
"""

__version__ = "0.1.0"
