"""Datasets (Fashion-MNIST, digits, fortunes), partitioning and per-client views.

Loaders find local files and download only where a network exists; errors name the file or option
at fault (``DataError``).
"""

from .errors import DataError, DatasetNotFoundError
from .federation import ClientData, Federation, federation
from .partition import (
    format_histogram,
    label_histogram,
    partition,
    partition_schemes,
    split_train_val,
)
from .registry import DATASETS, Arrays, dataset_arrays, dataset_names, load_dataset

__all__ = [
    "DATASETS", "Arrays", "ClientData", "DataError", "DatasetNotFoundError", "Federation",
    "dataset_arrays", "dataset_names", "federation", "format_histogram", "label_histogram",
    "load_dataset", "partition", "partition_schemes", "split_train_val",
]
