"""The run configuration: the schema (each key declared once, with its default, comment, choices
and bounds), loading and overrides, the generated reference, and a run's pieces built from it."""

from fedalign.config.load import from_dict, load_config
from fedalign.config.schema import RunConfig

__all__ = ["RunConfig", "from_dict", "load_config"]
