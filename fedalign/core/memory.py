"""Large freed buffers go back to the system at once, so a server's memory follows what it holds.

glibc's ``malloc`` serves a block from its own ``mmap`` (returned to the system on ``free``) only
above a threshold, and it raises that threshold to the size of every such block freed (up to 32
MiB on 64-bit). A federated server allocates and frees model-sized buffers all round long: each
reply's bytes, each update's tensors, each message's arrays. After the first of them is freed,
the rest come from malloc's arenas, which keep freed memory for reuse (and, with several threads,
in several arenas), so the process keeps its highest round's footprint and more. B2 (benchmarks.md:
1,000 users, cohort 50, a 1.2M-parameter LeNet), a 3-round run's driver peaked at 1,774 MiB PSS
with the moving threshold and at 1,208 MiB with it fixed at 128 KiB (glibc's initial value).

Only the threshold is fixed: small objects stay in the arenas, and a block above it costs one
``mmap``/``munmap`` pair and its page faults (microseconds per MiB) instead of an arena's reuse.
Elsewhere than glibc (macOS, musl) nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

log = logging.getLogger("fedalign")

M_MMAP_THRESHOLD = -3  # mallopt's parameter number in glibc's malloc.h
THRESHOLD = 128 * 1024


@functools.cache
def return_large_blocks(threshold: int = THRESHOLD) -> bool:
    """Fix this process's ``mmap`` threshold at ``threshold`` bytes (once per process); whether
    it was set (False where the C library is not glibc)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 (glibc only: musl also has a mallopt)
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    done = bool(mallopt(M_MMAP_THRESHOLD, threshold))
    if not done:
        log.debug("mallopt(M_MMAP_THRESHOLD, %d) refused", threshold)
    return done
