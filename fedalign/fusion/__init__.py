"""Fusion rules over state dicts and models (no Flower): weighted mean, RegMean, Fisher
averaging (registered in ``FUSE_RULES``), BBP-MAP matching, PFNM, FedMA."""

from .bbp_map import BBPResult, assignment_cost, bbp_map
from .fisher import fisher_average, fisher_rule
from .mean import mean_rule, weighted_average
from .pfnm import (
    REFERENCE_GRID,
    PFNMAssignments,
    pfnm,
    pfnm_grid_search,
    select_candidate,
)
from .regmean import permute_grams, regmean, regmean_rule
from .rules import FUSE_RULES

__all__ = [
    "FUSE_RULES",
    "REFERENCE_GRID",
    "BBPResult",
    "PFNMAssignments",
    "assignment_cost",
    "bbp_map",
    "fisher_average",
    "fisher_rule",
    "mean_rule",
    "permute_grams",
    "pfnm",
    "pfnm_grid_search",
    "regmean",
    "regmean_rule",
    "select_candidate",
    "weighted_average",
]
