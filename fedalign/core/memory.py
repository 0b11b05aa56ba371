"""One malloc arena for the server process, so its memory follows what it holds.

glibc's ``malloc`` gives each thread that allocates while others do an arena of its own (up to
eight per core), and memory freed into an arena stays with that arena for its thread's next
allocations. A federated server allocates model-sized buffers on many threads: Flower's and
Ray's threads deserialize each reply's bytes, the round's thread parses them into tensors and
fuses them, the evaluation thread runs the test set beside the next round. Each arena then keeps
its own high-water mark of freed buffers, which the others cannot reuse. With one arena, every
thread reuses the same freed memory. B2 (benchmarks.md: 1,000 users, cohort 50, a 1.2M-parameter
LeNet, 4 rounds), the driver's peak PSS: 1,987 MiB with glibc's default, 1,473 MiB with one
arena, and its rounds no slower (3.8 s against 5.2 s, the server's parse, checks and mean
included). Fixing malloc's ``mmap`` threshold instead (every large block returned on ``free``)
gave 1,295 MiB but made those server phases 5-8 times slower (the page faults of fresh pages).

glibc gives every thread its own arena on its first allocation until the limit is set, so the
limit must come before the process starts threads: ``import torch`` starts one. The ``fedalign``
command sets it first thing (``fedalign.cli``); ``runner.run`` sets it again for library callers,
where it holds for the threads still to come. (The same 4-round B2 with the limit set after
torch's import: 1,810-1,895 MiB.) Elsewhere than glibc (macOS, musl) nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import platform

M_ARENA_MAX = -8  # mallopt's parameter number in glibc's malloc.h


@functools.cache
def one_arena() -> bool:
    """Limit this process's malloc to one arena (once per process); whether it was set (False
    where the C library is not glibc)."""
    if platform.libc_ver()[0] != "glibc":
        return False
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(M_ARENA_MAX, 1))
