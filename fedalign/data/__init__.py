"""Datasets (Fashion-MNIST, digits, fortunes; CIFAR-10, FEMNIST, Shakespeare and ``hf:<repo>``
from local copies of Hugging Face datasets), partitioning and per-client views.

Loaders find local files and download only where a network exists; every failure is a
``DataError`` (a ``ValueError``) naming the file, dataset or option at fault. Loads and
federations are cached per process because Ray workers build them once per client message.

Modules: ``idx`` (IDX parser), ``fashion_mnist``, ``digits``, ``text`` (fortunes), ``hub`` (the
hub datasets' declarations), ``local_copy`` (finding, reading, downloading their copies),
``modality`` (image and character preprocessing), ``registry``
(``dataset_arrays``/``load_dataset``), ``partition`` (flwr-datasets partitioners, histograms),
``flwr_partitioners`` (imported only to partition), ``federation`` (per-client views), ``shared``
(one memory-mapped copy of a federation for every process of a simulation). Nothing here imports
Flower itself, only ``flwr_datasets``.
"""

from .datasets import (
    DATASETS,
    Arrays,
    dataset_arrays,
    dataset_names,
    dataset_options,
    is_dataset,
    load_dataset,
)
from .errors import DataError, DatasetNotFoundError
from .federation import ClientData, Federation, federation, federation_key
from .partition import (
    SCHEMES,
    format_histogram,
    label_histogram,
    partition,
    partition_schemes,
    split_train_val,
)
from .text import VOCAB_SIZE


def prepare(name: str, to: str) -> str:
    """Store dataset ``name`` under ``to`` for machines without a network (``fedalign data
    prepare``); returns what a run's ``data.data_dir`` should name: Fashion-MNIST's four IDX
    files (copied from a local copy or downloaded), or a hub dataset's ``save_to_disk`` folder."""
    if name == "fashion-mnist":
        from . import fashion_mnist

        return str(fashion_mnist.prepare(to))
    from .hub import prepare as prepare_hub

    prepare_hub(name, to)
    return str(to)


__all__ = [
    "DATASETS",
    "SCHEMES",
    "VOCAB_SIZE",
    "Arrays",
    "ClientData",
    "DataError",
    "DatasetNotFoundError",
    "Federation",
    "dataset_arrays",
    "dataset_names",
    "dataset_options",
    "federation",
    "federation_key",
    "format_histogram",
    "is_dataset",
    "label_histogram",
    "load_dataset",
    "partition",
    "partition_schemes",
    "prepare",
    "split_train_val",
]
