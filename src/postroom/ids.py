"""Queue IDs: short, unique, roughly time-sorted names that tag every log line about a message."""

from __future__ import annotations

import os
import secrets
import threading
import time

# Crockford's base32 alphabet: upper-case, no I/L/O/U, and in ASCII order, so that
# IDs sort like the numbers they encode (RFC 4648's alphabet puts digits after letters).
_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"

QUEUE_ID_LENGTH = 12  # 60 bits: 34 of seconds (good until the year 2514) + 26 of sequence
_SEQ_BITS = 26
_SEQ_MASK = (1 << _SEQ_BITS) - 1

_lock = threading.Lock()
_seq = secrets.randbits(_SEQ_BITS)


def _reseed() -> None:
    # A forked child must not replay its parent's sequence.
    global _seq
    _seq = secrets.randbits(_SEQ_BITS)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reseed)


def _encode(value: int, length: int) -> str:
    """`value` in `length` base32 digits, the most significant first."""
    return "".join(_ALPHABET[(value >> 5 * i) & 31] for i in reversed(range(length)))


def new_queue_id(now: float | None = None) -> str:
    """A new 12-character queue ID such as ``"1KX9T3E0M4QZ"``, made at `now` (default: now).

    34 bits of Unix seconds, so later IDs sort later, then 26 bits of a per-process
    counter that starts at a random point: a process repeats none (below 2**26 a
    second), and two processes collide only in the same second with overlapping
    windows, which the queue's exclusive file creation detects.
    """
    global _seq
    seconds = int(time.time() if now is None else now) & ((1 << 34) - 1)
    with _lock:
        _seq = (_seq + 1) & _SEQ_MASK
        seq = _seq
    return _encode((seconds << _SEQ_BITS) | seq, QUEUE_ID_LENGTH)

