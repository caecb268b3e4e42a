"""Hands the memory a large job freed back to the system (glibc's malloc_trim(3)).

glibc keeps freed memory in each thread's arena for reuse; a process that once
held a big password hash or a POP3 snapshot of many messages would keep that
much resident for the rest of its life. Where the C library is not glibc this
does nothing.

glibc also raises its mmap threshold (M_MMAP_THRESHOLD, 128 KiB at start) to the
size of each large block freed, up to 32 MiB, and its trim threshold to twice
that: after one session freed a 10 MiB index, the next session's big blocks
(the snapshot's packed names and UIDLs, the index text, LIST's answer) come
from the heap of the thread that made them, whose free top malloc_trim never
touches; tens of MiB stayed resident after QUIT. `fix_thresholds()`, called
once by the server before it forks, fixes both thresholds (`MALLOC_THRESHOLD`),
which turns that adjustment off: a large block is its own mapping, unmapped
when freed.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
from collections.abc import Callable

# A POP3 session whose snapshot held at least this many messages gives its memory
# back when it ends; a trim walks the whole heap, not worth it for fewer.
RELEASE_AFTER_MESSAGES = 10_000


def _malloc_trim() -> Callable[[int], int] | None:
    with contextlib.suppress(OSError, AttributeError, TypeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim: Callable[[int], int] = libc.malloc_trim
        return trim
    return None  # not glibc


_TRIM = _malloc_trim()

# Blocks of this size or more are mapped on their own and unmapped when freed; a
# heap's free top larger than this goes back to the system. 1 MiB keeps
# RETR's 256 KiB reads and other everyday buffers on the heap.
MALLOC_THRESHOLD = 1024 * 1024
_M_TRIM_THRESHOLD = -1  # malloc.h
_M_MMAP_THRESHOLD = -3


def fix_thresholds() -> bool:
    """Fix glibc's mmap and trim thresholds for this process and the ones it forks
    (the module's docstring); False where that cannot be done."""
    if _TRIM is None:
        return False
    with contextlib.suppress(OSError, AttributeError, TypeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt: Callable[[int, int], int] = libc.mallopt
        return bool(mallopt(_M_MMAP_THRESHOLD, MALLOC_THRESHOLD)
                    and mallopt(_M_TRIM_THRESHOLD, MALLOC_THRESHOLD))
    return False  # not glibc



def release() -> bool:
    """Return free heap memory to the system; False where that cannot be done."""
    if _TRIM is None:
        return False
    _TRIM(0)
    return True
