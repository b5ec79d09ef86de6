"""Host memory freed by one training step kept for the next.

glibc returns a freed block of more than 128 KiB to the OS (``munmap``, or
trimming the heap), so the same block allocated again next step faults in
every page afresh, zeroed by the kernel. A CPU training step frees and
re-allocates every activation, gradient and gradient bucket: on
data-parallel gpt:small, 2 gloo ranks, about 10,000 page faults a step
(40 MB). The GPU has its caching allocator for this; on the host,
``keep_freed_host_memory`` tells glibc to serve blocks of up to 32 MiB (its
largest setting) from the heap and never to trim it, so a step reuses the
last step's pages. The cost is that the process keeps its peak heap. Other C
libraries (musl, macOS) are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc refuses more on 64-bit
_NEVER_TRIM = 2**31 - 1  # mallopt takes a C int


@functools.cache
def keep_freed_host_memory() -> bool:
    """Make glibc reuse freed blocks instead of returning them to the OS, in this process; False where not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM))
