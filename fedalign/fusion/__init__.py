"""Fusion rules over state dicts and models (no Flower): weighted mean, BBP-MAP matching, PFNM."""

from .bbp_map import BBPResult, assignment_cost, bbp_map
from .mean import weighted_average
from .pfnm import (
    REFERENCE_GRID,
    PFNMAssignments,
    mlp_from_state,
    pfnm,
    pfnm_grid_search,
    select_candidate,
)

__all__ = [
    "REFERENCE_GRID",
    "BBPResult",
    "PFNMAssignments",
    "assignment_cost",
    "bbp_map",
    "mlp_from_state",
    "pfnm",
    "pfnm_grid_search",
    "select_candidate",
    "weighted_average",
]
