"""The format of a queue file: the envelope on the first line, then the message.

    postroom-envelope {"queue_id": ..., "recipients": [...], ...}LF
    Received: ...CRLF
    ...the message as received, CRLF lines...

One line of JSON (postroom.queue.envelope; JSON strings escape every control
character, so it holds no LF). The queue (postroom.queue.store) writes and
changes these files; everything that reads a queued message (the couriers,
bounces, `postroom trace`) opens it here, past that line.
"""

from __future__ import annotations

import io
import os
from typing import BinaryIO

from postroom.queue.envelope import Envelope

# The first line of a queue file starts with this tag: nothing else does (a
# message starts with a header field, whose name ends with ":"), so a file of
# an older queue, without an envelope line, is told apart.
ENVELOPE_TAG = b"postroom-envelope "


def envelope_line(envelope: Envelope) -> bytes:
    """The first line of `envelope`'s queue file. Its `size` may not be known yet
    (the message follows): readers take the size from the file instead."""
    return ENVELOPE_TAG + envelope.to_json() + b"\n"


def has_envelope_line(f: io.BufferedReader) -> bool:
    """Whether the file, just opened, begins with an envelope line (a queue file);
    it is peeked at, not read, so it stays at its start."""
    return f.peek(len(ENVELOPE_TAG))[: len(ENVELOPE_TAG)] == ENVELOPE_TAG


def open_content(path: str | os.PathLike[str]) -> tuple[BinaryIO, int]:
    """Open a stored message for reading at its first octet, past the envelope line
    of a queue file (any other file starts with its message); returns the open
    file and the message's size in octets. The caller closes the file.
    """
    f = open(path, "rb")  # noqa: SIM115 - the caller's
    try:
        start = len(f.readline()) if has_envelope_line(f) else 0
        size = os.fstat(f.fileno()).st_size - start
    except BaseException:
        f.close()
        raise
    return f, size


def content_size(path: str | os.PathLike[str]) -> int:
    """The size of the message stored at `path` (see open_content)."""
    f, size = open_content(path)
    f.close()
    return size
