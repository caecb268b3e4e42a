"""The SMTP server core's message content: DATA framing, dots, BDAT, sizes, smuggling."""

from __future__ import annotations

import pytest
from test_smtp_server_driver import HOST, Driver, accept, content, kinds, merged

from postroom.protocol.header_limits import MAX_HEADER_SECTION
from postroom.protocol.lines import MAX_MESSAGE_LINE
from postroom.protocol.replies import Reply
from postroom.protocol.smtp_server import (
    ConnectionClosed,
    DataStart,
    Event,
    MailFrom,
    MessageAborted,
    MessageData,
    MessageEnd,
    RcptTo,
    Reset,
    State,
)

ENVELOPE = b"EHLO client.example\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n"
TOO_BIG = "552 5.3.4 Message size exceeds fixed maximum message size"
BARE_LF = "554 5.5.2 Message refused: bare <LF> received; lines end with <CR><LF>"
BARE_CR = "554 5.5.2 Message refused: bare <CR> received; lines end with <CR><LF>"
LONG_LINE = f"554 5.6.0 Message refused: a line is longer than {MAX_MESSAGE_LINE} octets"


def ready(**config: object) -> Driver:
    """After EHLO, MAIL and one RCPT, all accepted."""
    d = Driver(**config)
    d.feed(ENVELOPE)
    d.replies()
    d.events.clear()
    return d


def send_data(body: bytes, **config: object) -> tuple[Driver, list[Event]]:
    d = ready(**config)
    return d, d.feed(b"DATA\r\n" + body)


# --- DATA -----------------------------------------------------------------------


def test_message_through_data() -> None:
    d, events = send_data(b"Subject: hi\r\n\r\nHello\r\n.\r\n")
    assert events == [
        DataStart(chunking=False),
        MessageData(b"Subject: hi\r\n\r\nHello\r\n"),
        MessageEnd(size=22),
    ]
    assert d.replies() == ["354 End data with <CR><LF>.<CR><LF>", "250 2.0.0 Ok: queued as Q1"]
    assert d.server.state is State.READY


def test_empty_message() -> None:
    # The CRLF before the dot is the one that ended the DATA command.
    d, events = send_data(b".\r\n")
    assert events == [DataStart(chunking=False), MessageEnd(size=0)]


def test_last_line_without_crlf_does_not_end_the_message() -> None:
    d, events = send_data(b"body.\r\n")
    assert kinds(events) == ["DataStart", "MessageData"]  # "body." is a line, not an end
    events = d.feed(b"more\r\n.\r\n")
    assert content(d.events) == b"body.\r\nmore\r\n"
    assert kinds(events)[-1] == "MessageEnd"


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (b"..\r\n", b".\r\n"),
        (b"...\r\n", b"..\r\n"),
        (b"..x\r\n", b".x\r\n"),
        (b".x\r\n", b"x\r\n"),  # RFC 5321 4.5.2: the first dot goes whenever others follow
        (b"a\r\n..\r\nb\r\n", b"a\r\n.\r\nb\r\n"),
        (b"a.\r\n.b\r\n", b"a.\r\nb\r\n"),
        (b". \r\n", b" \r\n"),
        (b"\r\n\r\n", b"\r\n\r\n"),
        (b"x..y\r\n", b"x..y\r\n"),
        (b"..\r\n..\r\n..\r\n", b".\r\n.\r\n.\r\n"),
    ],
)
def test_dot_unstuffing(wire: bytes, message: bytes) -> None:
    for step in (len(wire) + 3, 1, 2):
        d = ready()
        d.feed(b"DATA\r\n")
        data = wire + b".\r\n"
        for i in range(0, len(data), step):
            d.feed(data[i : i + step])
        assert content(d.events) == message
        assert kinds(d.events)[-1] == "MessageEnd"


def test_pipelined_envelope_and_data() -> None:
    # RFC 2920: MAIL, RCPT, RCPT, DATA in one packet; the content and the next
    # transaction in the next one.
    d = Driver()
    events = d.feed(
        b"EHLO c.example\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n"
        b"RCPT TO:<c@example.net>\r\nDATA\r\n"
    )
    assert kinds(events) == ["Hello", "MailFrom", "RcptTo", "RcptTo", "DataStart"]
    events = d.feed(
        b"one\r\n.\r\nMAIL FROM:<x@example.org>\r\nRCPT TO:<y@example.net>\r\nDATA\r\n"
        b"two\r\n.\r\nQUIT\r\n"
    )
    assert kinds(events) == [
        "MessageData", "MessageEnd", "MailFrom", "RcptTo", "DataStart",
        "MessageData", "MessageEnd", "Quit", "ConnectionClosed",
    ]
    assert content(events) == b"one\r\ntwo\r\n"
    codes = [r[:3] for r in d.replies()]
    assert codes == ["250", "250", "250", "250", "354", "250", "250", "250", "354", "250", "221"]


def test_data_refused_by_the_app_reads_commands_again() -> None:
    def answer(e: Event) -> Reply | None:
        return Reply(451, "4.3.0", "Try later") if isinstance(e, DataStart) else accept(e)

    d = ready()
    d.answer = answer
    assert kinds(d.feed(b"DATA\r\nNOOP\r\n")) == ["DataStart"]
    assert d.replies() == ["451 4.3.0 Try later", "250 2.0.0 OK"]
    assert d.server.state is State.RCPT


def test_refused_message_ends_the_transaction() -> None:
    def answer(e: Event) -> Reply | None:
        if isinstance(e, MessageEnd):
            return Reply(554, "5.7.1", "Spam")
        return accept(e)

    d = ready()
    d.answer = answer
    d.feed(b"DATA\r\nx\r\n.\r\nRCPT TO:<c@example.net>\r\n")
    assert d.replies()[1:] == ["554 5.7.1 Spam", "503 5.5.1 Send MAIL first"]


# --- Bare line ends and SMTP smuggling -------------------------------------------

SMUGGLED = b"MAIL FROM:<admin@bank.example>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\nforged\r\n"
# Ends of data that some receiver somewhere accepted; none of them is one here.
FAKE_ENDS = [b"\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\n", b"\r\n.\r", b"\r.\r", b"\n.\r"]


@pytest.mark.parametrize("fake_end", FAKE_ENDS)
def test_smuggled_commands_are_never_run_in_reject_mode(fake_end: bytes) -> None:
    d = ready()
    events = d.feed(b"DATA\r\nSubject: x\r\n\r\nbody" + fake_end + SMUGGLED + b"\r\n.\r\nNOOP\r\n")
    assert kinds(merged(events, drop_aborted_data=True)) == ["DataStart", "MessageAborted"]
    aborted = events[-1]
    assert isinstance(aborted, MessageAborted)
    assert str(aborted.reply) in (BARE_LF, BARE_CR)
    assert d.replies()[1:] == [str(aborted.reply), "250 2.0.0 OK"]
    assert not any(isinstance(e, MailFrom | RcptTo) for e in d.events)


@pytest.mark.parametrize("fake_end", FAKE_ENDS)
def test_smuggled_commands_stay_content_in_normalize_mode(fake_end: bytes) -> None:
    for step in (10_000, 1, 7):
        d = ready(bare_newline="normalize")
        wire = b"DATA\r\nbody" + fake_end + SMUGGLED + b"\r\n.\r\n"
        for i in range(0, len(wire), step):
            d.feed(wire[i : i + step])
        assert kinds(merged(d.events)) == ["DataStart", "MessageData", "MessageEnd"]
        text = content(d.events)
        assert b"MAIL FROM:<admin@bank.example>\r\n" in text  # content, never a command
        assert b"\n" not in text.replace(b"\r\n", b"") and b"\r" not in text.replace(b"\r\n", b"")


def test_bare_lf_and_bare_cr_are_named() -> None:
    _, events = send_data(b"a\nb\r\n.\r\n")
    assert str(events[-1].reply) == BARE_LF  # type: ignore[attr-defined]
    _, events = send_data(b"a\rb\r\n.\r\n")
    assert str(events[-1].reply) == BARE_CR  # type: ignore[attr-defined]


def test_normalize_mode_turns_bare_line_ends_into_crlf() -> None:
    _, events = send_data(b"a\nb\rc\r\n..d\n.\r\nend\r\n.\r\n", bare_newline="normalize")
    # The ".CRLF" after a bare LF is a line of content, not the end.
    assert content(events) == b"a\r\nb\r\nc\r\n.d\r\n.\r\nend\r\n"
    assert kinds(events)[-1] == "MessageEnd"


# --- Line length and size --------------------------------------------------------


LONGEST = b"x" * (MAX_MESSAGE_LINE - 2) + b"\r\n"  # the longest line accepted


def by_data(message: bytes, piece: int) -> list[bytes]:
    wire = b"DATA\r\n" + message + b".\r\n"
    return [wire[i : i + piece] for i in range(0, len(wire), piece)]


def by_bdat(message: bytes, piece: int) -> list[bytes]:
    chunks = [message[i : i + piece] for i in range(0, len(message), piece)]
    return [b"BDAT %d%s\r\n" % (len(c), b" LAST" if i == len(chunks) - 1 else b"") + c
            for i, c in enumerate(chunks)]


SENDERS = {"DATA": by_data, "BDAT": by_bdat}


@pytest.mark.parametrize("command", SENDERS)
@pytest.mark.parametrize("piece", [65536, 999])
def test_long_lines_are_taken_up_to_the_named_limit(command: str, piece: int) -> None:
    # Lines past RFC 5322's 998 octets are real mail (Postfix takes them); DATA and
    # BDAT take them alike, up to MAX_MESSAGE_LINE octets with the line end.
    message = b"Subject: wide\r\n\r\n" + b"y" * 999 + b"\r\n" + LONGEST + b"end\r\n"
    d = ready()
    for part in SENDERS[command](message, piece):
        d.feed(part)
    assert kinds(d.events)[-1] == "MessageEnd"
    assert content(d.events) == message
    assert d.replies()[-1] == "250 2.0.0 Ok: queued as Q1"


@pytest.mark.parametrize("command", SENDERS)
@pytest.mark.parametrize("piece", [65536, 999])
def test_a_line_past_the_limit_is_refused_alike_by_data_and_bdat(
    command: str, piece: int
) -> None:
    head = b"Subject: wider\r\n\r\nok\r\n"
    message = head + b"z" + LONGEST + b"more\r\n" * 300
    d = ready()
    for part in SENDERS[command](message, piece):
        d.feed(part)
    d.feed(b"NOOP\r\n")
    assert isinstance(d.events[-1], MessageAborted) and str(d.events[-1].reply) == LONG_LINE
    replies = d.replies()
    after = replies[replies.index(LONG_LINE) + 1 :]
    # BDAT: the chunks the client pipelined after the refused one fail too (RFC 3030 3).
    assert set(after[:-1]) <= {"503 5.5.1 Send MAIL first"} and after[-1] == "250 2.0.0 OK"
    # Nothing past the limit is handed out.
    assert len(content(d.events)) <= len(head) + MAX_MESSAGE_LINE


def test_bdat_chunks_after_a_refused_line_are_read_and_refused() -> None:
    # RFC 3030 3: the transaction failed at the chunk with the long line; what the
    # client pipelined after it is consumed, never read as commands.
    d = ready()
    d.feed(b"BDAT %d\r\n" % len(LONGEST + b"z") + b"z" + LONGEST + b"BDAT 6 LAST\r\nRSET\r\n")
    assert d.replies() == [LONG_LINE, "503 5.5.1 Send MAIL first"]


HEADER_TOO_BIG = "552 5.3.4 Message header section exceeds fixed maximum size"
TOO_MANY_FIELDS = "554 5.6.0 Message refused: too many header fields"
FOLDED_MEGABYTE = b"X-Big: start\r\n" + b" folded text on a continuation line\r\n" * 30_000
TEN_THOUSAND_FIELDS = b"".join(b"X%d:y\r\n" % i for i in range(10_000))


@pytest.mark.parametrize("command", SENDERS)
@pytest.mark.parametrize(
    ("header", "reply"),
    [(FOLDED_MEGABYTE, HEADER_TOO_BIG), (TEN_THOUSAND_FIELDS, TOO_MANY_FIELDS)],
    ids=["folded-megabyte", "ten-thousand-fields"],
)
def test_header_section_limits(command: str, header: bytes, reply: str) -> None:
    # As Postfix's header_size_limit, and a field count: refused at the end of the
    # data (BDAT: of the chunk), and nothing past the limit handed out.
    message = b"Subject: flood\r\n" + header + b"\r\nbody\r\n"
    d = ready()
    for part in SENDERS[command](message, 256 * 1024):
        d.feed(part)
    d.feed(b"NOOP\r\n")
    assert isinstance(d.events[-1], MessageAborted) and str(d.events[-1].reply) == reply
    replies = d.replies()
    assert reply in replies and replies[-1] == "250 2.0.0 OK"
    assert len(content(d.events)) <= MAX_HEADER_SECTION


def test_header_section_within_the_limits_and_a_headerless_body() -> None:
    # 1000 fields, or a body with no header fields at all (as Postfix reads it).
    for message in (b"".join(b"X%d:y\r\n" % i for i in range(1000)) + b"\r\nbody\r\n",
                    b"no header here\r\n" * 20_000):
        d = ready()
        for part in by_data(message, 65536):
            d.feed(part)
        assert kinds(d.events)[-1] == "MessageEnd" and content(d.events) == message


def test_message_over_the_size_limit_is_read_to_its_end_and_refused() -> None:
    d = ready(max_message_size=1000)
    d.feed(b"DATA\r\n")
    for _ in range(30):
        d.feed(b"z" * 98 + b"\r\n")
    events = d.feed(b".\r\nNOOP\r\n")
    assert len(content(d.events)) <= 1000  # nothing past the limit is handed out
    assert isinstance(events[-1], MessageAborted) and str(events[-1].reply) == TOO_BIG
    assert d.replies()[-2:] == [TOO_BIG, "250 2.0.0 OK"]
    assert d.server.state is State.READY


def test_size_counts_content_after_unstuffing() -> None:
    # RFC 1870: the terminating dot and doubled dots do not count.
    _, events = send_data(b"..\r\n.\r\n", max_message_size=3)
    assert events[-1] == MessageEnd(size=3)


def test_fifty_mebibytes_stream_through_in_small_pieces() -> None:
    line = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod.\r\n"
    piece = line * (65536 // len(line))
    total = 50 * 1024 * 1024
    d = ready(max_message_size=0)
    d.feed(b"DATA\r\n")
    sent = received = largest = held = 0
    while sent < total:
        for event in d.feed(piece):
            if isinstance(event, MessageData):
                received += len(event.data)
                largest = max(largest, len(event.data))
        held = max(held, d.server.bytes_buffered)
        sent += len(piece)
        d.events.clear()
    events = d.feed(b".\r\n")
    assert kinds(events) == ["MessageEnd"]
    assert received == sent and events[0] == MessageEnd(size=sent)
    assert largest <= len(piece)  # one event per piece, never the message
    assert held < 1000  # at most a partial line stays behind


# --- BDAT (RFC 3030) -------------------------------------------------------------


def test_bdat_chunks() -> None:
    d = ready()
    events = d.feed(b"BDAT 5\r\nhel\nlBDAT 3 LAST\r\n.\r\n")
    assert merged(events) == [
        DataStart(chunking=True),
        MessageData(b"hel\nl.\r\n"),  # raw octets: no dots, no line-end checks
        MessageEnd(size=8),
    ]
    assert d.replies() == ["250 2.0.0 5 octets received", "250 2.0.0 Ok: queued as Q1"]


def test_bdat_zero_last_and_byte_at_a_time() -> None:
    wire = b"BDAT 4\r\n\x00\xff\r\nBDAT 0 LAST\r\nNOOP\r\n"
    d = ready()
    for i in range(len(wire)):
        d.feed(wire[i : i + 1])
    assert merged(d.events) == [
        DataStart(chunking=True),
        MessageData(b"\x00\xff\r\n"),
        MessageEnd(size=4),
    ]
    assert d.replies() == ["250 2.0.0 4 octets received", "250 2.0.0 Ok: queued as Q1",
                           "250 2.0.0 OK"]


def test_bdat_without_transaction_is_consumed_and_refused() -> None:
    # RFC 3030 3: the chunk is read anyway, so its octets are never commands.
    d = Driver()
    d.feed(b"EHLO c.example\r\nBDAT 6\r\nQUIT\r\nNOOP\r\n")
    assert d.replies()[1:] == ["503 5.5.1 Send MAIL first", "250 2.0.0 OK"]
    assert not d.server.closing
    d.feed(b"MAIL FROM:<a@example.org>\r\nBDAT 6 LAST\r\nQUIT\r\n")
    assert d.replies()[1:] == ["554 5.5.1 No valid recipients"]
    assert not any(isinstance(e, DataStart) for e in d.events)


def test_data_after_bdat_and_rcpt_after_bdat() -> None:
    d = ready()
    d.feed(b"BDAT 1\r\nxDATA\r\nRCPT TO:<c@example.net>\r\nBDAT 1 LAST\r\ny")
    assert d.replies() == [
        "250 2.0.0 1 octets received",
        "503 5.5.1 DATA cannot follow BDAT (RFC 3030 2)",
        "503 5.5.1 RCPT cannot follow BDAT",
        "250 2.0.0 Ok: queued as Q1",
    ]
    assert content(d.events) == b"xy"


@pytest.mark.parametrize("line", [b"BDAT", b"BDAT x", b"BDAT 1 NOW", b"BDAT -1", b"BDAT 1 LAST x",
                                  b"BDAT " + b"9" * 21])
def test_bdat_syntax_errors(line: bytes) -> None:
    d = ready()
    d.feed(line + b"\r\n")
    assert d.replies() == ["501 5.5.4 Syntax: BDAT size [LAST]"]


def test_bdat_without_chunking() -> None:
    d = ready(chunking=False)
    d.feed(b"BDAT 1 LAST\r\n")
    assert d.replies() == ["502 5.5.1 BDAT not available"]


def test_bdat_over_the_size_limit_fails_the_transaction() -> None:
    d = ready(max_message_size=10)
    d.feed(b"BDAT 8\r\n12345678BDAT 8\r\nabcdefghBDAT 2 LAST\r\nxyNOOP\r\n")
    assert d.replies() == [
        "250 2.0.0 8 octets received",
        TOO_BIG,
        "503 5.5.1 Send MAIL first",  # RFC 3030 3: later chunks are read and discarded
        "250 2.0.0 OK",
    ]
    assert kinds(merged(d.events)) == ["DataStart", "MessageData", "MessageAborted"]
    assert content(d.events) == b"12345678"


def test_rset_between_chunks_aborts_the_message() -> None:
    d = ready()
    events = d.feed(b"BDAT 2\r\nabRSET\r\n")
    assert kinds(events) == ["DataStart", "MessageData", "MessageAborted", "Reset"]
    assert d.replies() == ["250 2.0.0 2 octets received", "250 2.0.0 OK"]


# --- Sessions that end inside a message ------------------------------------------


def test_eof_inside_data() -> None:
    d, _ = send_data(b"half a mess")
    events = d.eof()
    assert kinds(events) == ["MessageAborted", "ConnectionClosed"]
    assert events[0].reply.code == 421  # type: ignore[attr-defined]


def test_eof_inside_a_bdat_chunk() -> None:
    d = ready()
    d.feed(b"BDAT 100 LAST\r\nabc")
    assert kinds(d.eof()) == ["MessageAborted", "ConnectionClosed"]


def test_timeout_inside_data() -> None:
    d, _ = send_data(b"part\r\n")
    d.server.timeout()
    assert kinds(d.pump()) == ["MessageAborted", "ConnectionClosed"]
    assert d.replies()[-1] == f"421 4.4.2 {HOST} Error: timeout exceeded"


def test_shutdown_while_message_end_awaits_its_answer() -> None:
    d = ready()
    d.answer = lambda e: None if isinstance(e, MessageEnd) else accept(e)
    assert kinds(d.feed(b"DATA\r\nx\r\n.\r\n"))[-1] == "MessageEnd"
    d.server.shutdown(f"{HOST} Service shutting down")
    # The client never heard 250: the message must not be delivered.
    assert kinds(d.pump()) == ["MessageAborted", "ConnectionClosed"]


def test_quit_between_chunks() -> None:
    d = ready()
    assert kinds(d.feed(b"BDAT 1\r\nxQUIT\r\n")) == [
        "DataStart", "MessageData", "MessageAborted", "Quit", "ConnectionClosed",
    ]


def test_each_message_settles_exactly_once() -> None:
    # After DataStart: one MessageEnd or one MessageAborted, never both, never none.
    d = ready()
    d.feed(b"DATA\r\na\r\n.\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n"
           b"BDAT 1\r\nxRSET\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n"
           b"DATA\r\nbad\nline\r\n.\r\n")
    d.eof()
    ends = [type(e) for e in d.events if isinstance(e, DataStart | MessageEnd | MessageAborted)]
    assert ends == [DataStart, MessageEnd, DataStart, MessageAborted, DataStart, MessageAborted]
    assert isinstance(d.events[-1], ConnectionClosed)
    assert Reset() in d.events
