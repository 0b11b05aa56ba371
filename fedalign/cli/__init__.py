"""The ``fedalign`` command: run, resume, bench, merge, pretrain, config, data, report."""

from fedalign.core.memory import one_arena

# First, before torch or anything else starts a thread: glibc gives every thread that exists
# before the limit its own arena (core.memory).
one_arena()

from fedalign.cli.main import main

__all__ = ["main"]
