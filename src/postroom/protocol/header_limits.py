"""The header section's size and field count, measured as message content streams past.

An SMTP server must hold a message's header section to work on it (loop
detection, submission fixes), so an unbounded one is memory a stranger can
take. `HeaderLimits` is fed the content pieces of one message, in order, and
says when its header section (RFC 5322 2.2: the lines before the first empty
line) grows past a size or a number of fields. It holds no content, only a
few counters, and costs one `find` per line of the header section, whose
number the field limit bounds.

The header section ends at the empty line, or at the first line that is no
header field (RFC 5322 2.2: "field-name:"; obsolete syntax allows WSP before
the colon, 4.5), where Postfix's cleanup also takes the body to begin: a
message sent without any header fields is all body, not one huge header. A
line starting with SP or HTAB continues the field before it (folding,
RFC 5322 2.2.3). Lines may end with CRLF or, in BDAT content taken as it
comes, with LF alone.
"""

from __future__ import annotations

import re

# As Postfix's header_size_limit (102400): octets of the header section,
# line ends included.
MAX_HEADER_SECTION = 100 * 1024
# RFC 5322 sets no count. Real mail has a few dozen fields (trace fields
# included: past 50 Received fields a message is refused as looping), while
# 10,000 tiny ones fit in MAX_HEADER_SECTION.
MAX_HEADER_FIELDS = 1000

HEADER_TOO_BIG = "header_too_big"
TOO_MANY_FIELDS = "too_many_fields"

_WSP = (0x20, 0x09)
_LF, _CR, _COLON = 0x0A, 0x0D, 0x3A
_FTEXT = re.compile(rb"[\x21-\x39\x3b-\x7e]*")  # RFC 5322 3.6.8 field-name characters
_WSPS = re.compile(rb"[ \t]*")

# Where in a line the measuring is: the states of `HeaderLimits.feed`.
_LINE_START = "line_start"  # the next octet starts a line
_CR_START = "cr_start"  # the line started with CR: the empty line if LF follows
_NAME = "name"  # in a field name
_NAME_WSP = "name_wsp"  # WSP after a field name, before its colon
_REST = "rest"  # the rest of a field's line, or a continuation line


class HeaderLimits:
    """Measures one message's header section; `problem` names the limit it passed."""

    __slots__ = ("max_size", "max_fields", "size", "fields", "done", "problem",
                 "_state", "_name")

    def __init__(self, max_size: int = MAX_HEADER_SECTION,
                 max_fields: int = MAX_HEADER_FIELDS) -> None:
        self.max_size = max_size
        self.max_fields = max_fields
        self.size = 0  # octets of the header section so far
        self.fields = 0
        self.done = False  # the header section ended (the body began)
        self.problem: str | None = None  # HEADER_TOO_BIG or TOO_MANY_FIELDS
        self._state = _LINE_START
        self._name = 0  # octets of the field name being read

    def feed(self, data: bytes) -> str | None:
        """Take the next piece of content; return `problem` (None while within limits)."""
        pos, end = 0, len(data)
        while pos < end and not self.done and self.problem is None:
            state = self._state
            if state == _LINE_START:
                first = data[pos]
                if first == _LF or (first in _WSP and not self.fields):
                    self.done = True  # the empty line, or a body with no fields at all
                elif first == _CR:
                    self._state = _CR_START
                    pos += 1
                elif first in _WSP:
                    self._state = _REST
                else:
                    self._state, self._name = _NAME, 0
            elif state == _CR_START:
                self.done = True  # CRLF: the empty line; a bare CR starts no field either
            elif state in (_NAME, _NAME_WSP):
                m = (_FTEXT if state == _NAME else _WSPS).match(data, pos)
                stop = m.end() if m is not None else pos  # both patterns match "" at least
                self._grow(stop - pos)
                if state == _NAME:
                    self._name += stop - pos
                pos = stop
                if pos == end or self.problem is not None:
                    break
                following = data[pos]
                if self._name and following == _COLON:
                    self._field()
                    self._state = _REST
                elif self._name and state == _NAME and following in _WSP:
                    self._state = _NAME_WSP
                else:
                    self.done = True  # no header field: the body starts here
            else:
                nl = data.find(b"\n", pos)
                stop = end if nl < 0 else nl + 1
                self._grow(stop - pos)
                pos = stop
                if nl >= 0:
                    self._state = _LINE_START
        return self.problem

    def _field(self) -> None:
        self.fields += 1
        if self.fields > self.max_fields and self.problem is None:
            self.problem = TOO_MANY_FIELDS

    def _grow(self, octets: int) -> None:
        self.size += octets
        if self.size > self.max_size and self.problem is None:
            self.problem = HEADER_TOO_BIG
