"""The header section of a message in flight, captured as it streams past.

Submission needs to read a few header fields before the message is stored
(From for the sender check, Message-ID and Date to add when missing, RFC 6409
8.2 and 8.3). Only the header section is kept, up to a cap.
"""

from __future__ import annotations

import uuid
from email.message import Message
from email.parser import HeaderParser
from email.policy import compat32

from postroom.server.received import rfc5322_date

# A header section longer than this is not parsed for submission fixes.
MAX_HEADER_CAPTURE = 256 * 1024


class HeaderCapture:
    """Feed message pieces; `done` turns True at the blank line ending the header section."""

    __slots__ = ("_buffer", "done")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self.done = False

    def feed(self, data: bytes) -> bool:
        """Take a piece; True when this piece completed the capture."""
        if self.done:
            return False
        start = max(0, len(self._buffer) - 3)
        self._buffer += data
        if self._buffer.startswith(b"\r\n"):
            del self._buffer[:]  # no header section at all
            self.done = True
            return True
        end = self._buffer.find(b"\r\n\r\n", start)
        if end >= 0:
            del self._buffer[end + 2 :]
            self.done = True
            return True
        if len(self._buffer) > MAX_HEADER_CAPTURE:
            self.done = True
            return True
        return False

    def message(self) -> Message:
        """The captured fields (no body), parsed leniently.

        The octets are read as UTF-8 (RFC 6532 3: the header fields of an SMTPUTF8
        message are UTF-8, and 8-bit octets in any other message are UTF-8 far more
        often than anything else), so a UTF-8 address comes back as the text its
        owner wrote in MAIL FROM. Octets that are not UTF-8 become U+FFFD, which
        no address in the user directory contains.
        """
        text = bytes(self._buffer).decode("utf-8", "replace")
        return HeaderParser(policy=compat32).parsestr(text)


def missing_headers(fields: Message, hostname: str, when: float | None = None) -> bytes:
    """The Date and Message-ID lines a submission server adds when the client left them
    out (RFC 6409 8.2, 8.3), CRLF-terminated; b"" when both are there."""
    lines = []
    if fields.get("Message-ID") is None:
        lines.append(f"Message-ID: <{uuid.uuid4().hex}@{hostname}>")
    if fields.get("Date") is None:
        lines.append(f"Date: {rfc5322_date(when)}")
    return "".join(line + "\r\n" for line in lines).encode("ascii")
