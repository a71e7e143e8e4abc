"""The C heap while weights load: no fragmentation left behind (glibc only; elsewhere a no-op).

Loading casts and quantizes tensor after tensor. glibc serves allocations below its (dynamic, up
to 32 MiB) mmap threshold from the heap, so the kept weights (a 4-bit block matrix is 8-22 MiB)
land between the freed temporaries, and the heap cannot give those holes back: loading a
Llama-2-7B-shaped model in 4 bits on CPU left 1.4 GiB of freed memory resident (bench/llama7b.py).
The first forward belongs to the load: on a CPU with AVX512-BF16, bitsandbytes repacks every 4-bit
weight then (unpacking it to int32 on the way), which left 0.7 GiB more when it ran after.
While weights load, every allocation of 1 MiB or more is its own mapping, returned to the system
when freed; afterwards the threshold is the one glibc's steady state reaches (32 MiB) and the heap
is trimmed once.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import sys
from typing import Any, Iterator

M_MMAP_THRESHOLD = -3  # mallopt parameter numbers from glibc's malloc.h
LOADING_THRESHOLD = 1 << 20
STEADY_THRESHOLD = 32 << 20  # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: where the dynamic threshold ends up


def _libc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


@contextlib.contextmanager
def lean_loading() -> Iterator[None]:
    """Large allocations are mmapped while the block runs; the heap is trimmed after it."""
    libc = _libc()
    if libc is None:
        yield
        return
    libc.mallopt(M_MMAP_THRESHOLD, LOADING_THRESHOLD)
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, STEADY_THRESHOLD)
        libc.malloc_trim(0)
