"""The SMTP client core's message content, and the client core against postroom's server core.

Content must reach the server exactly: every line end CRLF, every leading dot
doubled on the wire and removed again by the receiver, a final CRLF added when
missing, whatever the chunks the message was read in.
"""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st
from test_smtp_server_driver import HOST, Driver, accept

from postroom.protocol.lines import END_OF_DATA, DataReader, dot_stuff
from postroom.protocol.replies import Reply
from postroom.protocol.smtp_client import (
    DATA,
    END_DATA,
    MAIL,
    NEED_DATA,
    RCPT,
    ConnectionClosed,
    Response,
    SMTPClient,
    State,
)
from postroom.protocol.smtp_server import (
    DataStart,
    Event,
    MailFrom,
    MessageData,
    MessageEnd,
    RcptTo,
)


def in_data() -> SMTPClient:
    """A client whose DATA was just accepted (no pipelining needed)."""
    client = SMTPClient()
    client.receive_data(b"220 mx\r\n")
    client.next_event()
    client.ehlo("relay.example")
    client.receive_data(b"250 mx\r\n")
    client.next_event()
    client.mail("a@x.example")
    client.receive_data(b"250 ok\r\n")
    client.next_event()
    client.rcpt("b@y.example")
    client.receive_data(b"250 ok\r\n")
    client.next_event()
    client.data()
    client.receive_data(b"354 go\r\n")
    client.next_event()
    client.data_to_send()
    return client


def framed(chunks: list[bytes]) -> bytes:
    client = in_data()
    out = bytearray()
    for chunk in chunks:
        client.send_data(chunk)
        out += client.data_to_send()
    client.end_data()
    out += client.data_to_send()
    return bytes(out)


def reference(message: bytes) -> bytes:
    """RFC 5321 4.5.2 line by line: CRLF line ends, a dot before leading dots, ".CRLF"."""
    text = message.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    lines = text.split(b"\n")
    if lines[-1] == b"":
        lines.pop()  # the message ended with a line end
    out = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)
    return out + END_OF_DATA


def test_leading_dots_are_doubled() -> None:
    message = b".\r\n..two\r\n.x\r\nmiddle . dot\r\n.\r\n"
    assert framed([message]) == b"..\r\n...two\r\n..x\r\nmiddle . dot\r\n..\r\n.\r\n"


def test_message_without_final_crlf_gets_one() -> None:
    assert framed([b"Subject: x\r\n\r\nno end"]) == b"Subject: x\r\n\r\nno end\r\n.\r\n"
    assert framed([b""]) == b".\r\n"
    assert framed([]) == b".\r\n"


def test_bare_line_ends_become_crlf() -> None:
    # Stored messages may use LF; a bare LF or CR is never sent (SMTP smuggling).
    assert framed([b"a\nb\rc\r\n.d\n"]) == b"a\r\nb\r\nc\r\n..d\r\n.\r\n"
    assert framed([b"a\n.\nb"]) == b"a\r\n..\r\nb\r\n.\r\n"  # no early end of data


def test_chunk_boundaries_inside_crlf_and_before_dots() -> None:
    assert framed([b"a\r", b"\n.b\r", b"\n", b".", b"c"]) == b"a\r\n..b\r\n..c\r\n.\r\n"
    assert framed([b"ends with CR\r"]) == b"ends with CR\r\n.\r\n"


@settings(max_examples=300, deadline=None)
@given(
    message=st.lists(
        st.sampled_from([b"a", b".", b"\r", b"\n", b"\r\n", b"..", b"x y", b"\xe9"]),
        max_size=40,
    ).map(b"".join),
    seed=st.integers(0, 2**32 - 1),
)
def test_framing_does_not_depend_on_chunks(message: bytes, seed: int) -> None:
    rng = random.Random(seed)
    cuts = sorted(rng.randint(0, len(message)) for _ in range(rng.randint(0, 6)))
    chunks = [message[a:b] for a, b in zip([0, *cuts], [*cuts, len(message)], strict=True)]
    wire = framed(chunks)
    assert wire == reference(message) == dot_stuff(message) + END_OF_DATA
    # What a receiver reads back is the message with CRLF line ends (and a
    # final CRLF), and the end of data is found exactly at the end.
    reader = DataReader()
    content = reader.feed(wire)
    assert reader.done and reader.leftover == b"" and reader.problem is None
    expected = message.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    if expected and not expected.endswith(b"\r\n"):
        expected += b"\r\n"
    assert content == expected


def test_five_megabytes_in_chunks_stay_exact() -> None:
    line = b".starts with a dot and is long enough " * 2 + b"\n"
    message = line * (5 * 1024 * 1024 // len(line))
    chunk = 65536
    wire = framed([message[i : i + chunk] for i in range(0, len(message), chunk)])
    assert wire == dot_stuff(message) + END_OF_DATA
    assert wire.count(b"\r\n..starts") == message.count(b"\n") - 1


# --- Against postroom's server core ---------------------------------------------


class Pair:
    """A client core wired to a server core (test_smtp_server_driver.Driver), in memory."""

    def __init__(self, **config: object) -> None:
        self.driver = Driver(**config)  # type: ignore[arg-type]
        self.client = SMTPClient()
        self.client.receive_data(self.driver.banner)

    def flush(self) -> None:
        """Carry bytes both ways until neither side has more to say."""
        while True:
            out = self.client.data_to_send()
            if not out:
                return
            self.driver.feed(out)
            self.client.receive_data(bytes(self.driver.out))
            self.driver.out.clear()

    def responses(self) -> list[Response]:
        self.flush()
        got: list[Response] = []
        while True:
            event = self.client.next_event()
            if event is NEED_DATA or isinstance(event, ConnectionClosed):
                return got
            assert isinstance(event, Response)
            got.append(event)

    def server_events(self, kind: type[Event]) -> list[Event]:
        return [e for e in self.driver.events if isinstance(e, kind)]


def refuse_some(event: Event) -> Reply | None:
    if isinstance(event, RcptTo) and event.address.startswith("nobody"):
        return Reply(550, "5.1.1", "no such user")
    return accept(event)


def test_pipelined_transaction_against_the_server_core() -> None:
    pair = Pair(answer=refuse_some)
    (greeting,) = pair.responses()
    assert greeting.reply.text.startswith(HOST)
    pair.client.ehlo("relay.example")
    pair.responses()
    ext = pair.client.extensions
    assert ext.pipelining and ext.dsn and ext.smtputf8 and ext.chunking
    assert ext.enhanced_status_codes and ext.size_limit is not None
    message = b"Subject: t\n\n.dot\nno final newline"
    client = pair.client
    client.mail("a@x.example", size=len(message), ret="HDRS", envid="Q+1 x", body="8BITMIME")
    client.rcpt("b@y.example", notify=("SUCCESS", "DELAY"), orcpt="rfc822;B+x@Y.example")
    client.rcpt("nobody@y.example")
    client.rcpt("c@y.example", orcpt="rfc822;jös@y.example")
    client.data()
    got = pair.responses()
    assert [(r.command, r.reply.code) for r in got] == [
        (MAIL, 250), (RCPT, 250), (RCPT, 550), (RCPT, 250), (DATA, 354)
    ]
    assert got[2].reply == Reply(550, "5.1.1", "no such user")
    client.send_data(message)
    client.end_data()
    (end,) = pair.responses()
    assert end.command == END_DATA and end.reply.code == 250 and client.state is State.READY
    (mail,) = pair.server_events(MailFrom)
    assert isinstance(mail, MailFrom)
    assert (mail.address, mail.size, mail.ret, mail.envid, mail.body) == (
        "a@x.example", len(message), "HDRS", "Q+1 x", "8BITMIME"
    )
    rcpts = pair.server_events(RcptTo)
    assert [(r.address, r.notify, r.orcpt) for r in rcpts] == [
        ("b@y.example", ("SUCCESS", "DELAY"), "rfc822;B+x@Y.example"),
        ("nobody@y.example", None, None),
        ("c@y.example", None, "utf-8;jös@y.example"),
    ]
    content = b"".join(e.data for e in pair.server_events(MessageData))
    assert content == b"Subject: t\r\n\r\n.dot\r\nno final newline\r\n"
    (end_event,) = pair.server_events(MessageEnd)
    assert end_event.size == len(content)


def test_utf8_and_chunking_against_the_server_core() -> None:
    pair = Pair()
    pair.responses()
    client = pair.client
    client.ehlo("relay.example")
    pair.responses()
    client.mail("jös@bücher.example", smtputf8=True)
    client.rcpt("ünï@y.example")
    client.bdat(b"Subject: \xc3\xa9\r\n\r\n")
    client.bdat(b".raw\r\n", last=True)
    got = pair.responses()
    assert [r.reply.code for r in got] == [250, 250, 250, 250]
    (mail,) = pair.server_events(MailFrom)
    assert mail.smtputf8
    assert pair.server_events(DataStart) == [DataStart(chunking=True)]
    content = b"".join(e.data for e in pair.server_events(MessageData))
    assert content == b"Subject: \xc3\xa9\r\n\r\n.raw\r\n"


def test_lockstep_when_the_server_offers_no_pipelining() -> None:
    pair = Pair(pipelining=False, dsn=False)
    pair.responses()
    client = pair.client
    client.ehlo("relay.example")
    pair.responses()
    assert not client.extensions.pipelining and not client.extensions.dsn
    client.mail("a@x.example")
    assert pair.responses()[0].reply.code == 250
    client.rcpt("b@y.example")
    assert pair.responses()[0].reply.code == 250
    client.data()
    assert pair.responses()[0].reply.code == 354
    client.send_data(b"hi")
    client.end_data()
    assert pair.responses()[0].reply.code == 250
    client.rset()
    assert pair.responses()[0].reply.code == 250
    client.quit()
    assert pair.responses()[0].reply.code == 221
    assert client.closing and pair.driver.server.closing
