"""Errors raised by the data package: each names the file, dataset or option at fault."""


class DataError(ValueError):
    """A dataset file is malformed, or a dataset/partition option is impossible."""


class DatasetNotFoundError(DataError):
    """The dataset's files are nowhere fedalign looks, and they cannot be downloaded here."""
