"""The SMTP client core: EHLO extensions, command bytes, state and pipelining.

Pure bytes in, events out. Content framing and the core played against
postroom's own server core are in test_smtp_client_data.py.
"""

from __future__ import annotations

import pytest

from postroom.protocol.replies import Reply, parse_reply
from postroom.protocol.smtp_client import (
    BDAT,
    BDAT_LAST,
    DATA,
    EHLO,
    END_DATA,
    GREETING,
    HELO,
    MAIL,
    NEED_DATA,
    QUIT,
    RCPT,
    RSET,
    STARTTLS,
    ConnectionClosed,
    Event,
    Extensions,
    LocalProtocolError,
    RemoteProtocolError,
    Response,
    SMTPClient,
    State,
    encode_orcpt,
)

FULL_EHLO = (
    b"250-mx.example Hello relay.example\r\n"
    b"250-PIPELINING\r\n"
    b"250-SIZE 1000000\r\n"
    b"250-8BITMIME\r\n"
    b"250-SMTPUTF8\r\n"
    b"250-DSN\r\n"
    b"250-ENHANCEDSTATUSCODES\r\n"
    b"250-CHUNKING\r\n"
    b"250-STARTTLS\r\n"
    b"250 AUTH PLAIN LOGIN\r\n"
)
PLAIN_EHLO = b"250-mx.example\r\n250 HELP\r\n"


def events(client: SMTPClient) -> list[Event]:
    """Every event until the core needs data (or is closed)."""
    out: list[Event] = []
    while True:
        event = client.next_event()
        if event is NEED_DATA:
            return out
        assert isinstance(event, Response | ConnectionClosed)
        out.append(event)
        if isinstance(event, ConnectionClosed):
            return out


def answer(client: SMTPClient, data: bytes) -> list[Event]:
    client.receive_data(data)
    return events(client)


def greeted(ehlo: bytes = FULL_EHLO) -> SMTPClient:
    """A client past the greeting and EHLO, with its output drained."""
    client = SMTPClient()
    assert answer(client, b"220 mx.example ESMTP\r\n")[0].command == GREETING
    client.ehlo("relay.example")
    (response,) = answer(client, ehlo)
    assert isinstance(response, Response) and response.command == EHLO
    client.data_to_send()
    return client


def replies(evts: list[Event]) -> list[tuple[str, int]]:
    return [(e.command, e.reply.code) for e in evts if isinstance(e, Response)]


# --- EHLO extensions --------------------------------------------------------


def test_extensions_from_ehlo() -> None:
    ext = Extensions.from_ehlo(parse_reply(FULL_EHLO))
    assert ext.pipelining and ext.starttls and ext.eightbitmime and ext.smtputf8
    assert ext.dsn and ext.chunking and ext.enhanced_status_codes
    assert ext.size_limit == 1_000_000 and "size" in ext
    assert ext.auth_mechanisms == ("PLAIN", "LOGIN")
    assert ext.get("auth") == "PLAIN LOGIN"


def test_extensions_odd_forms() -> None:
    reply = parse_reply(
        b"250-mx\r\n250-size\r\n250-AUTH=LOGIN\r\n250-AUTH plain  cram-md5\r\n"
        b"250-b@d keyword\r\n250-\r\n250 X-EXPERIMENT a b\r\n"
    )
    ext = Extensions.from_ehlo(reply)
    assert "SIZE" in ext and ext.size_limit is None  # offered without a fixed limit
    assert ext.auth_mechanisms == ("LOGIN", "PLAIN", "CRAM-MD5")
    assert ext.get("X-EXPERIMENT") == "a b"
    assert set(ext.keywords) == {"SIZE", "AUTH", "X-EXPERIMENT"}
    assert Extensions.from_ehlo(parse_reply(b"250-mx\r\n250 SIZE 0\r\n")).size_limit is None
    assert not Extensions.from_ehlo(parse_reply(b"250 mx only\r\n")).keywords


# --- A session, command by command --------------------------------------------


def test_greeting_then_ehlo() -> None:
    client = SMTPClient()
    assert client.state is State.CONNECTED and client.pending == (GREETING,)
    assert client.next_event() is NEED_DATA
    with pytest.raises(LocalProtocolError, match="EHLO"):
        client.ehlo("relay.example")  # RFC 5321 3.1: wait for the greeting
    assert answer(client, b"220 mx ESMTP\r\n") == [
        Response(GREETING, Reply(220, None, "mx ESMTP"))
    ]
    assert client.state is State.GREETED
    client.ehlo("relay.example")
    assert client.data_to_send() == b"EHLO relay.example\r\n"
    (response,) = answer(client, FULL_EHLO)
    assert isinstance(response, Response) and response.argument == "relay.example"
    assert client.state is State.READY and client.esmtp and client.extensions.pipelining


def test_ehlo_refused_then_helo_has_no_extensions() -> None:
    client = SMTPClient()
    answer(client, b"220 old ready\r\n")
    client.ehlo("relay.example")
    assert replies(answer(client, b"502 Command not implemented\r\n")) == [(EHLO, 502)]
    assert client.state is State.GREETED
    client.helo("relay.example")
    assert client.data_to_send() == b"EHLO relay.example\r\nHELO relay.example\r\n"
    assert replies(answer(client, b"250 old\r\n")) == [(HELO, 250)]
    assert client.state is State.READY and not client.esmtp and not client.extensions.keywords
    with pytest.raises(ValueError, match="SIZE"):
        client.mail("a@x.example", size=10)


def test_554_greeting_allows_only_quit() -> None:
    client = SMTPClient()
    answer(client, b"554 no service for you\r\n")
    assert client.state is State.REFUSED
    with pytest.raises(LocalProtocolError):
        client.ehlo("relay.example")
    client.quit()
    assert replies(answer(client, b"221 bye\r\n")) == [(QUIT, 221)]
    assert client.closing and client.next_event() == ConnectionClosed()


def test_full_transaction_bytes() -> None:
    client = greeted()
    client.mail("a@x.example", size=120, body="8BITMIME")
    client.rcpt("b@y.example")
    client.rcpt("Postmaster")
    client.data()
    assert client.data_to_send() == (
        b"MAIL FROM:<a@x.example> SIZE=120 BODY=8BITMIME\r\n"
        b"RCPT TO:<b@y.example>\r\n"
        b"RCPT TO:<Postmaster>\r\n"
        b"DATA\r\n"
    )
    assert client.pending == (MAIL, RCPT, RCPT, DATA)
    evts = answer(client, b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n250 2.1.5 ok\r\n354 go\r\n")
    assert replies(evts) == [(MAIL, 250), (RCPT, 250), (RCPT, 250), (DATA, 354)]
    assert [e.argument for e in evts if isinstance(e, Response)] == [
        "a@x.example", "b@y.example", "Postmaster", ""
    ]
    assert client.state is State.IN_DATA
    client.send_data(b"Subject: x\r\n\r\nbody\r\n")
    client.end_data()
    assert client.data_to_send() == b"Subject: x\r\n\r\nbody\r\n.\r\n"
    (done,) = answer(client, b"250 2.0.0 queued as X\r\n")
    assert isinstance(done, Response) and done.command == END_DATA
    assert done.reply == Reply(250, "2.0.0", "queued as X")
    assert client.state is State.READY
    client.quit()
    assert client.data_to_send() == b"QUIT\r\n"
    assert replies(answer(client, b"221 2.0.0 bye\r\n")) == [(QUIT, 221)]
    assert client.state is State.CLOSED


def test_null_sender_and_dsn_parameters() -> None:
    client = greeted()
    client.mail("", ret="hdrs", envid="Q1+id=x")
    client.rcpt(
        "b@y.example", notify=("SUCCESS", "failure"), orcpt="rfc822;Bob+x=1@Y.example"
    )
    client.rcpt("c@y.example", notify=["never"], orcpt="c@y.example")
    assert client.data_to_send() == (
        b"MAIL FROM:<> RET=HDRS ENVID=Q1+2Bid+3Dx\r\n"
        b"RCPT TO:<b@y.example> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;Bob+2Bx+3D1@Y.example\r\n"
        b"RCPT TO:<c@y.example> NOTIFY=NEVER ORCPT=rfc822;c@y.example\r\n"
    )


def test_orcpt_encoding() -> None:
    # RFC 3461 4: "+" and "=" and anything outside ! to ~ become +XX.
    assert encode_orcpt("rfc822;a b+c@x") == "rfc822;a+20b+2Bc@x"
    assert encode_orcpt("x@y") == "rfc822;x@y"
    # RFC 6533 3: non-ASCII addresses use the utf-8 type and \x{HEX}.
    assert encode_orcpt("rfc822;jös+1@bücher.example") == (
        "utf-8;j\\x{F6}s\\x{2B}1@b\\x{FC}cher.example"
    )
    assert encode_orcpt("utf-8;a=b@x") == "utf-8;a\\x{3D}b@x"
    with pytest.raises(ValueError):
        encode_orcpt("x400;jös")


def test_smtputf8_and_auth_parameters() -> None:
    client = greeted()
    with pytest.raises(ValueError, match="(?i)smtputf8"):
        client.mail("jös@bücher.example")
    client.mail("jös@bücher.example", smtputf8=True, auth="<>")
    client.rcpt("ünï@example.com")
    assert client.data_to_send() == (
        "MAIL FROM:<jös@bücher.example> SMTPUTF8 AUTH=<>\r\nRCPT TO:<ünï@example.com>\r\n"
    ).encode()
    client = greeted()
    client.mail("a@x.example", auth="user+1@x.example")
    assert client.data_to_send() == b"MAIL FROM:<a@x.example> AUTH=user+2B1@x.example\r\n"
    client.rcpt("b@y.example")
    with pytest.raises(ValueError, match="SMTPUTF8 on MAIL"):
        client.rcpt("ünï@example.com")  # the transaction was opened without SMTPUTF8


@pytest.mark.parametrize(
    ("kwargs", "needs"),
    [
        ({"size": 1}, "SIZE"),
        ({"body": "8BITMIME"}, "8BITMIME"),
        ({"smtputf8": True}, "SMTPUTF8"),
        ({"ret": "FULL"}, "DSN"),
        ({"envid": "x"}, "DSN"),
        ({"auth": "<>"}, "AUTH"),
    ],
)
def test_mail_parameters_need_their_extension(kwargs: dict[str, object], needs: str) -> None:
    client = greeted(PLAIN_EHLO)
    with pytest.raises(ValueError, match=needs):
        client.mail("a@x.example", **kwargs)
    assert client.data_to_send() == b"" and client.pending == ()


def test_rcpt_parameters_need_dsn() -> None:
    client = greeted(PLAIN_EHLO)
    client.mail("a@x.example")
    answer(client, b"250 ok\r\n")
    for kwargs in ({"notify": ["FAILURE"]}, {"orcpt": "rfc822;x@y"}):
        with pytest.raises(ValueError, match="DSN"):
            client.rcpt("b@y.example", **kwargs)


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.mail("a@x.example\r\nRCPT TO:<evil@x>"),
        lambda c: c.mail("a@x.example> SIZE=1"),
        lambda c: c.mail("no-at-sign"),
        lambda c: c.mail("a@x.example", body="BINARYMIME"),
        lambda c: c.mail("a@x.example", ret="ALL"),
        lambda c: c.mail("a@x.example", envid="x" * 101),
        lambda c: c.mail("a@x.example", size=-1),
        lambda c: c.ehlo("two words"),
        lambda c: c.ehlo("bad\nname"),
        lambda c: c.ehlo(""),
        lambda c: c.auth("CRAM-MD5"),
        lambda c: c.auth("PLAIN", "abc\r\nMAIL FROM:<x@y>"),
    ],
)
def test_arguments_that_cannot_be_sent(call: object) -> None:
    client = greeted()
    with pytest.raises(ValueError):
        call(client)  # type: ignore[operator]
    assert client.data_to_send() == b"" and client.pending == ()


def test_rcpt_argument_checks() -> None:
    client = greeted()
    client.mail("a@x.example")
    for bad in ("b@y.example\r\nDATA", "<b@y.example>", "b@y.example NOTIFY=NEVER"):
        with pytest.raises(ValueError):
            client.rcpt(bad)
    with pytest.raises(ValueError):
        client.rcpt("b@y.example", notify=["SUCCESS", "NEVER"])
    with pytest.raises(ValueError):
        client.rcpt("b@y.example", orcpt="rfc822;" + "x" * 600)


# --- Pipelining and sequence ---------------------------------------------------


def test_without_pipelining_commands_wait_for_replies() -> None:
    client = greeted(PLAIN_EHLO)
    client.mail("a@x.example")
    with pytest.raises(LocalProtocolError, match="PIPELINING"):
        client.rcpt("b@y.example")
    answer(client, b"250 ok\r\n")
    client.rcpt("b@y.example")
    assert client.data_to_send() == b"MAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\n"


def test_nothing_follows_data_or_ehlo_in_a_group() -> None:
    # RFC 2920 3.1: EHLO, DATA, NOOP, QUIT (and STARTTLS, AUTH) end a group.
    client = greeted()
    client.mail("a@x.example")
    client.rcpt("b@y.example")
    client.data()
    with pytest.raises(LocalProtocolError, match="DATA is answered"):
        client.rset()
    with pytest.raises(LocalProtocolError, match="354"):
        client.send_data(b"too early")
    client = greeted()
    client.ehlo("again.example")
    with pytest.raises(LocalProtocolError):
        client.mail("a@x.example")


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.rcpt("b@y.example"),
        lambda c: c.data(),
        lambda c: c.end_data(),
        lambda c: c.send_data(b"x"),
        lambda c: c.tls_started(),
        lambda c: c.auth_response("abc"),
        lambda c: c.bdat(b"x"),
    ],
)
def test_out_of_turn_calls_raise(call: object) -> None:
    client = greeted()
    with pytest.raises(LocalProtocolError, match="state"):
        call(client)  # type: ignore[operator]


def test_nested_mail_is_out_of_turn() -> None:
    client = greeted()
    client.mail("a@x.example")
    answer(client, b"250 ok\r\n")
    with pytest.raises(LocalProtocolError, match="MAIL in state mail"):
        client.mail("b@x.example")


def test_refused_mail_in_a_pipeline_leaves_the_session_ready() -> None:
    client = greeted()
    client.mail("a@x.example")
    client.rcpt("b@y.example")
    client.rcpt("c@y.example")
    client.data()
    evts = answer(
        client,
        b"550 5.7.1 sender refused\r\n503 5.5.1 need MAIL\r\n503 5.5.1 need MAIL\r\n"
        b"503 5.5.1 need MAIL\r\n",
    )
    assert replies(evts) == [(MAIL, 550), (RCPT, 503), (RCPT, 503), (DATA, 503)]
    assert client.state is State.READY and client.pending == ()
    client.mail("a@x.example")  # a new transaction may start right away


def test_all_recipients_refused_then_rset() -> None:
    client = greeted()
    client.mail("a@x.example")
    client.rcpt("b@y.example")
    client.data()
    evts = answer(client, b"250 ok\r\n550 5.1.1 unknown\r\n554 5.5.1 no valid recipients\r\n")
    assert replies(evts) == [(MAIL, 250), (RCPT, 550), (DATA, 554)]
    assert client.state is State.IN_MAIL
    client.rset()
    assert replies(answer(client, b"250 2.0.0 ok\r\n")) == [(RSET, 250)]
    assert client.state is State.READY


def test_data_accepted_without_recipients_needs_a_lone_dot() -> None:
    # RFC 2920 3.1: the client must check DATA's reply; a 354 gets a single dot.
    client = greeted()
    client.mail("a@x.example")
    client.rcpt("b@y.example")
    client.data()
    answer(client, b"250 ok\r\n550 no\r\n354 go\r\n")
    assert client.state is State.IN_DATA
    client.data_to_send()
    client.end_data()
    assert client.data_to_send() == b".\r\n"
    assert replies(answer(client, b"554 no valid recipients\r\n")) == [(END_DATA, 554)]
    assert client.state is State.READY


def test_421_in_a_pipeline_ends_the_session() -> None:
    client = greeted()
    client.mail("a@x.example")
    client.rcpt("b@y.example")
    client.data()
    evts = answer(client, b"250 ok\r\n421 4.3.2 shutting down\r\n")
    assert evts == [
        Response(MAIL, Reply(250, None, "ok"), "a@x.example"),
        Response(RCPT, Reply(421, "4.3.2", "shutting down", close=True), "b@y.example"),
        ConnectionClosed(unanswered=(DATA,)),
    ]
    assert client.closing
    with pytest.raises(LocalProtocolError):
        client.rset()
    assert client.next_event() == ConnectionClosed(unanswered=(DATA,))  # every time


def test_eof_reports_unanswered_commands() -> None:
    client = greeted()
    client.mail("a@x.example")
    client.rcpt("b@y.example")
    client.receive_data(b"250 ok\r\n550-partial")
    client.receive_data(b"")
    assert events(client) == [
        Response(MAIL, Reply(250, None, "ok"), "a@x.example"),
        ConnectionClosed(unanswered=(RCPT,)),
    ]


def test_unsolicited_replies() -> None:
    client = greeted()
    assert answer(client, b"421 4.4.2 idle too long\r\n") == [
        Response("", Reply(421, "4.4.2", "idle too long", close=True)),
        ConnectionClosed(),
    ]
    client = greeted()
    client.receive_data(b"250 nobody asked\r\n")
    with pytest.raises(RemoteProtocolError, match="no command"):
        client.next_event()
    assert client.closing and client.next_event() == ConnectionClosed()


@pytest.mark.parametrize(
    ("send", "reply"),
    [
        (lambda c: c.mail("a@x.example"), b"354 what\r\n"),
        (lambda c: c.rset(), b"334 eh\r\n"),
        (lambda c: c.noop(), b"354 eh\r\n"),
    ],
)
def test_reply_class_that_cannot_answer(send: object, reply: bytes) -> None:
    client = greeted()
    send(client)  # type: ignore[operator]
    client.receive_data(reply)
    with pytest.raises(RemoteProtocolError, match="cannot answer"):
        client.next_event()
    assert client.closing


def test_malformed_reply_closes_the_core() -> None:
    client = greeted()
    client.noop()
    client.receive_data(b"hello there\r\n")
    with pytest.raises(RemoteProtocolError, match="malformed"):
        client.next_event()
    assert client.next_event() == ConnectionClosed(unanswered=("NOOP",))


def test_pipelined_replies_one_byte_at_a_time() -> None:
    script = b"250 2.1.0 ok\r\n250-2.1.5 a\r\n250 2.1.5 b\r\n550 5.1.1 no\r\n354 go\r\n"

    def run(pieces: list[bytes]) -> list[Event]:
        client = greeted()
        client.mail("a@x.example")
        client.rcpt("b@y.example")
        client.rcpt("c@y.example")
        client.data()
        out = []
        for piece in pieces:
            out += answer(client, piece)
        return out

    whole = run([script])
    assert replies(whole) == [(MAIL, 250), (RCPT, 250), (RCPT, 550), (DATA, 354)]
    assert run([script[i : i + 1] for i in range(len(script))]) == whole


# --- STARTTLS and AUTH ------------------------------------------------------------


def test_starttls_resets_the_session() -> None:
    client = greeted()
    client.starttls()
    assert client.data_to_send() == b"STARTTLS\r\n"
    assert replies(answer(client, b"220 2.0.0 ready\r\n")) == [(STARTTLS, 220)]
    assert client.state is State.TLS_WAIT
    client.tls_started()
    assert client.tls_active and client.state is State.GREETED and not client.extensions.keywords
    with pytest.raises(LocalProtocolError):
        client.mail("a@x.example")  # RFC 3207 4.2: EHLO again first
    client.ehlo("relay.example")
    answer(client, b"250-mx\r\n250 ENHANCEDSTATUSCODES\r\n")
    assert client.esmtp and "STARTTLS" not in client.extensions
    with pytest.raises(LocalProtocolError, match="already"):
        client.starttls()


def test_starttls_refused_keeps_plaintext_session() -> None:
    client = greeted()
    client.starttls()
    assert replies(answer(client, b"454 4.7.0 TLS not available\r\n")) == [(STARTTLS, 454)]
    assert client.state is State.READY and not client.tls_active
    client.mail("a@x.example")


def test_data_behind_the_220_to_starttls_is_an_attack() -> None:
    # Response injection: a man in the middle appends replies to the 220, hoping
    # the client reads them as if they had come over TLS.
    client = greeted()
    client.starttls()
    client.receive_data(b"220 ready\r\n250-evil\r\n250 AUTH PLAIN\r\n")
    with pytest.raises(RemoteProtocolError, match="after its 220"):
        client.next_event()
    assert client.closing
    client = greeted()
    client.starttls()
    assert replies(answer(client, b"220 ready\r\n")) == [(STARTTLS, 220)]
    client.receive_data(b"250 late\r\n")
    with pytest.raises(RemoteProtocolError, match="before the TLS handshake"):
        client.next_event()


def test_auth_plain_with_initial_response() -> None:
    client = greeted()
    client.auth("plain", "AHVzZXIAcGFzcw==")
    assert client.data_to_send() == b"AUTH PLAIN AHVzZXIAcGFzcw==\r\n"
    assert replies(answer(client, b"235 2.7.0 ok\r\n")) == [("AUTH", 235)]
    assert client.authenticated and client.state is State.READY


def test_auth_login_exchange_and_empty_initial_response() -> None:
    client = greeted()
    client.auth("LOGIN")
    assert replies(answer(client, b"334 VXNlcm5hbWU6\r\n")) == [("AUTH", 334)]
    assert client.state is State.IN_AUTH
    client.auth_response("dXNlcg==")
    with pytest.raises(LocalProtocolError):
        client.auth_response("cGFzcw==")  # the next challenge first
    answer(client, b"334 UGFzc3dvcmQ6\r\n")
    client.auth_response("cGFzcw==")
    assert client.data_to_send() == b"AUTH LOGIN\r\ndXNlcg==\r\ncGFzcw==\r\n"
    assert replies(answer(client, b"535 5.7.8 bad\r\n")) == [("AUTH response", 535)]
    assert client.state is State.READY and not client.authenticated
    client.auth("PLAIN", "")
    assert client.data_to_send() == b"AUTH PLAIN =\r\n"  # RFC 4954 4


# --- BDAT ----------------------------------------------------------------------


def test_bdat_chunks() -> None:
    client = greeted()
    client.mail("a@x.example")
    client.rcpt("b@y.example")
    client.bdat(b"line\r\n.dot")
    client.bdat(b"\r\n", last=True)
    assert client.data_to_send() == (
        b"MAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\n"
        b"BDAT 10\r\nline\r\n.dot"  # sent as is: no stuffing (RFC 3030 2)
        b"BDAT 2 LAST\r\n\r\n"
    )
    evts = answer(client, b"250 ok\r\n250 ok\r\n250 10 octets\r\n250 queued\r\n")
    assert replies(evts) == [(MAIL, 250), (RCPT, 250), (BDAT, 250), (BDAT_LAST, 250)]
    assert client.state is State.READY
    client = greeted(PLAIN_EHLO)
    client.mail("a@x.example")
    answer(client, b"250 ok\r\n")
    client.rcpt("b@y.example")
    answer(client, b"250 ok\r\n")
    with pytest.raises(ValueError, match="CHUNKING"):
        client.bdat(b"x", last=True)
