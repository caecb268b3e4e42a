"""A message as RETR or TOP sends it (RFC 1939 3 and 7): CRLF lines, dots stuffed, cut for TOP.

`MessageWriter` is fed the stored message piece by piece, in any line-end
convention; lines.DotStuffer makes its wire form, and for TOP only the header
section, the blank line and the lines asked for go out.
"""

from __future__ import annotations

from postroom.protocol.lines import END_OF_DATA, DotStuffer


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
