"""The format of a queue file: the envelope on the first line, then the message.

    postroom-envelope {"queue_id": ..., "recipients": [...], ...}LF
    Received: ...CRLF
    ...the message as received, CRLF lines...

One line of JSON (postroom.queue.envelope; JSON strings escape every control
character, so it holds no LF). The queue (postroom.queue.store) writes,
changes and opens these files; couriers get the message from it as a
postroom.queue.content.Content, never the file. `postroom trace`, which reads
queue files and Maildir files alike, opens them with `open_content`.
"""

from __future__ import annotations

import os
from typing import BinaryIO

from postroom.queue.envelope import Envelope

# The first line of a queue file starts with this tag: no message does (a
# message starts with a header field, whose name ends with ":"), so a queue
# file is told apart from a message stored elsewhere (a Maildir's).
ENVELOPE_TAG = b"postroom-envelope "
# What is read of a queue file first while looking for the end of its envelope
# line (one page: the line of a message to a few recipients fits), then at a
# time while the line goes on.
FIRST_READ = 4096
LINE_READ = 64 * 1024


def envelope_line(envelope: Envelope) -> bytes:
    """The first line of `envelope`'s queue file. Its `size` may not be known yet
    (the message follows): readers take the size from the file instead."""
    return ENVELOPE_TAG + envelope.to_json() + b"\n"


def read_envelope_line(fd: int) -> bytes | None:
    """The envelope line at the start of the open file `fd`, LF included, read with
    pread(2) (the file's position is left alone); None when the file does not start
    with ENVELOPE_TAG. A line cut short (no LF before the end) is returned as it is:
    the caller tells it by its missing LF."""
    line = os.pread(fd, FIRST_READ, 0)
    if not line.startswith(ENVELOPE_TAG):
        return None
    end = line.find(b"\n")
    while end < 0:
        more = os.pread(fd, LINE_READ, len(line))
        if not more:
            return line
        found = more.find(b"\n")
        end = -1 if found < 0 else len(line) + found
        line += more
    return line[: end + 1]


def open_content(path: str | os.PathLike[str]) -> tuple[BinaryIO, int]:
    """Open a stored message for reading at its first octet, past the envelope line
    of a queue file (any other file starts with its message); returns the open
    file and the message's size in octets. The caller closes the file.
    """
    f = open(path, "rb")  # noqa: SIM115 - the caller's
    try:
        line = read_envelope_line(f.fileno())
        start = len(line) if line is not None else 0
        f.seek(start)
        size = os.fstat(f.fileno()).st_size - start
    except BaseException:
        f.close()
        raise
    return f, size
