"""The milter client core: the packets each step sends, and the filter's answers as events.

The filter's side is written here byte by byte from the protocol's definition
(libmilter's mfdef.h), fed whole and one byte at a time.
"""

from __future__ import annotations

import struct

import pytest

from postroom.protocol import milter_wire as w
from postroom.protocol._core import LocalProtocolError
from postroom.protocol.milter_client import (
    NEED_DATA,
    AddHeader,
    AddRecipient,
    ChangeHeader,
    ChangeSender,
    DeleteRecipient,
    InsertHeader,
    MilterClient,
    MilterState,
    Negotiated,
    Progress,
    Quarantine,
    RemoteProtocolError,
    ReplaceBody,
    Verdict,
    header_field,
    header_value,
    parse_replycode,
)
from postroom.protocol.replies import Reply


def pkt(code: bytes, data: bytes = b"") -> bytes:
    return struct.pack("!I", len(data) + 1) + code + data


def optneg(actions: int = w.ALL_ACTIONS, protocol: int = 0, version: int = 6,
           macros: bytes = b"") -> bytes:
    return pkt(b"O", struct.pack("!III", version, actions, protocol) + macros)


def events(client: MilterClient, data: bytes, one_byte: bool = False) -> list[object]:
    out: list[object] = []
    pieces = [data[i:i + 1] for i in range(len(data))] if one_byte else [data]
    for piece in pieces:
        client.receive_data(piece)
        while (event := client.next_event()) is not NEED_DATA:
            out.append(event)
    return out


def negotiated(protocol: int = 0, actions: int = w.ALL_ACTIONS, macros: bytes = b"",
               ) -> MilterClient:
    client = MilterClient()
    client.negotiate()
    sent = client.data_to_send()
    assert sent == pkt(b"O", struct.pack("!III", 6, w.ALL_ACTIONS, w.OFFERED_PROTOCOL))
    got = events(client, optneg(actions, protocol, macros=macros))
    assert isinstance(got[0], Negotiated)
    return client


@pytest.mark.parametrize("one_byte", [False, True])
def test_a_whole_session_sends_each_step_and_reads_each_verdict(one_byte: bool) -> None:
    client = negotiated()
    assert client.connect("[192.0.2.1]", "192.0.2.1", 4321, {"j": "mx.example"})
    assert client.data_to_send() == (
        pkt(b"D", b"C" + b"j\0mx.example\0")
        + pkt(b"C", b"[192.0.2.1]\0" + b"4" + struct.pack("!H", 4321) + b"192.0.2.1\0"))
    assert events(client, pkt(b"c"), one_byte) == [Verdict("continue")]
    assert client.helo("client.example")
    assert client.data_to_send() == pkt(b"H", b"client.example\0")
    assert events(client, pkt(b"c"), one_byte) == [Verdict("continue")]
    assert client.mail("a@x.example", ["SIZE=10"], {"i": "Q1"})
    assert client.data_to_send() == pkt(b"D", b"Mi\0Q1\0") + pkt(b"M", b"<a@x.example>\0SIZE=10\0")
    assert events(client, pkt(b"c"), one_byte) == [Verdict("continue")]
    assert client.rcpt("b@y.example")
    assert client.data_to_send() == pkt(b"R", b"<b@y.example>\0")
    assert events(client, pkt(b"y", b"450 4.2.0 try later\0"), one_byte) == [
        Verdict("tempfail", Reply(450, "4.2.0", "try later"))]
    assert client.rcpt("c@y.example")
    client.data_to_send()
    assert events(client, pkt(b"c"), one_byte) == [Verdict("continue")]
    assert client.data()
    assert client.data_to_send() == pkt(b"T")
    assert events(client, pkt(b"c")) == [Verdict("continue")]
    assert client.header("Subject", "hi\n\tthere")
    assert client.data_to_send() == pkt(b"L", b"Subject\0hi\n\tthere\0")
    assert events(client, pkt(b"c")) == [Verdict("continue")]
    assert client.end_of_headers()
    client.data_to_send()
    assert events(client, pkt(b"c")) == [Verdict("continue")]
    assert client.body(b"body\r\n")
    assert client.data_to_send() == pkt(b"B", b"body\r\n")
    assert events(client, pkt(b"p") + pkt(b"c")) == [Progress(), Verdict("continue")]
    assert client.end_of_message()
    assert client.data_to_send() == pkt(b"E")
    answer = (pkt(b"h", b"X-Spam\0yes\0") + pkt(b"i", struct.pack("!I", 0) + b"X-First\0one\0")
              + pkt(b"m", struct.pack("!I", 1) + b"Subject\0\0") + pkt(b"b", b"new body\r\n")
              + pkt(b"+", b"<new@z.example>\0") + pkt(b"2", b"<par@z.example>\0NOTIFY=NEVER\0")
              + pkt(b"-", b"<b@y.example>\0") + pkt(b"e", b"<s@z.example>\0")
              + pkt(b"q", b"spam\0") + pkt(b"a"))
    assert events(client, answer, one_byte) == [
        AddHeader("X-Spam", "yes"), InsertHeader(0, "X-First", "one"),
        ChangeHeader(1, "Subject", ""), ReplaceBody(b"new body\r\n"),
        AddRecipient("new@z.example"), AddRecipient("par@z.example", "NOTIFY=NEVER"),
        DeleteRecipient("b@y.example"), ChangeSender("s@z.example"), Quarantine("spam"),
        Verdict("accept")]
    assert client.state is MilterState.CONNECTED
    client.quit()
    assert client.data_to_send() == pkt(b"Q")


def test_steps_the_filter_left_out_send_nothing_and_unanswered_ones_await_nothing() -> None:
    client = negotiated(w.SMFIP_NOHELO | w.SMFIP_NR_CONN | w.SMFIP_NR_MAIL | w.SMFIP_NOHDRS
                        | w.SMFIP_NR_EOH | w.SMFIP_NR_BODY)
    assert not client.connect("[192.0.2.1]", "192.0.2.1", 25)
    assert client.data_to_send() == pkt(b"C", b"[192.0.2.1]\0" + b"4" + struct.pack("!H", 25)
                                        + b"192.0.2.1\0")
    assert not client.helo("x.example")
    assert client.data_to_send() == b""
    assert not client.mail("a@x.example")
    assert client.data_to_send() == pkt(b"M", b"<a@x.example>\0")
    assert client.rcpt("b@y.example")  # answered
    client.data_to_send()
    assert events(client, pkt(b"c")) == [Verdict("continue")]
    assert client.data()
    client.data_to_send()
    assert events(client, pkt(b"c")) == [Verdict("continue")]
    assert not client.wants("header")
    assert not client.header("Subject", "x")
    assert client.data_to_send() == b""
    assert not client.end_of_headers()
    assert not client.body(b"x")
    assert client.data_to_send() == pkt(b"N") + pkt(b"B", b"x")
    assert client.end_of_message()


def test_macros_go_only_as_the_filter_asked_for_them() -> None:
    asked = struct.pack("!I", w.SMFIM_ENVFROM) + b"{auth_authen} i\0"
    client = negotiated(macros=asked)
    client.connect("[192.0.2.1]", "192.0.2.1", 25, {"j": "mx"})
    client.data_to_send()
    events(client, pkt(b"c"))
    client.mail("a@x", (), {"i": "Q", "{mail_addr}": "a@x", "{auth_authen}": "u"})
    assert client.data_to_send().startswith(pkt(b"D", b"Mi\0Q\0{auth_authen}\0u\0"))


def test_no_command_while_an_answer_is_due_and_steps_go_in_order() -> None:
    client = negotiated()
    with pytest.raises(LocalProtocolError):
        client.mail("a@x")  # connect first
    client.connect("[192.0.2.1]", "192.0.2.1", 25)
    with pytest.raises(LocalProtocolError):
        client.helo("x")  # connect not answered yet
    events(client, pkt(b"c"))
    client.mail("a@x")
    events(client, pkt(b"c"))
    client.abort()
    assert client.data_to_send().endswith(pkt(b"A"))
    assert client.state is MilterState.CONNECTED


@pytest.mark.parametrize("answer", [
    pkt(b"h", b"X\0y\0"),  # a modification before the end of the message
    pkt(b"s"),  # SKIP to a step that is no body chunk
    pkt(b"Z"),  # an unknown code
    pkt(b"y", b"250 ok\0"),  # a reply code that is no refusal
    pkt(b"y", b"554 4.7.1 mixed classes\0"),
    pkt(b"4"),  # SMFIR_SHUTDOWN
    struct.pack("!I", 0),  # length zero
    struct.pack("!I", 50_000_000) + b"c",  # absurd length
])
def test_a_filter_that_breaks_the_protocol_raises_and_closes(answer: bytes) -> None:
    client = negotiated()
    client.connect("[192.0.2.1]", "192.0.2.1", 25)
    client.data_to_send()
    client.receive_data(answer)
    with pytest.raises(RemoteProtocolError):
        client.next_event()
    assert client.state is MilterState.CLOSED


def test_a_filter_that_closes_while_an_answer_is_due_is_a_protocol_error() -> None:
    client = negotiated()
    client.connect("[192.0.2.1]", "192.0.2.1", 25)
    client.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="closed"):
        client.next_event()


def test_negotiation_refuses_what_was_not_offered() -> None:
    for answer in (optneg(protocol=w.SMFIP_RCPT_REJ), optneg(actions=0x400), optneg(version=7)):
        client = MilterClient()
        client.negotiate()
        client.receive_data(answer)
        with pytest.raises(RemoteProtocolError):
            client.next_event()


def test_modifications_need_their_action_negotiated() -> None:
    client = negotiated(actions=w.SMFIF_ADDHDRS)
    client.connect("[192.0.2.1]", "192.0.2.1", 25)
    events(client, pkt(b"c"))
    client.mail("a@x")
    events(client, pkt(b"c"))
    client.rcpt("b@y")
    events(client, pkt(b"c"))
    client.data()
    events(client, pkt(b"c"))
    client.end_of_headers()
    events(client, pkt(b"c"))
    client.end_of_message()
    assert events(client, pkt(b"h", b"X\0y\0")) == [AddHeader("X", "y")]
    client.receive_data(pkt(b"b", b"body"))
    with pytest.raises(RemoteProtocolError, match="not negotiated"):
        client.next_event()


def test_skip_answers_a_body_chunk_when_negotiated() -> None:
    client = negotiated(w.SMFIP_SKIP | w.SMFIP_NR_CONN | w.SMFIP_NR_MAIL | w.SMFIP_NR_RCPT
                        | w.SMFIP_NR_DATA | w.SMFIP_NR_EOH)
    client.connect("[192.0.2.1]", "192.0.2.1", 25)
    client.mail("a@x")
    client.rcpt("b@y")
    client.data()
    client.end_of_headers()
    assert client.body(b"x" * 10)
    assert events(client, pkt(b"s")) == [Verdict("skip")]
    with pytest.raises(ValueError):
        client.body(b"x" * (w.MAX_BODY_CHUNK + 1))


def test_reply_codes_become_replies() -> None:
    assert parse_replycode("554 5.7.1 Gtube pattern") == Reply(554, "5.7.1", "Gtube pattern")
    assert parse_replycode("451 try again") == Reply(451, None, "try again")
    assert parse_replycode("550-5.7.1 first\r\n550 5.7.1 second") == Reply(
        550, "5.7.1", "first\nsecond")
    assert parse_replycode("421 4.7.0 bye").close
    for bad in ("250 fine", "55 short", "550-5.7.1 a\r\n551 5.7.1 b", "550-dangling"):
        with pytest.raises(RemoteProtocolError):
            parse_replycode(bad)


def test_header_forms_both_ways() -> None:
    assert header_value(b" value\r\n\tfolded\r\n") == "value\n\tfolded"
    assert header_field("DKIM-Signature", "v=1;\n\tb=x") == b"DKIM-Signature: v=1;\r\n\tb=x\r\n"
    with pytest.raises(ValueError):
        w.cstrings("a\0b")


def at_end_of_message() -> MilterClient:
    client = negotiated(w.SMFIP_NR_CONN | w.SMFIP_NR_MAIL | w.SMFIP_NR_RCPT | w.SMFIP_NR_DATA
                        | w.SMFIP_NR_EOH)
    client.connect("[192.0.2.1]", "192.0.2.1", 25)
    client.mail("a@x")
    client.rcpt("b@y")
    client.data()
    client.end_of_headers()
    client.end_of_message()
    return client


@pytest.mark.parametrize("field", [
    b"Bad Name\0v\0", b"X-A\0one\nX-Injected: two\0", b"X-A\0one\r\n\r\nbody\0", b":\0v\0",
])
def test_a_header_field_that_would_break_the_header_section_is_refused(field: bytes) -> None:
    client = at_end_of_message()
    assert events(client, pkt(b"h", b"X-Fine\0one\n\ttwo\0")) == [AddHeader("X-Fine",
                                                                            "one\n\ttwo")]
    client.receive_data(pkt(b"h", field))
    with pytest.raises(RemoteProtocolError):
        client.next_event()
