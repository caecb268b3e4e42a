"""The Authentication-Results header field (RFC 8601): written, and the forged ones removed.

`authentication_results` formats one field, authserv-id first, one method per
folded line. `OurResultsRemover` drops, as the message streams in, every
Authentication-Results field that already claims our authserv-id (RFC 8601 5:
a receiver MUST remove or rename those, since only we may speak for us);
fields of other authserv-ids stay, as do all fields in the body.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# An AR field held while its authserv-id is decided; a longer one is kept as it is.
# RFC 5322 2.1.1's 998-octet line, with room for folding.
MAX_HELD_FIELD = 16 * 1024
_AR_FIELD = re.compile(rb"authentication-results[ \t]*:", re.IGNORECASE)
_FIELD_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:")  # RFC 5322 3.6.8
_COMMENT = re.compile(rb"\([^()]*\)")
_TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~.@]+")  # RFC 2045 token, plus @
_UNSAFE_COMMENT = re.compile(r"[^\x20-\x27\x2a-\x5b\x5d-\x7e]")  # no ( ) \ or control


def value(text: str) -> str:
    """A property value (RFC 8601 2.2): a token as it is, else a quoted-string."""
    if _TOKEN.fullmatch(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def comment(text: str) -> str:
    """`text` as a comment (RFC 5322 3.2.2): parentheses become brackets, and what a
    comment cannot hold (backslash, control, non-ASCII) becomes "?"."""
    text = text.replace("(", "[").replace(")", "]")
    return "(" + _UNSAFE_COMMENT.sub("?", text)[:200] + ")" if text else ""


def authentication_results(authserv_id: str, methods: Iterable[str]) -> bytes:
    """The whole field, CRLF-terminated; `methods` are "method=result ..." strings."""
    parts = list(methods) or ["none"]
    text = f"Authentication-Results: {authserv_id};\r\n\t" + ";\r\n\t".join(parts) + "\r\n"
    return text.encode("utf-8")


def authserv_id(field_value: bytes) -> str:
    """The authserv-id an AR field's value starts with (comments skipped), lower-case."""
    text = re.sub(rb"\r?\n", b"", field_value)
    while True:
        stripped = _COMMENT.sub(b" ", text)
        if stripped == text:
            break
        text = stripped
    head = text.split(b";", 1)[0].strip().split()
    return head[0].decode("utf-8", "replace").lower() if head else ""


# States of OurResultsRemover.feed (the header section is read a line at a time).
_HEADER = "header"  # between fields: the next line decides
_HOLD = "hold"  # inside an AR field, held until its end shows whether it is ours
_BODY = "body"  # past the header section: everything passes


class OurResultsRemover:
    """Message pieces in, the same pieces out without AR fields naming `authserv_id`."""

    __slots__ = ("_ours", "_state", "_partial", "_held")

    def __init__(self, our_authserv_id: str) -> None:
        self._ours = our_authserv_id.lower()
        self._state = _HEADER
        self._partial = b""  # the start of a line not yet whole
        self._held = b""  # the AR field being decided

    def feed(self, data: bytes) -> bytes:
        if self._state == _BODY:
            return data
        data, self._partial = self._partial + data, b""
        out: list[bytes] = []
        pos = 0
        while self._state != _BODY:
            nl = data.find(b"\n", pos)
            if nl < 0:
                self._partial = data[pos:]
                if len(self._partial) > MAX_HELD_FIELD:  # no line this long in a header
                    out.append(self._release())
                    out.append(self._partial)
                    self._partial, self._state = b"", _BODY
                return b"".join(out)
            line = data[pos : nl + 1]
            pos = nl + 1
            out.append(self._line(line))
        out.append(data[pos:])
        return b"".join(out)

    def _line(self, line: bytes) -> bytes:
        if line[:1] in (b" ", b"\t"):  # a folded line belongs to the field before it
            if self._state == _HOLD:
                self._held += line
                if len(self._held) > MAX_HELD_FIELD:
                    return self._release()
                return b""
            return line
        released = self._release()
        if _AR_FIELD.match(line):
            self._state, self._held = _HOLD, line
            return released
        if line in (b"\r\n", b"\n") or not _FIELD_NAME.match(line):
            self._state = _BODY  # the empty line, or no field: the body starts here
        return released + line

    def _release(self) -> bytes:
        """The held AR field, unless it is ours (then nothing)."""
        held, self._held = self._held, b""
        if self._state == _HOLD:
            self._state = _HEADER
        if not held:
            return b""
        colon = held.index(b":")
        if authserv_id(held[colon + 1 :]) == self._ours:
            return b""
        return held

    def end(self) -> bytes:
        """What is held at the end of the message."""
        partial, self._partial = self._partial, b""
        if self._state == _BODY:
            return partial
        return self._release() + partial
