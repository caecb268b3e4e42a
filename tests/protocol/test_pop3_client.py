"""The POP3 client core: status lines, listings, streamed messages, states, and the server core.

Pure bytes in, events out; every answer is also fed one byte at a time and in
random pieces, which must not change the events (beyond how content is cut).
The last tests play the client core against postroom's own POP3 server core.
"""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postroom.protocol import pop3_server as server
from postroom.protocol.pop3_client import (
    APOP,
    AUTH,
    AUTH_RESPONSE,
    CAPA,
    DELE,
    GREETING,
    LIST,
    MAX_COMMAND_LINE,
    MAX_LISTING_OCTETS,
    MAX_STATUS_LINE_ACCEPTED,
    NEED_DATA,
    NOOP,
    PASS,
    QUIT,
    RETR,
    STAT,
    STLS,
    TOP,
    UIDL,
    Capabilities,
    Challenge,
    ConnectionClosed,
    Event,
    LocalProtocolError,
    MessageData,
    MessageEnd,
    POP3Client,
    RemoteProtocolError,
    Response,
    Signal,
    State,
    apop_digest,
    apop_timestamp,
    parse_status,
    sizes_of,
    stat_of,
    uids_of,
)

GREETING_LINE = b"+OK POP3 server ready <1896.697170952@dbc.mtview.ca.us>\r\n"
CAPA_LINES = (
    b"+OK Capability list follows\r\n"
    b"TOP\r\nUIDL\r\nUSER\r\nSASL PLAIN login\r\nRESP-CODES\r\nPIPELINING\r\n"
    b"STLS\r\nIMPLEMENTATION Shlemazle Plotz-v302\r\n.\r\n"
)


def events(client: POP3Client) -> list[Event]:
    """Every event until the core needs data (or is closed)."""
    out: list[Event] = []
    while True:
        event = client.next_event()
        if event is NEED_DATA:
            return out
        assert not isinstance(event, Signal)
        out.append(event)
        if isinstance(event, ConnectionClosed):
            return out


def feed(client: POP3Client, data: bytes, *, step: int | None = None) -> list[Event]:
    """Feed `data` whole (step None) or in pieces of `step` octets; all the events."""
    if step is None:
        client.receive_data(data)
        return events(client)
    out: list[Event] = []
    for i in range(0, len(data), step):
        client.receive_data(data[i : i + step])
        out += events(client)
    return out


def joined(evs: list[Event]) -> list[Event]:
    """Events with consecutive MessageData merged (how content is cut does not matter)."""
    out: list[Event] = []
    for e in evs:
        if isinstance(e, MessageData) and out and isinstance(out[-1], MessageData):
            out[-1] = MessageData(out[-1].data + e.data)
        else:
            out.append(e)
    return out


def greeted() -> POP3Client:
    client = POP3Client()
    assert feed(client, GREETING_LINE)[0] == Response(
        GREETING, True, "POP3 server ready <1896.697170952@dbc.mtview.ca.us>"
    )
    return client


def logged_in(*, pipelining: bool = False) -> POP3Client:
    client = greeted()
    if pipelining:
        client.capa()
        feed(client, b"+OK\r\nPIPELINING\r\nUIDL\r\n.\r\n")
    client.user("boss@corp.example")
    assert client.data_to_send() == b"CAPA\r\nUSER boss@corp.example\r\n"[
        0 if pipelining else 6 :
    ]
    feed(client, b"+OK send PASS\r\n")
    client.pass_("s3cret with spaces")
    assert client.data_to_send() == b"PASS s3cret with spaces\r\n"
    (response,) = feed(client, b"+OK boss's maildrop has 2 messages (320 octets)\r\n")
    assert response == Response(PASS, True, "boss's maildrop has 2 messages (320 octets)")
    assert client.state is State.TRANSACTION
    return client


# --- status lines ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "parsed"),
    [
        (b"+OK", ("+OK", "", None)),
        (b"+OK 2 320", ("+OK", "2 320", None)),
        (b"+ok lower case", ("+OK", "lower case", None)),
        (b"-ERR [IN-USE] Do you have another POP session running?",
         ("-ERR", "Do you have another POP session running?", "IN-USE")),
        (b"-ERR [SYS/TEMP] try later", ("-ERR", "try later", "SYS/TEMP")),
        (b"-ERR [not a code here", ("-ERR", "[not a code here", None)),
        (b"+ ", ("+", "", None)),
        (b"+ VXNlcm5hbWU6", ("+", "VXNlcm5hbWU6", None)),
        (b"+OK caf\xc3\xa9", ("+OK", "café", None)),
    ],
)
def test_parse_status(line: bytes, parsed: tuple[str, str, str | None]) -> None:
    assert parse_status(line) == parsed


@pytest.mark.parametrize("line", [b"OK", b"+OKAY", b"250 ok", b"", b"-E", b"* OK imap"])
def test_malformed_status_lines(line: bytes) -> None:
    with pytest.raises(RemoteProtocolError, match="malformed status line"):
        parse_status(line)


def test_greeting_timestamp_and_apop_digest() -> None:
    client = greeted()
    assert client.state is State.AUTHORIZATION
    assert client.timestamp == "<1896.697170952@dbc.mtview.ca.us>"
    # RFC 1939 7's own example.
    assert apop_digest(client.timestamp, "tanstaaf") == "c4c9334bac560ecc979e58001b3e22fb"
    client.apop("mrose", "tanstaaf")
    assert client.data_to_send() == b"APOP mrose c4c9334bac560ecc979e58001b3e22fb\r\n"
    (response,) = feed(client, b"+OK maildrop has 1 message (369 octets)\r\n")
    assert response.command == APOP and response.argument == "mrose"
    assert client.state is State.TRANSACTION
    assert apop_timestamp("+OK ready") is None


def test_apop_needs_a_timestamp() -> None:
    client = POP3Client()
    feed(client, b"+OK ready\r\n")
    with pytest.raises(ValueError, match="timestamp"):
        client.apop("mrose", "tanstaaf")


def test_err_greeting_closes() -> None:
    client = POP3Client()
    evs = feed(client, b"-ERR [SYS/TEMP] too many connections\r\n")
    assert evs == [Response(GREETING, False, "too many connections", "SYS/TEMP"),
                   ConnectionClosed()]
    assert client.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        client.capa()


@pytest.mark.parametrize("step", [None, 1, 3])
def test_capa_listing(step: int | None) -> None:
    client = greeted()
    client.capa()
    assert client.data_to_send() == b"CAPA\r\n"
    (response,) = feed(client, CAPA_LINES, step=step)
    assert response.command == CAPA and response.ok
    assert response.lines[0] == "TOP" and len(response.lines) == 8
    caps = client.capabilities
    assert caps.top and caps.uidl and caps.user and caps.stls and caps.pipelining
    assert caps.resp_codes
    assert caps.sasl == ("PLAIN", "LOGIN")
    assert caps.implementation == "Shlemazle Plotz-v302"
    assert "sasl" in caps and caps.get("SASL") == ("PLAIN", "login")


def test_capa_refused_by_an_old_server_leaves_no_capabilities() -> None:
    client = greeted()
    client.capa()
    (response,) = feed(client, b"-ERR unknown command\r\n")
    assert not response.ok and response.lines == ()
    assert client.capabilities == Capabilities()
    assert client.state is State.AUTHORIZATION


def test_capabilities_skip_junk() -> None:
    caps = Capabilities.from_lines(["", "  ", "-bad", "EXPIRE 31", "LOGIN-DELAY 900"])
    assert set(caps.tags) == {"EXPIRE", "LOGIN-DELAY"} and caps.get("expire") == ("31",)
    assert not caps.pipelining and caps.sasl == () and caps.implementation is None


# --- transaction --------------------------------------------------------------------


@pytest.mark.parametrize("step", [None, 1, 2, 7])
def test_stat_list_uidl(step: int | None) -> None:
    client = logged_in()
    client.stat()
    (stat,) = feed(client, b"+OK 2 320\r\n", step=step)
    assert stat.command == STAT and stat_of(stat) == (2, 320)
    client.list()
    assert client.data_to_send() == b"STAT\r\nLIST\r\n"
    (listing,) = feed(client, b"+OK 2 messages (320 octets)\r\n1 120\r\n2 200\r\n.\r\n",
                      step=step)
    assert listing.command == LIST and listing.lines == ("1 120", "2 200")
    assert sizes_of(listing) == {1: 120, 2: 200}
    client.list(2)
    (one,) = feed(client, b"+OK 2 200\r\n", step=step)
    assert one.argument == "2" and sizes_of(one) == {2: 200}
    client.uidl()
    (uidl,) = feed(client, b"+OK\r\n1 whqtswO00WBw418f9t5JxYwZ\r\n2 QhdPYR:00WBw1Ph7x7\r\n.\r\n",
                   step=step)
    assert uidl.command == UIDL
    assert uids_of(uidl) == {1: "whqtswO00WBw418f9t5JxYwZ", 2: "QhdPYR:00WBw1Ph7x7"}
    client.uidl(1)
    (one_uid,) = feed(client, b"+OK 1 whqtswO00WBw418f9t5JxYwZ\r\n", step=step)
    assert uids_of(one_uid) == {1: "whqtswO00WBw418f9t5JxYwZ"}
    client.list()
    (empty,) = feed(client, b"+OK 0 messages\r\n.\r\n", step=step)
    assert empty.lines == () and sizes_of(empty) == {}


@pytest.mark.parametrize(
    ("response", "reader"),
    [
        (Response(STAT, True, "two 320"), stat_of),
        (Response(STAT, True, "2"), stat_of),
        (Response(LIST, True, "", lines=("1",)), sizes_of),
        (Response(LIST, True, "", lines=("x 12",)), sizes_of),
        (Response(UIDL, True, "", lines=("1 " + "u" * 71,)), uids_of),
        (Response(UIDL, True, "1", argument="1"), uids_of),
    ],
)
def test_malformed_listings(response: Response, reader: object) -> None:
    with pytest.raises(RemoteProtocolError):
        reader(response)  # type: ignore[operator]


MESSAGE_WIRE = (
    b"+OK 93 octets\r\n"
    b"Subject: dots\r\n"
    b"\r\n"
    b"..leading dot\r\n"
    b"...two\r\n"
    b"..\r\n"
    b"plain . line\r\n"
    b".\r\n"
)
MESSAGE = b"Subject: dots\r\n\r\n.leading dot\r\n..two\r\n.\r\nplain . line\r\n"


@pytest.mark.parametrize("step", [None, 1, 2, 3, 5, 16])
def test_retr_streams_unstuffed_content(step: int | None) -> None:
    client = logged_in()
    client.retr(1)
    assert client.data_to_send() == b"RETR 1\r\n"
    evs = joined(feed(client, MESSAGE_WIRE, step=step))
    assert evs[0] == Response(RETR, True, "93 octets", argument="1")
    assert evs[1] == MessageData(MESSAGE)
    assert evs[2] == MessageEnd(len(MESSAGE))
    assert client.pending == ()
    client.stat()
    (stat,) = feed(client, b"+OK 2 320\r\n", step=step)
    assert stat_of(stat) == (2, 320)


def test_retr_content_in_many_pieces_holds_no_message_in_memory() -> None:
    client = logged_in()
    client.retr(2)
    line = b"x" * 70 + b"\r\n"
    feed(client, b"+OK\r\n")
    seen = 0
    for _ in range(2000):
        for event in feed(client, line * 10):
            assert isinstance(event, MessageData)
            seen += len(event.data)
    evs = feed(client, b".\r\n")
    assert evs == [MessageEnd(2000 * 10 * len(line))] and seen == 2000 * 10 * len(line)


def test_empty_message_and_bare_lf_lines() -> None:
    client = logged_in()
    client.retr(1)
    assert feed(client, b"+OK 0\r\n.\r\n") == [
        Response(RETR, True, "0", argument="1"), MessageEnd(0)
    ]
    client.retr(2)
    evs = joined(feed(client, b"+OK\r\nbare\nlf\r\n.\r\n"))
    assert evs[1:] == [MessageData(b"bare\r\nlf\r\n"), MessageEnd(10)]


def test_long_lines_keep_their_dots() -> None:
    client = logged_in()
    client.top(1, 3)
    assert client.data_to_send() == b"TOP 1 3\r\n"
    long = b".." + b"y" * 5000 + b"\r\n"
    evs = joined(feed(client, b"+OK\r\n" + long + b"..z\r\n.\r\n", step=512))
    assert evs[0].command == TOP  # type: ignore[union-attr]
    assert evs[1] == MessageData(b"." + b"y" * 5000 + b"\r\n.z\r\n")


def test_err_to_retr_has_no_body() -> None:
    client = logged_in()
    client.retr(9)
    evs = feed(client, b"-ERR no such message\r\n")
    assert evs == [Response(RETR, False, "no such message", argument="9")]
    assert client.state is State.TRANSACTION


def test_eof_in_the_middle_of_a_message() -> None:
    client = logged_in()
    client.retr(1)
    evs = feed(client, MESSAGE_WIRE[:40])
    assert evs[0].command == RETR  # type: ignore[union-attr]
    client.receive_data(b"")
    evs = events(client)
    assert evs[-1] == ConnectionClosed((RETR,))
    assert client.state is State.CLOSED


def test_dele_quit_and_the_update_state() -> None:
    client = logged_in()
    client.dele(1)
    (dele,) = feed(client, b"+OK message 1 deleted\r\n")
    assert dele == Response(DELE, True, "message 1 deleted", argument="1")
    client.quit()
    evs = feed(client, b"+OK dewey POP3 server signing off (1 message left)\r\n")
    assert evs == [Response(QUIT, True, "dewey POP3 server signing off (1 message left)"),
                   ConnectionClosed()]
    assert client.state is State.CLOSED
    client.receive_data(b"+OK ignored after the end\r\n")
    assert events(client) == [ConnectionClosed()]


def test_pipelining_needs_the_capability() -> None:
    client = logged_in()
    client.retr(1)
    with pytest.raises(LocalProtocolError, match="no PIPELINING"):
        client.dele(1)


@pytest.mark.parametrize("step", [None, 1, 4])
def test_pipelined_retr_dele_quit(step: int | None) -> None:
    client = logged_in(pipelining=True)
    client.retr(1)
    client.dele(1)
    client.retr(2)
    client.quit()
    assert client.data_to_send() == b"RETR 1\r\nDELE 1\r\nRETR 2\r\nQUIT\r\n"
    assert client.pending == (RETR, DELE, RETR, QUIT)
    wire = (MESSAGE_WIRE + b"+OK deleted\r\n" + b"+OK\r\nsecond\r\n.\r\n"
            + b"+OK bye\r\n")
    evs = joined(feed(client, wire, step=step))
    assert [type(e).__name__ for e in evs] == [
        "Response", "MessageData", "MessageEnd", "Response", "Response", "MessageData",
        "MessageEnd", "Response", "ConnectionClosed",
    ]
    assert evs[1] == MessageData(MESSAGE) and evs[5] == MessageData(b"second\r\n")
    assert [e.command for e in evs if isinstance(e, Response)] == [RETR, DELE, RETR, QUIT]


def test_nothing_follows_quit_or_login_commands() -> None:
    client = logged_in(pipelining=True)
    client.quit()
    with pytest.raises(LocalProtocolError, match="before QUIT"):
        client.noop()
    client = greeted()
    client.user("a")
    with pytest.raises(LocalProtocolError, match="before USER"):
        client.pass_("b")


def test_commands_out_of_state() -> None:
    client = POP3Client()
    with pytest.raises(LocalProtocolError, match="before greeting is answered"):
        client.capa()
    client = greeted()
    for command in (client.stat, client.list, client.uidl, client.noop, client.rset):
        with pytest.raises(LocalProtocolError, match="in state authorization"):
            command()
    with pytest.raises(LocalProtocolError):
        client.retr(1)
    with pytest.raises(LocalProtocolError):
        client.tls_started()
    with pytest.raises(LocalProtocolError, match="continuation"):
        client.auth_response("abc")
    client = logged_in()
    with pytest.raises(LocalProtocolError):
        client.user("again")
    with pytest.raises(LocalProtocolError):
        client.stls()


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.user("boss\r\nDELE 1"),
        lambda c: c.user(""),
        lambda c: c.pass_("secret\nQUIT"),
        lambda c: c.pass_("x" * (MAX_COMMAND_LINE - 6)),
        lambda c: c.auth("PLAIN", "a\r\nb"),
        lambda c: c.auth("PLAIN", "A" * 300),
        lambda c: c.auth("PL AIN"),
        lambda c: c.apop("two words", "s"),
    ],
)
def test_arguments_that_cannot_be_sent(call: object) -> None:
    client = greeted()
    with pytest.raises(ValueError):
        call(client)  # type: ignore[operator]
    assert client.data_to_send() == b""
    assert client.pending == ()


@pytest.mark.parametrize("bad", [0, -1, True, "1"])
def test_message_numbers_are_positive(bad: object) -> None:
    client = logged_in()
    for command in (client.retr, client.dele, client.list, client.uidl):
        with pytest.raises(ValueError):
            command(bad)  # type: ignore[operator]
    with pytest.raises(ValueError):
        client.top(1, -1)


def test_pass_line_at_the_limit_is_sent() -> None:
    client = greeted()
    client.pass_("x" * (MAX_COMMAND_LINE - 7))
    assert len(client.data_to_send()) == MAX_COMMAND_LINE


# --- AUTH ------------------------------------------------------------------------


def test_auth_plain_with_initial_response() -> None:
    client = greeted()
    token = base64.b64encode(b"\0boss\0secret").decode()
    client.auth("plain", token)
    assert client.data_to_send() == f"AUTH PLAIN {token}\r\n".encode()
    (response,) = feed(client, b"+OK logged in\r\n")
    assert response == Response(AUTH, True, "logged in", argument="PLAIN")
    assert client.state is State.TRANSACTION


def test_auth_login_challenges_and_failure() -> None:
    client = greeted()
    client.auth("LOGIN")
    assert feed(client, b"+ VXNlcm5hbWU6\r\n") == [Challenge(AUTH, "VXNlcm5hbWU6")]
    assert client.state is State.IN_AUTH
    client.auth_response("Ym9zcw==")
    assert feed(client, b"+ UGFzc3dvcmQ6\r\n") == [Challenge(AUTH_RESPONSE, "UGFzc3dvcmQ6")]
    client.auth_response("d3Jvbmc=")
    assert client.data_to_send() == b"AUTH LOGIN\r\nYm9zcw==\r\nd3Jvbmc=\r\n"
    (response,) = feed(client, b"-ERR [AUTH] authentication failed\r\n")
    assert response.code == "AUTH" and not response.ok
    assert client.state is State.AUTHORIZATION


def test_auth_empty_initial_response_and_long_responses() -> None:
    client = greeted()
    client.auth("PLAIN", "")
    assert client.data_to_send() == b"AUTH PLAIN =\r\n"
    assert feed(client, b"+\r\n") == [Challenge(AUTH, "")]
    client.auth_response("A" * 4000)  # RFC 5034 4: no 255-octet limit on responses
    assert len(client.data_to_send()) == 4002


def test_continuation_outside_auth_is_an_error() -> None:
    client = logged_in()
    client.stat()
    with pytest.raises(RemoteProtocolError, match="continuation"):
        feed(client, b"+ abc\r\n")
    assert client.state is State.CLOSED


# --- STLS -----------------------------------------------------------------------------


def test_stls_then_capabilities_are_forgotten() -> None:
    client = greeted()
    client.capa()
    feed(client, CAPA_LINES)
    client.data_to_send()
    client.stls()
    assert client.data_to_send() == b"STLS\r\n"
    (response,) = feed(client, b"+OK Begin TLS negotiation\r\n")
    assert response.command == STLS and client.state is State.TLS_WAIT
    client.tls_started()
    assert client.tls_active and client.capabilities == Capabilities()
    assert client.state is State.AUTHORIZATION
    with pytest.raises(LocalProtocolError, match="already active"):
        client.stls()


def test_stls_response_injection_is_refused() -> None:
    client = greeted()
    client.stls()
    with pytest.raises(RemoteProtocolError, match="after its \\+OK to STLS"):
        feed(client, b"+OK Begin TLS\r\n+OK injected\r\n")
    assert client.state is State.CLOSED


def test_data_during_the_handshake_is_refused() -> None:
    client = greeted()
    client.stls()
    feed(client, b"+OK Begin TLS\r\n")
    client.receive_data(b"-ERR sneaky\r\n")
    with pytest.raises(RemoteProtocolError, match="before the TLS handshake"):
        client.next_event()


def test_stls_refused_stays_in_authorization() -> None:
    client = greeted()
    client.stls()
    (response,) = feed(client, b"-ERR TLS not available\r\n")
    assert not response.ok and client.state is State.AUTHORIZATION and not client.tls_active


# --- protocol errors -------------------------------------------------------------------


def test_response_nobody_asked_for() -> None:
    client = greeted()
    with pytest.raises(RemoteProtocolError, match="no command awaiting"):
        feed(client, b"+OK surprise\r\n")
    assert client.state is State.CLOSED
    assert events(client) == [ConnectionClosed()]


def test_unsolicited_err_closes_the_session() -> None:
    client = logged_in()
    evs = feed(client, b"-ERR Disconnected for inactivity.\r\n")
    assert evs == [Response("", False, "Disconnected for inactivity."), ConnectionClosed()]


def test_overlong_status_line() -> None:
    client = logged_in()
    client.stat()
    with pytest.raises(RemoteProtocolError, match="longer than"):
        feed(client, b"+OK " + b"9" * MAX_STATUS_LINE_ACCEPTED + b"\r\n")


def test_overlong_listing() -> None:
    client = logged_in()
    client.uidl()
    feed(client, b"+OK\r\n")
    line = b"1 " + b"u" * 68 + b"\r\n"
    with pytest.raises(RemoteProtocolError, match="listing longer"):
        for _ in range(MAX_LISTING_OCTETS // (len(line) * 1000) + 2):
            feed(client, line * 1000)


def test_malformed_status_line_closes() -> None:
    client = logged_in()
    client.noop()
    with pytest.raises(RemoteProtocolError, match="malformed"):
        feed(client, b"250 ok\r\n")
    assert client.state is State.CLOSED
    assert client.next_event() == ConnectionClosed((NOOP,))


def test_eof_while_waiting_names_the_commands() -> None:
    client = logged_in()
    client.stat()
    client.receive_data(b"")
    assert events(client) == [ConnectionClosed((STAT,))]


def test_eof_before_the_greeting() -> None:
    client = POP3Client()
    client.receive_data(b"")
    assert events(client) == [ConnectionClosed((GREETING,))]


# --- the client core against postroom's server core -----------------------------------

STAMP = "<7.1700000000@pop.example>"


def as_sent(message: bytes) -> bytes:
    """A message as RETR carries it: CRLF line ends, a final CRLF."""
    data = message.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return data if data.endswith(b"\r\n") else data + b"\r\n"


def converse(client: POP3Client, core: server.POP3Server, drop: list[bytes],
             split: list[int]) -> list[Event]:
    """Move bytes both ways until the client needs more, answering the server's events.

    Server output reaches the client in pieces of the sizes in `split` (cycled).
    """
    out: list[Event] = []
    sizes = split or [1 << 20]
    turn = 0
    while True:
        sent = client.data_to_send()
        if sent:  # b"" would be EOF
            core.receive_data(sent)
        while True:
            event = core.next_event()
            if event is server.NEED_DATA or event is server.PAUSED:
                break
            if isinstance(event, server.ConnectionClosed):
                break
            if isinstance(event, server.Pass):
                if event.password == "secret":
                    core.login_succeeded(server.Snapshot.of(
                        (len(as_sent(m)), f"uid{i}") for i, m in enumerate(drop, 1)))
                else:
                    core.err("wrong password", "AUTH")
            elif isinstance(event, server.User):
                core.ok()
            elif isinstance(event, server.Apop):
                core.login_succeeded(server.Snapshot.of([]))
            elif isinstance(event, (server.Retrieve, server.Top)):
                data = drop[event.msg_number - 1]
                for i in range(0, len(data), 7):
                    core.send_message_chunk(data[i : i + 7])
                core.end_message()
            elif isinstance(event, server.Update):
                core.update_done()
        wire = core.data_to_send()
        if not wire:
            return out
        pos = 0
        while pos < len(wire):
            size = sizes[turn % len(sizes)]
            turn += 1
            out += feed(client, wire[pos : pos + size])
            pos += size


def test_against_the_server_core() -> None:
    drop = [MESSAGE, b"Subject: lf\n\n.dot\nlast line without end", b"x\r\n" * 1000]
    core = server.POP3Server(server.POP3ServerConfig(allow_plaintext_auth=True,
                                                     apop_timestamp=STAMP))
    core.greeting("ready")
    client = POP3Client()
    assert converse(client, core, drop, [1])[0].text.endswith(STAMP)  # type: ignore[union-attr]
    assert client.timestamp == STAMP
    client.capa()
    (capa,) = converse(client, core, drop, [3])
    assert client.capabilities.uidl and client.capabilities.pipelining
    client.user("boss")
    converse(client, core, drop, [])
    client.pass_("secret")
    (login,) = converse(client, core, drop, [2])
    assert login.ok and client.state is State.TRANSACTION  # type: ignore[union-attr]
    client.list()
    client.uidl()
    listing, uidl = converse(client, core, drop, [5])
    assert isinstance(listing, Response) and isinstance(uidl, Response)
    sizes = sizes_of(listing)
    assert uids_of(uidl) == {1: "uid1", 2: "uid2", 3: "uid3"}
    for number in (1, 2, 3):
        client.retr(number)
        client.dele(number)
    evs = joined(converse(client, core, drop, [1, 2, 3, 500]))
    got = [e.data for e in evs if isinstance(e, MessageData)]
    ends = [e.octets for e in evs if isinstance(e, MessageEnd)]
    wanted = [MESSAGE, b"Subject: lf\r\n\r\n.dot\r\nlast line without end\r\n", b"x\r\n" * 1000]
    assert got == wanted
    assert ends == [len(w) for w in wanted] == [sizes[1], sizes[2], sizes[3]]
    client.quit()
    evs = converse(client, core, drop, [4])
    assert evs[0].command == QUIT and evs[0].ok  # type: ignore[union-attr]
    assert evs[-1] == ConnectionClosed()


@settings(max_examples=60, deadline=None)
@given(
    body=st.lists(
        st.sampled_from([b".", b"..", b"...", b"a", b".a", b"\r\n", b"\n", b" ", b"From "]),
        max_size=40,
    ).map(b"".join),
    split=st.lists(st.integers(1, 9), min_size=1, max_size=6),
)
def test_any_message_comes_back_as_sent(body: bytes, split: list[int]) -> None:
    """What the server core sends (CRLF, stuffed) the client core gives back un-stuffed."""
    core = server.POP3Server(server.POP3ServerConfig(allow_plaintext_auth=True))
    core.greeting()
    client = POP3Client()
    drop = [b"Subject: p\r\n\r\n" + body]
    converse(client, core, drop, split)
    client.user("boss")
    converse(client, core, drop, split)
    client.pass_("secret")
    converse(client, core, drop, split)
    client.retr(1)
    evs = joined(converse(client, core, drop, split))
    expected = as_sent(drop[0])
    data = evs[1].data if isinstance(evs[1], MessageData) else b""
    assert data == expected
    assert evs[-1] == MessageEnd(len(expected))
