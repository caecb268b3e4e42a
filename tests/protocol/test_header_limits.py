"""The header section's limits: size and field count, measured piece by piece.

HeaderLimits is checked against a line-by-line reference on random content
fed in random pieces, and on the floods it exists for.
"""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from postroom.protocol.header_limits import (
    HEADER_TOO_BIG,
    MAX_HEADER_FIELDS,
    MAX_HEADER_SECTION,
    TOO_MANY_FIELDS,
    HeaderLimits,
)


def measure(data: bytes, *pieces: int, **limits: int) -> HeaderLimits:
    h = HeaderLimits(**limits)
    pos = 0
    for size in [*pieces, len(data)]:
        h.feed(data[pos : pos + size])
        pos += size
    return h


def test_a_plain_message() -> None:
    h = measure(b"From: a@b.example\r\nSubject: hi\r\n there\r\n\r\nbody: not a field\r\n")
    assert (h.done, h.problem, h.fields, h.size) == (True, None, 2, 40)


def test_a_message_without_header_fields_is_all_body() -> None:
    # As Postfix takes it: the first line that is no field starts the body.
    h = measure(b"Just a note, no header.\r\n" + b"x" * (2 * MAX_HEADER_SECTION) + b"\r\n")
    assert h.done and h.problem is None and h.fields == 0


def test_obsolete_space_before_colon_and_lf_line_ends() -> None:
    h = measure(b"Subject : old style\nX-A:1\n\tfolded\n\nbody\n", 3, 1, 5)
    assert (h.done, h.fields) == (True, 2)


def test_a_folded_megabyte_is_too_big() -> None:
    folded = b"X-Big: start\r\n" + b" more text on a continuation line\r\n" * 32_000
    h = measure(folded + b"\r\nbody\r\n", *[65536] * 20)
    assert h.problem == HEADER_TOO_BIG
    assert h.size <= MAX_HEADER_SECTION + 65536  # stopped measuring at the limit


def test_ten_thousand_fields_are_too_many() -> None:
    fields = b"".join(b"X%d:y\r\n" % i for i in range(10_000))
    assert len(fields) < MAX_HEADER_SECTION  # the size limit alone would let them in
    assert measure(fields + b"\r\nbody\r\n").problem == TOO_MANY_FIELDS
    exactly = b"".join(b"X-%d: y\r\n" % i for i in range(MAX_HEADER_FIELDS))
    assert measure(exactly + b"\r\nbody\r\n").problem is None


# --- against a line-by-line reference ----------------------------------------------

_LINE = re.compile(rb"[^\n]*\n")
_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]*")
_WSP = re.compile(rb"[ \t]*")


def reference(data: bytes, max_size: int, max_fields: int) -> tuple[bool, str | None, int]:
    """(done, problem, fields), one whole line at a time (`data` ends with LF)."""
    size = fields = 0

    def over() -> str | None:
        if size > max_size:
            return HEADER_TOO_BIG
        return TOO_MANY_FIELDS if fields > max_fields else None

    for line in _LINE.findall(data):
        if line[:1] == b"\n" or (line[:1] in (b" ", b"\t") and not fields):
            return True, None, fields
        if line[:1] == b"\r":
            return True, None, fields
        if line[:1] in (b" ", b"\t"):
            size += len(line)
            if over():
                return False, over(), fields
            continue
        name = _NAME.match(line).end()  # type: ignore[union-attr]
        wsp = _WSP.match(line, name).end() - name if name else 0  # type: ignore[union-attr]
        size += name + wsp
        if over():
            return False, over(), fields
        if not name or line[name + wsp : name + wsp + 1] != b":":
            return True, None, fields
        fields += 1
        if over():
            return False, over(), fields
        size += len(line) - name - wsp
        if over():
            return False, over(), fields
    return False, None, fields


PIECES = [b"A", b"Subject", b": x", b" ", b"\t", b":", b"\r\n", b"\n", b"\r", b"y" * 20,
          b"X-Long: " + b"z" * 40, b"\xc3\xa9"]


@settings(max_examples=400, deadline=None)
@given(
    parts=st.lists(st.sampled_from(PIECES), max_size=40),
    cuts=st.lists(st.integers(min_value=1, max_value=30), max_size=30),
    max_size=st.sampled_from([60, 200, 10_000]),
    max_fields=st.sampled_from([2, 5, 1000]),
)
def test_limits_match_the_reference(
    parts: list[bytes], cuts: list[int], max_size: int, max_fields: int
) -> None:
    data = b"".join(parts) + b"\n"
    h = measure(data, *cuts, max_size=max_size, max_fields=max_fields)
    assert (h.done, h.problem, h.fields) == reference(data, max_size, max_fields)
