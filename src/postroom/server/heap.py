"""Hands the memory a large job freed back to the system (glibc's malloc_trim(3)).

glibc keeps freed memory in each thread's arena for reuse; a process that once
held a big password hash or a POP3 snapshot of many messages would keep that
much resident for the rest of its life. Where the C library is not glibc this
does nothing.
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


def release() -> bool:
    """Return free heap memory to the system; False where that cannot be done."""
    if _TRIM is None:
        return False
    _TRIM(0)
    return True
