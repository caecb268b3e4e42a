"""CRLF framing for both protocols: command lines, and dot-terminated data both ways.

`LineBuffer` cuts lines out of received bytes. `DataReader` reads dot-terminated
content (SMTP DATA, RFC 5321 4.5.2; POP3 multi-line answers, RFC 1939 3) and
`DotStuffer` writes it; `LineMeter` measures BDAT content's lines (RFC 3030) by
DataReader's rule. All work on whole buffers with `bytes` methods, never a
Python loop per byte. The end of data is `<CRLF>.<CRLF>` and nothing else: a
bare LF or CR never ends it (that difference between receivers is what SMTP
smuggling exploits); the `bare_newline` mode refuses or normalizes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from postroom.protocol.folding import LineFolder

MAX_TEXT_LINE = 1000  # RFC 5321 4.5.3.1.6: a text line, including its CRLF
# RFC 5321 4.5.3.1.6 and RFC 5322 2.1.1: the octets of a line before its CRLF,
# and what Postfix's smtp_line_length_limit sends at most by default.
MAX_CONTENT_LINE = MAX_TEXT_LINE - 2
# The longest line a message received with DATA or BDAT may hold, its line end
# included. RFC 5322 2.1.1 caps lines at 998 characters, but real mail breaks that
# (HTML written on one line) and Postfix accepts it (smtpd cuts such lines into
# records of line_length_limit and joins them again on delivery); a sender that
# must keep to the RFC splits them on the way out. Past this a "line" is no text
# a reader can show, and the message is refused.
MAX_MESSAGE_LINE = 1024 * 1024
# A partial line DataReader holds back at most, whatever its `max_line`: a longer
# one is consumed as it arrives, and only its length is remembered.
_HELD_LINE = MAX_TEXT_LINE
END_OF_DATA = b".\r\n"  # what a sender writes after the (CRLF-ended) content

BareNewline = Literal["reject", "normalize"]
BARE_NEWLINE_MODES: tuple[BareNewline, ...] = ("reject", "normalize")

# Problems a DataReader can find in content, from the gravest. The reader
# reports the gravest one present anywhere in the content, so that the answer
# does not depend on how the bytes were split into pieces.
BARE_LF = "bare_lf"
BARE_CR = "bare_cr"
LONG_LINE = "long_line"
TOO_BIG = "too_big"
_RANK = {None: 0, TOO_BIG: 1, LONG_LINE: 2, BARE_CR: 3, BARE_LF: 4}

_MARK = b"\r\n.\r\n"  # the end of data when the data already started
_LONE_DOT_LINE = b"\r\n.\r\n"  # only possible inside content after normalizing


@dataclass(frozen=True, slots=True)
class Line:
    """One line cut by `LineBuffer`.

    `text` has no line terminator. `length` counts the octets on the wire,
    terminator included (what the RFC limits count). `bare_lf` says the line
    ended with LF alone. A `too_long` line went over the buffer's limit: its
    text was dropped and must not be interpreted.
    """

    text: bytes
    length: int
    bare_lf: bool = False
    too_long: bool = False


class LineBuffer:
    """Received bytes, handed out as lines ending in LF (CRLF or a bare LF).

    The buffer never holds more than `max_length` octets of an unfinished line:
    past that the line is dropped, the rest of it is skipped as it arrives, and
    `next_line` returns one `Line(too_long=True)` when its end comes. Bytes can
    also be taken raw (`take`, `take_all`) for DATA, BDAT chunks or TLS.
    """

    __slots__ = ("_buf", "_skipped", "max_length")

    def __init__(self, max_length: int) -> None:
        self.max_length = max_length
        self._buf = bytearray()
        self._skipped = 0  # octets dropped from an over-long line, 0 = not skipping

    def __len__(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next_line(self) -> Line | None:
        """The next complete line, or None if none is complete yet."""
        buf = self._buf
        nl = buf.find(b"\n")
        if nl < 0:
            if len(buf) > self.max_length:
                # Keep memory bounded: drop what we have and skip to the line end.
                self._skipped += len(buf)
                del buf[:]
            return None
        bare_lf = nl == 0 or buf[nl - 1] != 0x0D
        length = nl + 1
        if self._skipped:
            length += self._skipped
            self._skipped = 0
            del buf[: nl + 1]
            return Line(b"", length, bare_lf, too_long=True)
        if length > self.max_length:
            del buf[: nl + 1]
            return Line(b"", length, bare_lf, too_long=True)
        text = bytes(buf[: nl if bare_lf else nl - 1])
        del buf[: nl + 1]
        return Line(text, length, bare_lf)

    def take(self, limit: int) -> bytes:
        """Up to `limit` raw octets from the front of the buffer."""
        data = bytes(self._buf[:limit])
        del self._buf[:limit]
        return data

    def take_all(self) -> bytes:
        data = bytes(self._buf)
        self._buf.clear()
        return data

    def unread(self, data: bytes) -> None:
        """Put bytes back in front (what followed the end of a DATA block)."""
        if data:
            self._buf[:0] = data

    def clear(self) -> None:
        """Forget everything buffered, also a line being skipped."""
        self._buf.clear()
        self._skipped = 0


class DataReader:
    """Dot-terminated content: finds its end, un-stuffs dots, checks lines.

    Feed it the bytes that follow the DATA command (or a POP3 "+OK" line);
    `feed` returns the content that is complete so far: transparency dots
    removed (RFC 5321 4.5.2), CRLF line ends kept, the final CRLF included and
    the terminating ".CRLF" left out. When the end has been seen, `done` is set
    and `leftover` holds the bytes that came after it (pipelined commands).

    Between calls it holds at most one partial line (under MAX_TEXT_LINE
    octets) or a CR whose LF has not arrived; a longer line is consumed as it
    arrives. A line longer than `max_line` marks the content as having a long
    line.

    `problem` names the reason to refuse the content: the gravest of
    `BARE_LF`, `BARE_CR`, `LONG_LINE`, `TOO_BIG` found in it (in that order).
    Once one is found, content is no longer returned; the reader still looks
    for graver problems and for the end. `size` counts the content octets
    after removing the transparency dots (as RFC 1870 counts), until a bare
    line end or a long line stops the counting.

    `after_crlf` says the command that started the data ended with CRLF, so
    that a first line of "." ends an empty message.
    """

    __slots__ = (
        "_check_lines",
        "_normalize",
        "_partial",
        "_prev_crlf",
        "_tail",
        "done",
        "leftover",
        "max_line",
        "max_size",
        "problem",
        "size",
    )

    def __init__(
        self,
        *,
        bare_newline: BareNewline = "reject",
        max_line: int = MAX_TEXT_LINE,
        max_size: int = 0,
        after_crlf: bool = True,
        check_lines: bool = True,
    ) -> None:
        if bare_newline not in BARE_NEWLINE_MODES:
            raise ValueError(f"bare_newline must be one of {BARE_NEWLINE_MODES}")
        self._normalize = bare_newline == "normalize"
        self._check_lines = check_lines
        self.max_line = max_line
        self.max_size = max_size
        self._tail = b""  # unconsumed: a partial line, or a lone trailing CR
        self._prev_crlf = after_crlf  # consumed content ends with a real CRLF
        self._partial = 0  # octets of the current line already consumed
        self.done = False
        self.leftover = b""
        self.problem: str | None = None
        self.size = 0

    @property
    def buffered(self) -> int:
        """Octets held back (a partial line at most)."""
        return len(self._tail)

    def feed(self, data: bytes) -> bytes:
        if self.done:
            raise ValueError("DataReader.feed() after the end of data")
        buf = self._tail + data if self._tail else data
        self._tail = b""
        if self._prev_crlf:
            # The CRLF before the dot ended the previous line (or the command).
            if buf[:3] == END_OF_DATA:
                self._finish(buf[3:])
                return b""
            if len(buf) < 3 and END_OF_DATA.startswith(buf):
                self._tail = buf
                return b""
        # Every end marker and every stuffed dot inside the buffer starts with
        # CRLF "."; one search usually rules both out for a whole chunk.
        dot = buf.find(b"\r\n.")
        end = buf.find(_MARK, dot) if dot >= 0 else -1
        if end >= 0:
            out = self._content(buf[: end + 2], ends_line=True, dots=True)
            self._finish(buf[end + 5 :])
            return out
        # Consume up to the last line end: the last LF, or the last CR that is
        # not the final octet (a final CR may be the first half of a CRLF).
        cut = max(buf.rfind(b"\n"), buf.rfind(b"\r", 0, len(buf) - 1))
        out = b""
        if cut >= 0:
            segment = buf[: cut + 1]
            buf = buf[cut + 1 :]
            out = self._content(segment, ends_line=True, dots=dot >= 0)
            self._prev_crlf = segment.endswith(b"\r\n")
        if self._partial + len(buf) >= min(self.max_line, _HELD_LINE):
            # No line end in sight and the line is already long: consume it now
            # so that memory stays bounded (keep a final CR for its LF).
            keep = 1 if buf.endswith(b"\r") else 0
            segment = buf[: len(buf) - keep]
            buf = buf[len(buf) - keep :]
            if segment:
                out += self._content(segment, ends_line=False, dots=False)
                self._prev_crlf = False
        self._tail = buf
        return out

    def _finish(self, leftover: bytes) -> None:
        self.done = True
        self.leftover = leftover

    def _content(self, segment: bytes, *, ends_line: bool, dots: bool) -> bytes:
        """Check and un-stuff one consumed segment of raw content.

        A segment ending a line ends with LF or with a bare CR; any other
        segment holds no line end at all (part of an over-long line). `dots`
        False says the segment holds no CRLF "." (found by the caller).
        """
        already = self._partial  # octets of this line consumed before the segment
        self._partial = 0 if ends_line else already + len(segment)
        if self.problem == BARE_LF:
            return b""  # nothing graver can turn up
        # Clean content has exactly one CR and one LF per CRLF pair.
        crlf = segment.count(b"\r\n")
        if len(segment) - len(segment.translate(None, b"\r\n")) != 2 * crlf:
            if not self._normalize:
                if segment.count(b"\r") != crlf:
                    self._found(BARE_CR)
                if segment.count(b"\n") != crlf:
                    self._found(BARE_LF)
                return b""
            segment = segment.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            segment = segment.replace(b"\n", b"\r\n")
            dots = True
        if _RANK[self.problem] >= _RANK[LONG_LINE]:
            return b""
        if self._check_lines and _has_long_line(segment, already, self.max_line):
            self._found(LONG_LINE)
            return b""
        segment = self._unstuff(segment, at_line_start=already == 0, dots=dots)
        self.size += len(segment)
        if self.max_size and self.size > self.max_size:
            self._found(TOO_BIG)
        return b"" if self.problem is not None else segment

    def _found(self, problem: str) -> None:
        if _RANK[problem] > _RANK[self.problem]:
            self.problem = problem

    @staticmethod
    def _unstuff(segment: bytes, *, at_line_start: bool, dots: bool) -> bytes:
        # RFC 5321 4.5.2: a line that starts with a period and has other
        # characters loses that first period. A line of a lone "." inside the
        # content only exists after normalizing bare line ends; it stays.
        if at_line_start and segment[:1] == b"." and segment[:3] != b".\r\n":
            segment = segment[1:]
        if not dots or b"\r\n." not in segment:
            return segment
        if _LONE_DOT_LINE not in segment:
            return segment.replace(b"\r\n.", b"\r\n")
        lines = segment.split(b"\r\n")
        for i in range(1, len(lines)):
            line = lines[i]
            if len(line) > 1 and line[:1] == b".":
                lines[i] = line[1:]
        return b"\r\n".join(lines)


def _has_long_line(segment: bytes, already: int, limit: int) -> bool:
    """Whether a line of `segment` (the first one continuing `already` octets seen
    before) is longer than `limit` octets, its LF included.

    A last line without its LF counts as too long once it holds `limit` octets:
    whatever ends it makes it longer.
    """
    first = segment.find(b"\n")
    if first < 0:
        return already + len(segment) >= limit
    if already + first + 1 > limit:
        return True
    # Jump from a line start to the last LF within `limit` octets; a window
    # without any LF holds a line longer than the limit.
    pos = first + 1
    size = len(segment)
    while size - pos > limit:
        nl = segment.rfind(b"\n", pos, pos + limit)
        if nl < 0:
            return True
        pos = nl + 1
    # What is left holds at most `limit` octets: too long only as one unfinished line
    # of exactly `limit` octets (no LF in it at all).
    return size - pos == limit and segment.find(b"\n", pos) < 0


class LineMeter:
    """Finds a line longer than `max_line` octets (its LF included) in content fed
    piece by piece, holding nothing but the length of the current line."""

    __slots__ = ("max_line", "too_long", "_partial")

    def __init__(self, max_line: int = MAX_MESSAGE_LINE) -> None:
        self.max_line = max_line
        self.too_long = False
        self._partial = 0  # octets of the current line seen so far

    def feed(self, data: bytes) -> bool:
        """Take the next piece; True once a line was too long (and from then on)."""
        if self.too_long or not data:
            return self.too_long
        if _has_long_line(data, self._partial, self.max_line):
            self.too_long = True
        last = data.rfind(b"\n")
        self._partial = self._partial + len(data) if last < 0 else len(data) - last - 1
        return self.too_long


class DotStuffer:
    """Message bytes to dot-terminated wire form, piece by piece: SMTP DATA (RFC 5321
    4.5.2) and POP3 multi-line answers (RFC 1939 3).

    Line ends become CRLF: a bare LF, and a bare CR too, is a line end. RFC 5321
    2.3.8 lets a sender transmit CR and LF only together, as a line end, and RFC
    5322 2.3 allows them in a message no other way; receivers disagree on bare
    ones, which is what SMTP smuggling exploits. Then every line starting with
    a period gets one more. `end()` returns the bytes that close the data: a
    CRLF if the content did not end with one, then ".CRLF".

    With `dots=False` it only makes the line ends CRLF: BDAT content (RFC
    3030 2) is sent as it is, with no stuffing and no end marker; `close()`
    then gives the CRLF the content may lack, so a message goes out byte for
    byte the same whether it is sent with DATA or with BDAT.

    With `max_line`, lines longer than that many octets (before the CRLF) are
    folded or broken on the way (see folding.LineFolder), the same with either.
    """

    __slots__ = ("_dots", "_folder", "_held_cr", "_line_start")

    def __init__(self, *, dots: bool = True, max_line: int | None = None) -> None:
        self._dots = dots
        self._folder = LineFolder(max_line) if max_line is not None else None
        self._line_start = True
        self._held_cr = False  # a final CR whose LF may come with the next piece

    def feed(self, data: bytes, *, crlf: bool = False) -> bytes:
        """The wire form of the next piece. `crlf` vouches that the message has no
        bare CR or LF (a store that knows its file says so), which spares the
        check; the output is the same either way."""
        if self._held_cr:
            data = b"\r" + data
            self._held_cr = False
        if data.endswith(b"\r"):
            self._held_cr = True
            data = data[:-1]
        if not data:
            return b""
        if crlf:
            pass
        elif b"\r" not in data:
            data = data.replace(b"\n", b"\r\n")  # LF line ends, as many stores keep them
        else:
            # Counting first spares the usual message, CRLF throughout (the queue
            # and postroom's Maildir files hold it so), three copies of its body.
            pairs = data.count(b"\r\n")
            if pairs != data.count(b"\n") or pairs != data.count(b"\r"):
                data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
                data = data.replace(b"\n", b"\r\n")
        if self._folder is not None:
            data = self._folder.feed(data)
            if not data:
                return b""
        return self._stuff(data)

    def _stuff(self, data: bytes) -> bytes:
        if self._dots:
            data = data.replace(b"\r\n.", b"\r\n..")
            if self._line_start and data[:1] == b".":
                data = b"." + data
        self._line_start = data.endswith(b"\n")
        return data

    def close(self) -> bytes:
        """A CRLF if the content did not end with one; ready for a new message after it."""
        out = b""
        if self._folder is not None:
            tail = self._folder.close()  # the last line, when it has no line end
            if tail:
                out = self._stuff(tail)
        if not self._line_start or self._held_cr:
            out += b"\r\n"
        self._line_start = True
        self._held_cr = False
        return out

    def end(self) -> bytes:
        """The closing bytes of dot-terminated data: `close()`, then ".CRLF"."""
        return self.close() + END_OF_DATA


def dot_stuff(data: bytes) -> bytes:
    """A whole message in DATA wire form, ending with CRLF, without END_OF_DATA."""
    stuffer = DotStuffer()
    return stuffer.feed(data) + stuffer.close()
