"""The Return-Path field a final-delivery host writes (RFC 5321 4.4), and the ones it replaces.

When a message is filed into a mailbox, the envelope sender would be lost
with the envelope: RFC 5321 4.4 has the host making final delivery write it
on top of the message as "Return-Path: <sender>" ("<>" for the null sender).
A Return-Path already in the message was written by someone else (hosts
before the last one must not add it, so it can only mislead) and is removed
first, as RFC 5321 4.4 allows and Postfix's local delivery does.

`ReturnPathRemover` drops every Return-Path field, folded lines included,
from the header section of a message fed in pieces, holding at most the start
of one line while it decides. The header section ends at the empty line or
at the first line that is no header field (as protocol.header_limits reads it),
so a "Return-Path:" line in a body is never touched.
"""

from __future__ import annotations

import re

# The start of a line that decides what it is: a field name and any WSP before the
# colon (RFC 5322 4.5 obsolete syntax). A line that shows no colon within this many
# octets is kept as it is, whatever follows.
_DECIDE_WITHIN = 1000
_RETURN_PATH = re.compile(rb"return-path[ \t]*:", re.IGNORECASE)
_FIELD = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:")  # RFC 5322 3.6.8 field-name
_UNDECIDED = re.compile(rb"[\x21-\x39\x3b-\x7e]*[ \t]*")  # may still become a field

# What is being done with the current line: the states of `ReturnPathRemover.feed`.
_LINE_START = "line_start"  # at the start of a header section line: decide
_KEEP = "keep"  # in a field that stays (or its continuation lines)
_DROP = "drop"  # in a Return-Path field (or its continuation lines)
_BODY = "body"  # past the header section: everything passes


def return_path(sender: str) -> bytes:
    """The field for envelope sender `sender` ("" is the null sender), CRLF-terminated.

    An SMTPUTF8 sender is written as UTF-8 (RFC 6532 3.2 allows it in header fields).
    """
    return f"Return-Path: <{sender}>\r\n".encode()


class ReturnPathRemover:
    """Message pieces in, the same pieces out without their Return-Path fields."""

    __slots__ = ("_state", "_field", "_held")

    def __init__(self) -> None:
        self._state = _LINE_START
        self._field = _BODY  # what a continuation line belongs to: no field yet
        self._held = b""  # the start of a line, not yet decided

    def feed(self, data: bytes) -> bytes:
        if self._state == _BODY and not self._held:
            return data
        if self._held:
            data, self._held = self._held + data, b""
        out: list[bytes] = []
        pos, end = 0, len(data)
        while pos < end:
            state = self._state
            if state == _BODY:
                out.append(data[pos:])
                break
            nl = data.find(b"\n", pos)
            stop = end if nl < 0 else nl + 1
            if state == _LINE_START:
                if data[pos:stop] in (b"\r\n", b"\n"):
                    out.append(data[pos:stop])  # the empty line: the body follows
                    pos, self._state = stop, _BODY
                    continue
                decided = self._decide(data[pos:stop], complete=nl >= 0)
                if decided is None:
                    self._held = data[pos:]
                    break
                self._state = decided
                if decided == _BODY:
                    continue
            if self._state == _KEEP:
                out.append(data[pos:stop])
            pos = stop
            if nl >= 0:
                self._state = _LINE_START
        return b"".join(out)

    def end(self) -> bytes:
        """What is still held at the end of the message: a last line, too short to be
        a Return-Path field, kept as it is."""
        held, self._held = self._held, b""
        return held

    def _decide(self, line: bytes, *, complete: bool) -> str | None:
        """What the line starting here is, or None until more of it arrives."""
        first = line[:1]
        if first in (b" ", b"\t"):
            return self._field  # a folded line goes with its field (RFC 5322 2.2.3)
        if _RETURN_PATH.match(line):
            self._field = _DROP
            return _DROP
        if _FIELD.match(line):
            self._field = _KEEP
            return _KEEP
        if not complete and len(line) < _DECIDE_WITHIN and (
            line == b"\r" or _UNDECIDED.fullmatch(line)
        ):
            return None
        return _BODY

