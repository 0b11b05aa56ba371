"""Putting the neurons of several networks into correspondence (no Flower import).

``permutation_spec(model)`` derives which permutation group acts on which axis of which parameter;
every method here works through that spec.
"""

from .spec import (
    AxisRef,
    PermutationSpec,
    Perms,
    apply_permutation,
    compose,
    identity_permutation,
    invert_permutation,
    random_permutation,
)
from .trace import UnsupportedModuleError, permutation_spec

__all__ = [
    "AxisRef", "PermutationSpec", "Perms", "UnsupportedModuleError", "apply_permutation", "compose",
    "identity_permutation", "invert_permutation", "permutation_spec", "random_permutation",
]
