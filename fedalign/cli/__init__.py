"""The ``fedalign`` command: run, resume, bench, merge, pretrain, config, data, report."""

from fedalign.cli.main import main

__all__ = ["main"]
