"""Long lines folded or broken for a sender (lines.DotStuffer's `max_line`), as Postfix does."""

from __future__ import annotations

import re

# RFC 5322 2.2: a header field starts with its name (printable ASCII but ":")
# and a colon (3.6.8; 4.5.3 allows blanks before it); one that goes on starts
# with a blank. Any other line ends the header section.
_FIELD_START = re.compile(rb"[!-9;-~]+[ \t]*:")
_BLANKS = b" \t"
_BREAK = b"\r\n "  # what a forced break inserts: the line goes on after one space


class LineFolder:
    """Content whose every line fits `limit` octets before its CRLF, piece by piece.

    What Postfix's SMTP client does with smtp_line_length_limit: a sender
    must not send a line over 1000 octets with its CRLF (RFC 5321 4.5.3.1.6),
    yet real mail has longer ones, and receivers may refuse or cut them.
    Only lines over the limit change:

    - in the header section, a long line is folded before the last blank that
      leaves it at most `limit` octets (RFC 5322 2.2.3: folding is a CRLF put
      before a blank, and unfolding gives the field back exactly); without such
      a blank, "CRLF SP" goes in at the limit, so the field goes on;
    - in the body, "CRLF SP" goes in after `limit` octets, as Postfix does to
      spare MIME: base64 decoders skip the space.

    A forced break never splits a UTF-8 sequence. Folding at a blank keeps a
    DKIM signature good under "relaxed" header canonicalization (RFC 6376
    3.4.2 unfolds and joins blanks) but not under "simple"; a break in the
    body, or one without a blank, changes what any signature covers. That is
    what Postfix does too: sending the line whole breaks the SMTP limit, and
    the hop after may cut it anyway.

    Input has CRLF line ends only, and a piece never ends between a CR and its
    LF (DotStuffer feeds it so). Between pieces it holds at most one unfinished
    header line of up to `limit` octets, or the start of a UTF-8 character
    cut by the piece; body lines pass straight through. The octets given out
    are the same however the content is cut into pieces.
    `close()` gives what it holds at the end of a message and makes it ready
    for the next one.
    """

    __slots__ = ("_column", "_header", "_held", "_lead", "_line_cap", "limit")

    def __init__(self, limit: int) -> None:
        if limit < 3:
            raise ValueError("LineFolder needs a limit of at least 3 octets")
        self.limit = limit
        self._header = True  # still in the header section
        self._held = b""  # header section: the unfinished line, not yet given out
        self._lead = 0  # 1: the current line goes on after a forced break's space
        self._column = 0  # body: octets of the current line already given out
        self._line_cap = limit  # body: the current line's limit (see _cap)

    def feed(self, data: bytes) -> bytes:
        if self._header:
            return self._headers(data)
        return self._body(data)

    def close(self) -> bytes:
        """The unfinished last line, if any (without a line end); then a new message."""
        out = self._held
        if self._header and (out or self._lead):
            folded, rest, _ = self._fold(out, self._lead)
            out = folded + rest
        self._header, self._held, self._lead, self._column = True, b"", 0, 0
        self._line_cap = self.limit
        return out

    # -- the header section

    def _headers(self, data: bytes) -> bytes:
        buf = self._held + data if self._held else data
        lead, self._held, self._lead = self._lead, b"", 0
        out: list[bytes] = []
        pos = 0
        while (nl := buf.find(b"\n", pos)) >= 0:
            line = buf[pos : nl - 1]  # without its CRLF
            if not lead and not line:
                out.append(b"\r\n")  # the blank line: the body follows
                self._header = False
                pos = nl + 1
                break
            if not lead and not self._is_header(line):
                self._header = False  # a header section without its blank line
                break
            folded, rest, lead = self._fold(line, lead)
            out += (folded, rest, b"\r\n")
            pos, lead = nl + 1, 0
        rest = buf[pos:]
        if self._header and (lead or len(rest) < self.limit or self._is_header(rest)):
            # An unfinished header line: what is already too long is folded now,
            # the rest (at most `limit` octets) waits for its line end.
            folded, self._held, self._lead = self._fold(rest, lead)
            out.append(folded)
        else:
            self._header = False
            out.append(self._body(rest))
        return b"".join(out)

    def _is_header(self, line: bytes) -> bool:
        """Whether a line belongs to the header section; its first `limit` octets tell
        (a field name and its colon fit them), so an unfinished line is judged once
        it has that many, whatever the pieces."""
        return line[:1] in (b" ", b"\t") or _FIELD_START.match(line, 0, self.limit) is not None

    def _fold(self, line: bytes, lead: int) -> tuple[bytes, bytes, int]:
        """Fold a header line (no CRLF) until what is left fits the limit.

        `lead` octets of its first output line were given out already (the
        space of a forced break). Returns the folded lines with their line
        ends, what is left of the line, and its lead.
        """
        out: list[bytes] = []
        pos = 0
        cap = self._cap(line, 0) if not lead else self.limit
        while lead + len(line) - pos > cap:
            room = pos + cap - lead  # line[pos:room] fits on this output line
            # Fold before the last blank in reach, if the line before it is not all
            # blanks (RFC 5322 3.2.2 forbids a line of blanks only).
            blank = max(line.rfind(b" ", pos + 1, room + 1), line.rfind(b"\t", pos + 1, room + 1))
            if blank > pos and line[pos:blank].strip(_BLANKS):
                out += (line[pos:blank], b"\r\n")
                pos, lead = blank, 0
            else:
                cut = _char_boundary(line, room, pos)
                out += (line[pos:cut], _BREAK)
                pos, lead = cut, 1
            cap = self.limit
        return b"".join(out), line[pos:], lead

    def _cap(self, data: bytes, start: int) -> int:
        """The limit of the line that starts at `start`: one less when it starts with a
        period, so that DATA's transparency dot (RFC 5321 4.5.2) keeps it within 1000
        octets too, for receivers that count that dot (4.5.3.1.6 says not to). BDAT
        content is folded the same way: both deliver the same octets."""
        return self.limit - 1 if data[start : start + 1] == b"." else self.limit

    # -- the body

    def _body(self, data: bytes) -> bytes:
        if self._held:
            data, self._held = self._held + data, b""
        partial = _unfinished_character(data)
        if partial:
            # A character cut by the piece waits for its end: a break goes before it.
            data, self._held = data[:-partial], data[-partial:]
        column, lead = self._column, self._lead
        if self._fits(data, column):
            last = data.rfind(b"\n")
            if last >= 0 or column == 0:
                self._line_cap = self._cap(data, last + 1)  # the last line's, which goes on
            if last >= 0:
                column, lead = 0, 0
            self._column = column + len(data) - last - 1
            self._lead = lead
            return data
        out: list[bytes] = []
        pos, size = 0, len(data)
        cap = self._line_cap
        while pos < size:
            nl = data.find(b"\n", pos)
            end = size if nl < 0 else nl - 1  # where this line's text ends
            if column == 0:
                cap = self._cap(data, pos)
            while column + end - pos > cap:
                # The line keeps at least one octet besides a break's space.
                floor = pos - 1 if column > lead else pos
                cut = _char_boundary(data, pos + cap - column, floor)
                out += (data[pos:cut], _BREAK)
                pos, column, lead, cap = cut, 1, 1, self.limit
            if nl < 0:
                out.append(data[pos:])
                column += size - pos
                break
            out.append(data[pos : nl + 1])
            pos, column, lead = nl + 1, 0, 0
        self._column, self._lead, self._line_cap = column, lead, cap
        return b"".join(out)

    def _fits(self, data: bytes, column: int) -> bool:
        """Whether no line of `data` (the first continuing `column` octets) is too long.

        Checked against one octet less than the limit (see _cap), which only
        sends a line of exactly `limit` octets the slow way. Jumps from a line
        start to the last LF within reach; a stretch without one holds a line
        over it (DataReader's method).
        """
        limit = self.limit - 1
        first = data.find(b"\n")
        if first < 0:
            return column + len(data) <= limit
        if column + first - 1 > limit:
            return False
        pos, size = first + 1, len(data)
        while size - pos > limit:
            nl = data.rfind(b"\n", pos, pos + limit + 2)
            if nl < 0:
                return False
            pos = nl + 1
        return True


def _sequence_length(lead: int) -> int:
    """RFC 3629 3: how many octets the UTF-8 sequence this lead octet starts has."""
    return 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4


def _unfinished_character(data: bytes) -> int:
    """How many octets at the end of `data` begin a UTF-8 sequence that is not complete."""
    for back in range(1, min(3, len(data)) + 1):
        octet = data[-back]
        if octet & 0xC0 == 0x80:
            continue  # a continuation octet: its lead is further back
        if octet >= 0xC0:
            return back if _sequence_length(octet) > back else 0
        return 0
    return 0


def _char_boundary(text: bytes, cut: int, floor: int) -> int:
    """`cut`, moved back to the start of the UTF-8 sequence it would split (at most
    three continuation octets follow a lead octet), but kept above `floor`; `cut`
    itself when it splits nothing or the octets are not UTF-8."""
    at = cut
    while at < len(text) and text[at] & 0xC0 == 0x80 and at > cut - 3 and at > floor:
        at -= 1
    if at < cut and at > floor and text[at] >= 0xC0 and at + _sequence_length(text[at]) > cut:
        return at
    return cut
