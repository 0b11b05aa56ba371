"""core.memory: threads that allocate model-sized buffers one after another reuse each other's
freed memory once the server process has one malloc arena."""

import platform
import subprocess
import sys

import pytest

# The server's pattern: one thread deserializes a round's replies, another parses them, and each
# frees its buffers before the other starts (a small object kept after each buffer, as the
# round's records are). Prints the MiB still resident afterwards.
PROBE = """
import sys, threading
from fedalign.core.memory import one_arena
if sys.argv[1] == "one":
    assert one_arena()
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
first = bytearray(b"\\x01") * (8 << 20)
del first  # glibc now serves blocks up to 8 MiB from its arenas
kept = []
def phase(done, hold):
    held = []
    for _ in range(40):
        held.append(bytearray(b"\\x01") * (4 << 20))  # written: resident
        kept.append(bytearray(1024))  # from malloc (pymalloc takes <= 512 bytes)
    del held
    done.set()
    hold.wait()  # the thread lives on, and keeps its arena
before = rss()
hold = threading.Event()
for _ in range(2):
    done = threading.Event()
    threading.Thread(target=phase, args=(done, hold)).start()
    done.wait()
print((rss() - before) / 2**20)
hold.set()
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="needs glibc's mallopt")
def test_a_phase_on_another_thread_reuses_the_memory_the_first_freed_with_one_arena():
    kept = {
        mode: float(
            subprocess.run(
                [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True
            ).stdout
        )
        for mode in ("default", "one")
    }
    assert kept["default"] > 280  # each thread's arena keeps its own 160 MiB
    assert kept["one"] < 200  # the second phase reused the first's
