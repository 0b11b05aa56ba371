"""Fusion rules over state dicts and models (no Flower): weighted mean, BBP-MAP matching, PFNM."""

from .bbp_map import BBPResult, assignment_cost, bbp_map
from .mean import weighted_average
from .pfnm import PFNMAssignments, mlp_from_state, pfnm, pfnm_grid_search

__all__ = ["BBPResult", "PFNMAssignments", "assignment_cost", "mlp_from_state", "bbp_map", "pfnm", "pfnm_grid_search",
           "weighted_average"]
