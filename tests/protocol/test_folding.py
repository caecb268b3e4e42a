"""Long lines folded or broken for a sender (RFC 5321 4.5.3.1.6, as Postfix's
smtp_line_length_limit): folding.LineFolder alone and behind lines.DotStuffer."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from postroom.protocol.folding import LineFolder
from postroom.protocol.lines import MAX_CONTENT_LINE, DotStuffer


def folded(message: bytes, limit: int, cuts: list[int] | None = None) -> bytes:
    """What a LineFolder makes of `message` fed in pieces (never one that ends
    between a CR and its LF, as DotStuffer feeds it)."""
    folder = LineFolder(limit)
    pos, out = 0, []
    for size in [*(cuts or []), len(message)]:
        end = pos + size
        if message[end - 1 : end] == b"\r":
            end += 1
        out.append(folder.feed(message[pos:end]))
        pos = end
    return b"".join(out) + folder.close()


def test_long_header_lines_fold_before_a_blank_else_break_with_a_space() -> None:
    message = (
        b"Subject: aaa bbb ccc ddd eee\r\n"
        b"X-Token: 0123456789abcdef\r\n"
        b"Short: ok\r\n"
        b"\r\n"
        b"body 0123456789abcdefghij\r\n"
        b"Not: a header in the body 0123456789\r\n"
    )
    assert folded(message, 10) == (
        b"Subject:\r\n aaa bbb\r\n ccc ddd\r\n eee\r\n"  # folds: unfolding restores it
        b"X-Token:\r\n 012345678\r\n 9abcdef\r\n"  # no blank in reach: CRLF SP
        b"Short: ok\r\n"
        b"\r\n"
        b"body 01234\r\n 56789abcd\r\n efghij\r\n"  # body lines break at the limit
        b"Not: a hea\r\n der in th\r\n e body 01\r\n 23456789\r\n"
    )


def test_lines_within_the_limit_pass_unchanged() -> None:
    line = b"x" * MAX_CONTENT_LINE
    message = b"Subject: " + line[9:] + b"\r\n\r\n" + line + b"\r\n" + line
    assert folded(message, MAX_CONTENT_LINE) == message
    assert folded(message + b"y", MAX_CONTENT_LINE).endswith(line + b"\r\n y")


def test_a_line_that_starts_with_a_period_has_one_octet_less() -> None:
    # Its transparency dot (RFC 5321 4.5.2) keeps it within 1000 octets on the wire.
    line = b"." + b"x" * (MAX_CONTENT_LINE - 1)
    assert folded(b"\r\n" + line + b"\r\n", MAX_CONTENT_LINE) == (
        b"\r\n" + line[:-1] + b"\r\n " + line[-1:] + b"\r\n"
    )
    stuffer = DotStuffer(max_line=MAX_CONTENT_LINE)
    wire = stuffer.feed(b"\r\n" + line) + stuffer.end()
    assert max(len(x) for x in wire.split(b"\r\n")) == MAX_CONTENT_LINE


def test_a_header_section_without_its_blank_line_ends_at_the_first_other_line() -> None:
    message = b"A: 1\r\nno header here but body text\r\n"
    assert folded(message, 10) == b"A: 1\r\nno header \r\n here but \r\n body text\r\n"


def test_forced_breaks_never_split_a_utf8_character() -> None:
    text = "äöü€ß".encode() * 3
    for out in (folded(b"S: " + text + b"\r\n", 10), folded(b"\r\n" + text, 10)):
        for line in out.split(b"\r\n"):
            assert len(line) <= 10
            line.decode("utf-8")  # each piece is whole characters


def test_latin1_octets_are_broken_at_the_limit() -> None:
    # Not UTF-8 (continuation octets without a lead): the break is exactly at the limit.
    assert folded(b"\r\n" + b"\xa0" * 12, 10) == b"\r\n" + b"\xa0" * 10 + b"\r\n " + b"\xa0" * 2


def test_the_folder_is_ready_for_the_next_message() -> None:
    folder = LineFolder(10)
    assert folder.feed(b"\r\nbody") + folder.close() == b"\r\nbody"
    assert folder.feed(b"Subject: aaa bbb") + folder.close() == b"Subject:\r\n aaa bbb"


def unfold(section: bytes) -> bytes:
    """RFC 5322 2.2.3: a CRLF followed by a blank is removed."""
    return re.sub(rb"\r\n(?=[ \t])", b"", section)


WORDS = [b"w", b"word", b"x" * 7, b" ", b"\t", b"\xc3\xa4", b"\xe2\x82\xac"]


@settings(max_examples=300, deadline=None)
@given(
    headers=st.lists(st.lists(st.sampled_from(WORDS), max_size=30), max_size=6),
    body=st.lists(st.sampled_from([b"a", b"bc" * 9, b"\r\n", b".", b"\xc3\xa4"]), max_size=60),
    cuts=st.lists(st.integers(min_value=1, max_value=40), max_size=30),
    limit=st.integers(min_value=3, max_value=20),
)
def test_folding_in_pieces(
    headers: list[list[bytes]], body: list[bytes], cuts: list[int], limit: int
) -> None:
    """Any split gives the same octets; no line is over the limit; unfolding gives
    the header section back but for the forced breaks' spaces; the body comes back
    when the breaks are taken out."""
    section = b"".join(b"X-H" + str(i).encode() + b": " + b"".join(words) + b"\r\n"
                       for i, words in enumerate(headers))
    content = b"".join(body)
    if content.startswith(b"\r\n"):
        content = b"." + content  # keep the body's first line out of the header section
    message = section + b"\r\n" + content
    whole = folded(message, limit)
    assert folded(message, limit, cuts) == whole
    assert all(len(line) <= limit - line.startswith(b".") for line in whole.split(b"\r\n"))
    head, sep, rest = whole.partition(b"\r\n\r\n") if section else (b"", b"", whole[2:])
    if section:
        assert sep
        fields = unfold(head + b"\r\n").split(b"\r\n")
        for got, words in zip(fields, headers, strict=False):
            # Each field's octets, in order; a forced break adds one space.
            assert got.replace(b" ", b"").replace(b"\t", b"") == (
                got[: got.index(b":") + 1] + b"".join(words)
            ).replace(b" ", b"").replace(b"\t", b"")
    assert rest.replace(b"\r\n ", b"") == content


