"""Fusion rules over state dicts and models (no Flower): weighted mean, RegMean, Fisher
averaging, BBP-MAP matching, PFNM, FedMA."""

from .bbp_map import BBPResult, assignment_cost, bbp_map
from .fisher import fisher_average
from .mean import weighted_average
from .pfnm import (
    REFERENCE_GRID,
    PFNMAssignments,
    mlp_from_state,
    pfnm,
    pfnm_grid_search,
    select_candidate,
)
from .regmean import permute_grams, regmean

__all__ = [
    "REFERENCE_GRID",
    "BBPResult",
    "PFNMAssignments",
    "assignment_cost",
    "bbp_map",
    "fisher_average",
    "mlp_from_state",
    "permute_grams",
    "pfnm",
    "pfnm_grid_search",
    "regmean",
    "select_candidate",
    "weighted_average",
]
