"""The class counts matching strategies read from their clients' train replies.

PFNM and FedMA weight each client's classifier units by its share of each class (and PFNM as the
pipeline's align step likewise); every client reports its counts with its weights
(``class-counts``), and the server checks them on arrival: a client cannot claim more examples of
a class than it holds in all.
"""

from __future__ import annotations

from fedalign.core.types import StateDict
from fedalign.fl.round import ClientUpdate


def class_counts_problem(update: ClientUpdate, reference: StateDict) -> str | None:
    """Why the update's class counts are unusable: they must be one non-negative number per class
    of the model (its last layer's outputs), together no more than its (bounded) example count."""
    classes = reference[[k for k in reference if k.endswith(".weight")][-1]].shape[0]
    counts = update.metrics.get("class-counts")
    if not isinstance(counts, list) or len(counts) != classes or any(c < 0 for c in counts):
        return "malformed class-counts"
    if sum(counts) > update.num_examples:
        return f"class-counts sum to {sum(counts)}, more than its {update.num_examples} examples"
    return None


def class_counts(updates: list[ClientUpdate]) -> list[list[float]]:
    """Each update's class counts (checked on arrival by ``class_counts_problem``)."""
    return [[float(c) for c in u.metrics["class-counts"]] for u in updates]
