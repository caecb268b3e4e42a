"""SMTP replies: the one encoder (what the server core writes) and the one parser (what
the client core reads), RFC 5321 4.2 both ways."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postroom.protocol._core import RemoteProtocolError
from postroom.protocol.replies import (
    MAX_REPLY_LINE,
    MAX_REPLY_LINE_ACCEPTED,
    MAX_REPLY_OCTETS,
    Reply,
    ReplyParser,
    encode_reply,
    parse_reply,
)

# --- Encoding ------------------------------------------------------------------


def test_reply_wire_form() -> None:
    assert Reply(250, "2.0.0", "OK").to_bytes() == b"250 2.0.0 OK\r\n"
    assert Reply(250, None, "mx\nPIPELINING\nSIZE").to_bytes() == (
        b"250-mx\r\n250-PIPELINING\r\n250 SIZE\r\n"
    )
    assert Reply(550, "5.1.1", "no\nsuch user").to_bytes() == (
        b"550-5.1.1 no\r\n550 5.1.1 such user\r\n"
    )


def test_empty_last_line_keeps_its_space() -> None:
    # RFC 5321 4.2: the last line is the code, SP, then optional text; RFC 4954 4
    # needs "334 " for an empty SASL challenge.
    assert Reply(334, None, "").to_bytes() == b"334 \r\n"
    assert Reply(250, None, "a\n").to_bytes() == b"250-a\r\n250 \r\n"


def test_long_line_is_cut_on_a_character_boundary() -> None:
    data = Reply(550, "5.7.1", "\u00e9" * 400).to_bytes()
    assert len(data) <= MAX_REPLY_LINE and data.endswith(b"\r\n")
    data.decode("utf-8")


def test_to_bytes_is_the_encoder() -> None:
    reply = Reply(421, "4.3.2", "mx.example closing", close=True)
    assert reply.to_bytes() == encode_reply(reply)


def test_a_reply_that_cannot_go_on_the_wire_is_refused() -> None:
    # A CR or LF would end the reply early (reply injection); RFC 3463 2: the enhanced
    # code's class is the reply code's.
    for reply in (Reply(250, None, "a\rb"), Reply(250, None, "a\x00"), Reply(550, "2.0.0", "x"),
                  Reply(250, "2.0", "x")):
        with pytest.raises(ValueError):
            encode_reply(reply)


TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x2FF, exclude_characters="\x7f"),
               max_size=80)


@given(st.sampled_from([220, 250, 334, 354, 421, 451, 550]), st.lists(TEXT, min_size=1, max_size=4))
def test_what_the_encoder_writes_the_parser_reads(code: int, lines: list[str]) -> None:
    reply = Reply(code, None, "\n".join(lines))
    assert parse_reply(encode_reply(reply)) == Reply(code, None, reply.text, close=code == 421)


# --- Reply parsing -----------------------------------------------------------


def test_single_and_multiline_replies() -> None:
    assert parse_reply(b"250 OK\r\n") == Reply(250, None, "OK")
    assert parse_reply(b"250-first\r\n250-second\r\n250 last\r\n") == Reply(
        250, None, "first\nsecond\nlast"
    )
    assert parse_reply(b"250\r\n") == Reply(250, None, "")  # RFC 5321 4.2: text is optional
    assert parse_reply(b"354 go ahead\n") == Reply(354, None, "go ahead")  # bare LF forgiven
    assert parse_reply(b"421 bye\r\n") == Reply(421, None, "bye", close=True)


def test_enhanced_codes_only_when_offered() -> None:
    data = b"550-5.1.1 no such user\r\n550 5.1.1 here\r\n"
    assert parse_reply(data) == Reply(550, None, "5.1.1 no such user\n5.1.1 here")
    assert parse_reply(data, enhanced=True) == Reply(550, "5.1.1", "no such user\nhere")


def test_enhanced_code_must_fit_the_reply() -> None:
    # RFC 3463 2: the class digit matches the reply's first digit.
    assert parse_reply(b"550 2.0.0 odd\r\n", enhanced=True) == Reply(550, None, "2.0.0 odd")
    # 3xx replies carry none; a 334 challenge is base64, never a code.
    assert parse_reply(b"334 VXNlcm5hbWU6\r\n", enhanced=True).enhanced is None
    # A line without the code keeps its text; a line with it loses it.
    reply = parse_reply(b"452-4.5.3 too many\r\n452 try later\r\n", enhanced=True)
    assert reply == Reply(452, "4.5.3", "too many\ntry later")
    assert parse_reply(b"250 2.0.0\r\n", enhanced=True) == Reply(250, "2.0.0", "")
    assert parse_reply(b"250 2.0.0x\r\n", enhanced=True) == Reply(250, None, "2.0.0x")


def test_reply_text_that_is_not_utf8_is_replaced() -> None:
    assert parse_reply(b"250 caf\xe9\r\n").text == "caf\ufffd"


@pytest.mark.parametrize(
    "data",
    [
        b"25 short\r\n",
        b"abc text\r\n",
        b"2500 text\r\n",
        b"250_text\r\n",
        b"150 informational\r\n",  # RFC 5321 4.2.1: 1yz is not used in SMTP
        b"650 no such class\r\n",
        b"\r\n",
        b"250-first\r\n251 other code\r\n",
        b"250 " + b"x" * MAX_REPLY_LINE_ACCEPTED + b"\r\n",
    ],
)
def test_malformed_replies_raise(data: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        parse_reply(data)


def test_huge_multiline_reply_is_refused() -> None:
    line = b"250-" + b"x" * 500 + b"\r\n"
    parser = ReplyParser()
    parser.feed(line * (MAX_REPLY_OCTETS // len(line) + 1))
    with pytest.raises(RemoteProtocolError, match="longer than"):
        parser.next_reply()


def test_parse_reply_wants_exactly_one() -> None:
    with pytest.raises(RemoteProtocolError, match="incomplete"):
        parse_reply(b"250-more to come\r\n")
    with pytest.raises(RemoteProtocolError, match="after"):
        parse_reply(b"250 one\r\n250 two\r\n")


def test_replies_split_anywhere_give_the_same_replies() -> None:
    data = b"220 hi\r\n250-a\r\n250 b\r\n550-5.1.1 x\r\n550 5.1.1 y\r\n354 go\n"
    whole = ReplyParser(enhanced=True)
    whole.feed(data)
    expected = []
    while (reply := whole.next_reply()) is not None:
        expected.append(reply)
    assert len(expected) == 4
    for cut in range(len(data) + 1):
        parser = ReplyParser(enhanced=True)
        got = []
        for piece in (data[:cut], data[cut:]):
            parser.feed(piece)
            while (reply := parser.next_reply()) is not None:
                got.append(reply)
        assert got == expected, cut
    parser = ReplyParser(enhanced=True)
    got = []
    for i in range(len(data)):
        parser.feed(data[i : i + 1])
        while (reply := parser.next_reply()) is not None:
            got.append(reply)
    assert got == expected and len(parser) == 0
