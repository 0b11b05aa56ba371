"""Putting the neurons of several networks into correspondence (no Flower import).

``permutation_spec(model)`` derives which permutation group acts on which axis of which parameter;
every method here works through that spec. Solvers (``SOLVERS``) and the pipeline's alignment step
(``ALIGNERS``) are registries: chosen by name everywhere, extended by registering.
"""

from .activation_matching import (
    activation_statistics,
    add_statistics,
    cross_moments,
    permutations_from_statistics,
)
from .aligners import ALIGNERS
from .robust import align_to_median, invariant_distances, medoid
from .sinkhorn_rebasin import sinkhorn_rebasin
from .solvers import SOLVERS, solve_assignment, solver_names
from .spec import (
    AxisRef,
    Perms,
    PermutationSpec,
    apply_permutation,
    compose,
    identity_permutation,
    invert_permutation,
    random_permutation,
)
from .trace import UnsupportedModuleError, permutation_spec
from .weight_matching import (
    MatchResult,
    match_to_reference,
    merge_many,
    weight_matching,
    weight_matching_result,
)

__all__ = [
    "ALIGNERS",
    "SOLVERS",
    "AxisRef",
    "MatchResult",
    "Perms",
    "PermutationSpec",
    "UnsupportedModuleError",
    "activation_statistics",
    "add_statistics",
    "align_to_median",
    "apply_permutation",
    "compose",
    "cross_moments",
    "identity_permutation",
    "invariant_distances",
    "invert_permutation",
    "match_to_reference",
    "medoid",
    "merge_many",
    "permutation_spec",
    "permutations_from_statistics",
    "random_permutation",
    "sinkhorn_rebasin",
    "solve_assignment",
    "solver_names",
    "weight_matching",
    "weight_matching_result",
]
