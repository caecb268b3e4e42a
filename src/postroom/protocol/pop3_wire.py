"""POP3 on the wire: status lines both ways, and a message as RETR or TOP sends it.

`Pop3Reply` is how the server core writes a status line (RFC 1939 3, RFC 2449
8), `parse_status` how the client core reads one. `MessageWriter` gives a stored
message's wire form (RFC 1939 3, 7) through lines.DotStuffer, cut for TOP.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from postroom.protocol._core import LocalProtocolError, RemoteProtocolError, shown
from postroom.protocol.lines import END_OF_DATA, DotStuffer

# RFC 1939 7 (APOP): the greeting's timestamp has the syntax of a msg-id, "<...>".
TIMESTAMP_RE = re.compile(r"<[\x21-\x3b\x3d\x3f-\x7e]+>")
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


class MessageWriter:
    """The body of one RETR (`top_lines` None) or TOP answer; `done` once TOP has
    all it needs, after which further pieces are dropped."""

    __slots__ = ("_stuffer", "_top")

    def __init__(self, top_lines: int | None) -> None:
        self._stuffer = DotStuffer()
        self._top = _Top(top_lines) if top_lines is not None else None

    @property
    def done(self) -> bool:
        return self._top is not None and self._top.done

    def feed(self, data: bytes, crlf: bool = False) -> bytes:
        """The wire form of the next piece (`crlf`: see DotStuffer.feed)."""
        top = self._top
        if top is None:
            return self._stuffer.feed(data, crlf=crlf)
        if top.done:
            return b""
        return top.cut(self._stuffer.feed(data, crlf=crlf))

    def finish(self) -> bytes:
        """The end: a line end if the last line lacks one, then the "." line. A TOP
        cut ends at a line end."""
        return END_OF_DATA if self.done else self._stuffer.end()


class _Top:
    """What TOP n sends of a message (RFC 1939 7): the header section, the blank line
    and n body lines. It cuts the wire form (CRLF line ends, dots stuffed, which
    adds no line and no blank line) piece by piece; `done` once it has them all."""

    __slots__ = ("_at_line_start", "_in_headers", "_wanted", "done")

    def __init__(self, lines: int) -> None:
        self._at_line_start = True
        self._in_headers = True
        self._wanted = lines  # body lines still to send
        self.done = False

    def cut(self, data: bytes) -> bytes:
        if not data:
            return data
        at_line_start, self._at_line_start = self._at_line_start, data.endswith(b"\n")
        start = 0
        if self._in_headers:
            if at_line_start and data.startswith(b"\r\n"):
                start = 2
            else:
                blank = data.find(b"\n\r\n")
                if blank < 0:
                    return data
                start = blank + 3
            self._in_headers = False
        wanted = self._wanted
        if wanted == 0:
            self.done = True
            return data[:start]
        found = data.count(b"\n", start)
        if found < wanted:
            self._wanted = wanted - found
            return data
        end = start
        for _ in range(wanted):  # at most `wanted` steps, and TOP asks for few lines
            end = data.index(b"\n", end) + 1
        self._wanted = 0
        self.done = True
        return data[:end]
