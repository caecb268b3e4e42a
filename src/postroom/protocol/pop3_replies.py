"""POP3 status lines (RFC 1939 3, RFC 2449 8 response codes) and their wire form both ways.

`Pop3Reply` is the one way the server core writes a status line, and
`parse_status` the one way the client core reads one; both take response
codes by the same RFC 2449 8 syntax.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from postroom.protocol._core import LocalProtocolError, RemoteProtocolError, shown

# RFC 2449 4: a response line is at most 512 octets including the CRLF.
MAX_RESPONSE_LINE = 512
# RFC 2449 8: a response code is one or more atoms separated by "/", in brackets
# at the start of the text.
_CODE = r"[A-Za-z0-9-]+(?:/[A-Za-z0-9-]+)*"
_CODE_RE = re.compile(_CODE)
_BRACKETED_CODE_RE = re.compile(rf"\[({_CODE})\] ?")


@dataclass(frozen=True, slots=True)
class Pop3Reply:
    """One status line: "+OK text" or "-ERR [CODE] text" (RFC 1939 3, RFC 2449 8)."""

    ok: bool
    text: str = ""
    code: str | None = None

    def __post_init__(self) -> None:
        if "\r" in self.text or "\n" in self.text:
            raise LocalProtocolError(f"reply text must be one line: {self.text!r}")
        if self.code is not None and not _CODE_RE.fullmatch(self.code):
            raise LocalProtocolError(f"malformed response code: {self.code!r}")

    def to_bytes(self) -> bytes:
        line = "+OK" if self.ok else "-ERR"
        if self.code:
            line += f" [{self.code}]"
        if self.text:
            line += " " + self.text
        data = line.encode("utf-8")
        if len(data) > MAX_RESPONSE_LINE - 2:
            # RFC 2449 4; cut on a character boundary so the line stays valid UTF-8.
            cut = data[: MAX_RESPONSE_LINE - 2].decode("utf-8", "ignore")
            data = cut.encode("utf-8")
        return data + b"\r\n"


def parse_status(line: bytes) -> tuple[str, str, str | None]:
    """One status line without its line end: ("+OK" | "-ERR" | "+", text, code).

    RFC 1939 3: "+OK" or "-ERR", then a space and text, or nothing. The
    indicator is taken in any case (some servers write "+ok"). RFC 5034 4:
    "+" alone or "+ " and base64 is a SASL continuation. Raises
    RemoteProtocolError.
    """
    head, sep, rest = line.partition(b" ")
    indicator = head.upper()
    if indicator not in (b"+OK", b"-ERR", b"+"):
        raise RemoteProtocolError(f"malformed status line {shown(line)}")
    text = rest.decode("utf-8", "replace")
    code = None
    if indicator != b"+":
        m = _BRACKETED_CODE_RE.match(text)
        if m is not None:
            code = m.group(1).upper()
            text = text[m.end() :]
    return indicator.decode("ascii"), text.strip(" \t"), code
