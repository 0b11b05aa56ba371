"""Fusion rules over state dicts and models (no Flower): weighted mean, RegMean, Fisher
averaging, the robust rules (median, trimmed mean, Krum, Multi-Krum, Bulyan; registered in
``FUSE_RULES``), BBP-MAP matching, PFNM, FedMA."""

from .bbp_map import BBPResult, assignment_cost, bbp_map
from .fisher import fisher_average, fisher_rule
from .mean import mean_rule, weighted_average
from .neural_matching import (
    REFERENCE_GRID,
    PFNMAssignments,
    pfnm,
    pfnm_grid_search,
    select_candidate,
)
from .regmean import permute_grams, regmean, regmean_rule
from .robust import (
    bulyan_rule,
    krum_rule,
    krum_scores,
    median_rule,
    multi_krum_rule,
    trimmed_mean_rule,
)
from .rules import FUSE_RULES, fallback_rule

__all__ = [
    "FUSE_RULES",
    "REFERENCE_GRID",
    "BBPResult",
    "PFNMAssignments",
    "assignment_cost",
    "bbp_map",
    "bulyan_rule",
    "fallback_rule",
    "fisher_average",
    "fisher_rule",
    "krum_rule",
    "krum_scores",
    "mean_rule",
    "median_rule",
    "multi_krum_rule",
    "permute_grams",
    "pfnm",
    "pfnm_grid_search",
    "regmean",
    "regmean_rule",
    "select_candidate",
    "trimmed_mean_rule",
    "weighted_average",
]
