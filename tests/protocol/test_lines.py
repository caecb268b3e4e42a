"""CRLF framing: command lines, the end of DATA, dot-unstuffing and dot-stuffing.

The bulk DataReader is checked against a slow line-by-line reader written
straight from RFC 5321 4.5.2, on random content fed in random pieces.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_folding import folded

from postroom.protocol.lines import (
    BARE_CR,
    BARE_LF,
    END_OF_DATA,
    LONG_LINE,
    MAX_CONTENT_LINE,
    MAX_MESSAGE_LINE,
    MAX_TEXT_LINE,
    TOO_BIG,
    DataReader,
    DotStuffer,
    Line,
    LineBuffer,
    LineMeter,
    dot_stuff,
)

# --- LineBuffer -------------------------------------------------------------------


def lines_of(buf: LineBuffer) -> list[Line]:
    out = []
    while (line := buf.next_line()) is not None:
        out.append(line)
    return out


def test_line_buffer_cuts_lines_and_flags_bare_lf() -> None:
    buf = LineBuffer(100)
    buf.feed(b"NOOP\r\nRSET\nQUI")
    assert lines_of(buf) == [Line(b"NOOP", 6), Line(b"RSET", 5, bare_lf=True)]
    buf.feed(b"T\r\n\n")
    assert lines_of(buf) == [Line(b"QUIT", 6), Line(b"", 1, bare_lf=True)]
    assert len(buf) == 0


def test_line_buffer_keeps_a_cr_split_from_its_lf() -> None:
    buf = LineBuffer(100)
    buf.feed(b"NOOP\r")
    assert buf.next_line() is None
    buf.feed(b"\n")
    assert buf.next_line() == Line(b"NOOP", 6)


def test_line_buffer_limit_counts_the_terminator() -> None:
    buf = LineBuffer(10)
    buf.feed(b"12345678\r\n123456789\r\n")
    assert lines_of(buf) == [Line(b"12345678", 10), Line(b"", 11, too_long=True)]


def test_line_buffer_skips_an_endless_line_without_holding_it() -> None:
    buf = LineBuffer(10)
    for _ in range(100):
        buf.feed(b"x" * 7)
        assert buf.next_line() is None
        assert len(buf) <= 17
    buf.feed(b"QUIT\r\nNOOP\r\n")
    assert lines_of(buf) == [Line(b"", 706, too_long=True), Line(b"NOOP", 6)]


def test_line_buffer_raw_access() -> None:
    buf = LineBuffer(100)
    buf.feed(b"abcdef")
    assert buf.take(2) == b"ab"
    buf.unread(b"xy")
    assert buf.take_all() == b"xycdef"
    buf.feed(b"zzz")
    buf.clear()
    assert len(buf) == 0 and buf.next_line() is None


# --- DataReader: end of data --------------------------------------------------------


def read(data: bytes, *pieces: int, **kw: object) -> tuple[DataReader, bytes, bytes]:
    """Feed `data` in pieces of the given sizes (then the rest).

    Returns the reader, the content it returned and what followed the end
    (its leftover plus anything not fed once it was done).
    """
    reader = DataReader(**kw)  # type: ignore[arg-type]
    out = []
    pos = 0
    for size in [*pieces, len(data)]:
        if reader.done or pos >= len(data):
            break
        out.append(reader.feed(data[pos : pos + size]))
        pos += size
    return reader, b"".join(out), reader.leftover + data[pos:]


@pytest.mark.parametrize(
    ("wire", "message", "leftover"),
    [
        (b".\r\n", b"", b""),
        (b".\r\nQUIT\r\n", b"", b"QUIT\r\n"),
        (b"a\r\n.\r\n", b"a\r\n", b""),
        (b"a\r\n.\r\nb", b"a\r\n", b"b"),
        (b"\r\n.\r\n", b"\r\n", b""),
        (b"a\r\n..\r\n.\r\n", b"a\r\n.\r\n", b""),
    ],
)
def test_end_of_data(wire: bytes, message: bytes, leftover: bytes) -> None:
    for pieces in ((), (1,) * len(wire), (2,) * len(wire)):
        r, got, rest = read(wire, *pieces)
        assert r.done and r.problem is None
        assert (got, rest) == (message, leftover)


@pytest.mark.parametrize(
    "wire",
    [b"a\n.\n", b"a\n.\r\n", b"a\r.\r\n", b"a\r\n.\n", b"a\r\n.\r", b"a.\r\n", b"a\r\n. \r\n",
     b"a\r\n.\r\r\n"],
)
def test_bare_line_ends_never_end_data(wire: bytes) -> None:
    for mode in ("reject", "normalize"):
        for pieces in ((), (1,) * len(wire)):
            assert not read(wire, *pieces, bare_newline=mode)[0].done


def test_after_crlf_false_needs_a_crlf_first() -> None:
    r, got, _ = read(b".\r\nx\r\n.\r\n", bare_newline="normalize", after_crlf=False)
    assert r.done and got == b".\r\nx\r\n"


def test_problems() -> None:
    def problem(data: bytes, *pieces: int, **kw: object) -> str | None:
        reader = read(data, *pieces, **kw)[0]
        assert reader.done
        return reader.problem

    assert problem(b"a\nb\r\n.\r\n") == BARE_LF
    assert problem(b"a\rb\r\n.\r\n") == BARE_CR
    assert problem(b"x" * 999 + b"\r\n.\r\n") == LONG_LINE
    assert problem(b"x" * 998 + b"\r\n.\r\n") is None
    assert problem(b"x" * 5000 + b"\r\n.\r\n", 100) == LONG_LINE
    assert problem(b"abc\r\n.\r\n", max_size=4) == TOO_BIG
    assert read(b"abc\r\n.\r\n", max_size=4)[1] == b""
    assert problem(b"abc\r\n.\r\n", max_size=5) is None
    assert problem(b"x" * 5000 + b"\r\n.\r\n", check_lines=False) is None


def test_feed_after_the_end_raises() -> None:
    r = read(b".\r\n")[0]
    with pytest.raises(ValueError):
        r.feed(b"x")
    with pytest.raises(ValueError):
        DataReader(bare_newline="lenient")  # type: ignore[arg-type]


@pytest.mark.parametrize("max_line", [MAX_TEXT_LINE, MAX_MESSAGE_LINE])
def test_reader_holds_at_most_a_partial_line(max_line: int) -> None:
    # However long the lines it accepts, the reader holds less than a text line.
    r = DataReader(check_lines=False, max_line=max_line)
    for _ in range(200):
        r.feed(b"y" * 333)
        assert r.buffered < MAX_TEXT_LINE
    assert r.problem is None


# --- LineMeter (BDAT content) ----------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    parts=st.lists(st.sampled_from([b"a", b"\n", b"\r\n", b"x" * 30, b"y" * 70]), max_size=30),
    cuts=st.lists(st.integers(min_value=1, max_value=90), max_size=30),
)
def test_line_meter_finds_what_data_would(parts: list[bytes], cuts: list[int]) -> None:
    """The same rule for BDAT as for DATA: a line over the limit, its LF included;
    an unfinished last line once it holds the limit."""
    data, limit = b"".join(parts), 100
    *whole, last = data.split(b"\n")
    expected = any(len(line) + 1 > limit for line in whole) or len(last) >= limit
    meter = LineMeter(limit)
    pos = 0
    for size in [*cuts, len(data)]:
        meter.feed(data[pos : pos + size])
        pos += size
    assert meter.too_long == expected


def test_line_meter_after_a_jump_counts_only_the_last_line() -> None:
    """What is left after the scan holds complete short lines and then a last line
    shorter than the limit: nothing is too long (a property-test find)."""
    meter = LineMeter(100)
    assert not meter.feed(b"\n" + b"a" * 8 + b"\r\n" + b"x" * 90)



# --- DataReader against a line-by-line reference -------------------------------------


@dataclass
class Reference:
    done: bool
    content: bytes
    leftover: bytes
    problem: str | None


_LINE_END = re.compile(rb"\r\n|\n|\r")


_RANK = [TOO_BIG, LONG_LINE, BARE_CR, BARE_LF]  # the gravest last


def reference(
    data: bytes, mode: str, max_size: int = 0, max_line: int = MAX_TEXT_LINE
) -> Reference:
    """RFC 5321 4.5.2, one line at a time: the end is "." between two real CRLFs.

    The problem reported is the gravest found anywhere in the content.
    """
    out = []
    found: set[str] = set()
    prev_crlf = True
    pos = 0
    size = 0

    def result(done: bool, leftover: bytes) -> Reference:
        problem = max(found, key=_RANK.index) if found else None
        return Reference(done, b"".join(out) if problem is None else b"", leftover, problem)

    while True:
        m = _LINE_END.search(data, pos)
        if m is None or (m.group() == b"\r" and m.end() == len(data)):
            rest = data[pos:]
            partial = rest[:-1] if m is not None else rest  # a final CR awaits its LF
            if len(partial) >= max_line:
                # Unfinished: a partial line already this long can only be too long.
                found.add(LONG_LINE)
            elif len(rest) >= MAX_TEXT_LINE:
                # A partial line this long is handed out as it comes, not held back.
                if partial[:1] == b".":
                    partial = partial[1:]
                size += len(partial)
                if max_size and size > max_size:
                    found.add(TOO_BIG)
                out.append(partial)
            return result(False, b"")
        line, end = data[pos : m.start()], m.group()
        pos = m.end()
        if line == b"." and end == b"\r\n" and prev_crlf:
            return result(True, data[pos:])
        prev_crlf = end == b"\r\n"
        if end != b"\r\n" and mode == "reject":
            found.add(BARE_LF if end == b"\n" else BARE_CR)
            continue
        if len(line) + 2 > max_line:
            found.add(LONG_LINE)
            continue
        if line[:1] == b"." and len(line) > 1:
            line = line[1:]
        size += len(line) + 2
        if max_size and size > max_size:
            found.add(TOO_BIG)
        out.append(line + b"\r\n")


PIECES = [b"a", b".", b"..", b"\r", b"\n", b"\r\n", b"\r\n.", b"\r\n.\r\n", b"x" * 300,
          b"y" * 1100]


@settings(max_examples=300, deadline=None)
@given(
    parts=st.lists(st.sampled_from(PIECES), max_size=40),
    cuts=st.lists(st.integers(min_value=1, max_value=50), max_size=40),
    mode=st.sampled_from(["reject", "normalize"]),
    max_size=st.sampled_from([0, 0, 200]),
    max_line=st.sampled_from([MAX_TEXT_LINE, MAX_TEXT_LINE, 2500]),
)
def test_reader_matches_the_reference(
    parts: list[bytes], cuts: list[int], mode: str, max_size: int, max_line: int
) -> None:
    # max_line 2500: lines past the 1000 octets the reader holds are consumed in
    # parts, and only their length decides.
    data = b"".join(parts)
    ref = reference(data, mode, max_size, max_line)
    reader = DataReader(bare_newline=mode, max_size=max_size,  # type: ignore[arg-type]
                        max_line=max_line)
    got = []
    pos = 0
    for size in [*cuts, len(data)]:
        if reader.done or pos >= len(data):
            break
        got.append(reader.feed(data[pos : pos + size]))
        pos += size
    assert reader.done == ref.done
    if ref.done:
        assert reader.leftover + data[pos:] == ref.leftover
    assert reader.problem == ref.problem
    if ref.problem is None:
        assert b"".join(got) == ref.content
        if ref.done:
            assert reader.size == len(ref.content)


# --- Dot-stuffing -------------------------------------------------------------------


def test_dot_stuff() -> None:
    assert dot_stuff(b"") == b""
    assert dot_stuff(b"a") == b"a\r\n"
    assert dot_stuff(b".a\n.\r\nb\r.") == b"..a\r\n..\r\nb\r\n..\r\n"
    assert END_OF_DATA == b".\r\n"


def test_dot_stuffer_in_pieces() -> None:
    s = DotStuffer()
    out = s.feed(b".x\r") + s.feed(b"\n.") + s.feed(b"y\r") + s.end()
    assert out == b"..x\r\n..y\r\n.\r\n"
    assert s.feed(b".again") + s.end() == b"..again\r\n.\r\n"  # ready for the next message


def fed_in_pieces(stuffer: DotStuffer, message: bytes, cuts: list[int]) -> bytes:
    """What `stuffer` makes of `message` fed in pieces of the sizes in `cuts` (then the rest)."""
    out = []
    pos = 0
    for size in [*cuts, len(message)]:
        out.append(stuffer.feed(message[pos : pos + size]))
        pos += size
    return b"".join(out)


def normalized(message: bytes) -> bytes:
    text = message.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    return text if not text or text.endswith(b"\r\n") else text + b"\r\n"


@settings(max_examples=300, deadline=None)
@given(
    parts=st.lists(st.sampled_from([*PIECES, b"\r\n..\r\n", b".\r"]), max_size=40),
    cuts=st.lists(st.integers(min_value=1, max_value=40), max_size=30),
)
def test_stuffed_messages_read_back_exactly(parts: list[bytes], cuts: list[int]) -> None:
    message = b"".join(parts)
    stuffer = DotStuffer()
    data = fed_in_pieces(stuffer, message, cuts) + stuffer.end()
    assert data == dot_stuff(message) + END_OF_DATA
    reader = DataReader(check_lines=False)  # strict: a stuffer never sends bare line ends
    got = reader.feed(data + b"NEXT")
    assert reader.done and reader.problem is None and reader.leftover == b"NEXT"
    assert got == normalized(message)


@settings(max_examples=300, deadline=None)
@given(
    parts=st.lists(st.sampled_from([*PIECES, b"\r\n..\r\n", b".\r"]), max_size=40),
    cuts=st.lists(st.integers(min_value=1, max_value=40), max_size=30),
)
def test_bdat_content_is_what_data_delivers(parts: list[bytes], cuts: list[int]) -> None:
    """dots=False (BDAT, RFC 3030): no stuffing, and the octets a DATA receiver
    stores after unstuffing, whatever the pieces."""
    message = b"".join(parts)
    lines = DotStuffer(dots=False)
    assert fed_in_pieces(lines, message, cuts) + lines.close() == normalized(message)
    assert lines.feed(b".again") + lines.close() == b".again\r\n"  # ready for the next


@settings(max_examples=200, deadline=None)
@given(
    parts=st.lists(st.sampled_from([*PIECES, b"x" * 1200, b"Subject: " + b"y " * 700]),
                   max_size=12),
    cuts=st.lists(st.integers(min_value=1, max_value=700), max_size=30),
)
def test_data_and_bdat_with_max_line_send_no_long_line(parts: list[bytes], cuts: list[int]) -> None:
    """What DATA delivers and what BDAT sends are the same octets, every line of
    them at most 998 octets before its CRLF, whatever the pieces."""
    message = b"".join(parts)
    stuffer = DotStuffer(max_line=MAX_CONTENT_LINE)
    data = fed_in_pieces(stuffer, message, cuts) + stuffer.end()
    reader = DataReader()  # checks lines: a long one would be LONG_LINE
    got = reader.feed(data + b"NEXT")
    assert reader.done and reader.problem is None and reader.leftover == b"NEXT"
    lines = DotStuffer(dots=False, max_line=MAX_CONTENT_LINE)
    assert fed_in_pieces(lines, message, cuts) + lines.close() == got
    assert got == folded(normalized(message), MAX_CONTENT_LINE)


@settings(max_examples=200, deadline=None)
@given(
    parts=st.lists(st.sampled_from([*PIECES, b"\r\n..\r\n", b".\r"]), max_size=40),
    cuts=st.lists(st.integers(min_value=1, max_value=40), max_size=30),
)
def test_crlf_vouch_changes_nothing_for_crlf_content(parts: list[bytes], cuts: list[int]) -> None:
    """The POP3 core's shortcut (`crlf=True` for a file known to hold no bare CR or
    LF) gives the octets the full check gives."""
    message = normalized(b"".join(parts))
    plain, vouched = DotStuffer(), DotStuffer()
    out, pos = [b"", b""], 0
    for size in [*cuts, len(message)]:
        out[0] += plain.feed(message[pos : pos + size])
        out[1] += vouched.feed(message[pos : pos + size], crlf=True)
        pos += size
    assert out[0] + plain.end() == out[1] + vouched.end()
