"""The SMTP server core, command by command: client bytes in, events and reply bytes out.

Message content (DATA, BDAT, sizes, smuggling) is in test_smtp_server_data.py,
property tests in test_smtp_server_props.py.
"""

from __future__ import annotations

import base64

import pytest
from test_smtp_server_driver import HOST, Answer, Driver, accept, kinds, parse_replies

from postroom.protocol import sasl
from postroom.protocol.replies import Reply
from postroom.protocol.smtp_server import (
    MAX_AUTH_LINE,
    MAX_COMMAND_LINE,
    MAX_MAIL_LINE,
    MAX_RCPT_LINE,
    NEED_DATA,
    PAUSED,
    AuthResponse,
    AuthStart,
    ConnectionClosed,
    DataStart,
    Event,
    Hello,
    LocalProtocolError,
    MailFrom,
    MessageEnd,
    Quit,
    RcptTo,
    Reset,
    SMTPServer,
    SMTPServerConfig,
    StartTLS,
    State,
)

EHLO_LINES = [
    f"{HOST} Hello client.example",
    "PIPELINING",
    "SIZE 52428800",
    "8BITMIME",
    "ENHANCEDSTATUSCODES",
    "SMTPUTF8",
    "CHUNKING",
    "DSN",
]


def greeted(answer: Answer = accept, **config: object) -> Driver:
    """A session after an accepted EHLO; `answer` takes over from then on."""
    d = Driver(**config)
    d.feed(b"EHLO client.example\r\n")
    d.replies()
    d.answer = answer
    return d


def in_transaction(**config: object) -> Driver:
    d = greeted(**config)
    d.feed(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n")
    assert d.replies() == ["250 2.1.0 Sender ok", "250 2.1.5 Recipient ok"]
    return d


def ehlo_keywords(d: Driver) -> list[str]:
    d.feed(b"EHLO client.example\r\n")
    lines = d.replies()[-1].split(" ", 1)[1].split("|")
    return [line.split(" ")[0] for line in lines[1:]]


# --- Banner -------------------------------------------------------------------


def test_banner_is_sent_first_without_enhanced_code() -> None:
    core = SMTPServer(SMTPServerConfig(hostname=HOST))
    assert core.state is State.CONNECTED
    core.receive_data(b"EHLO early.example\r\n")
    assert core.next_event() is PAUSED  # nothing is read before the greeting
    core.send(Reply(220, "2.0.0", f"{HOST} ESMTP"))  # RFC 2034 3: no code in greetings
    assert core.data_to_send() == f"220 {HOST} ESMTP\r\n".encode()
    assert core.next_event() == Hello("EHLO", "early.example")


def test_banner_refusal_with_close() -> None:
    d = Driver(banner=False)
    d.server.send(Reply(421, "4.7.0", f"{HOST} Too many connections", close=True))
    assert d.server.closing
    assert d.feed(b"EHLO x\r\n") == [ConnectionClosed()]
    assert d.replies() == [f"421 {HOST} Too many connections"]


def test_554_banner_answers_everything_but_quit_with_503() -> None:
    d = Driver(banner=False)
    d.server.send(Reply(554, None, f"{HOST} No SMTP service here"))
    d.feed(b"EHLO x\r\nMAIL FROM:<a@b.example>\r\nQUIT\r\n")
    assert d.replies() == [
        f"554 {HOST} No SMTP service here",
        "503 5.5.1 No SMTP service here, only QUIT",
        "503 5.5.1 No SMTP service here, only QUIT",
        f"221 2.0.0 {HOST} closing connection",
    ]
    assert d.server.closing


def test_banner_code_must_be_a_greeting() -> None:
    core = SMTPServer(SMTPServerConfig(hostname=HOST))
    with pytest.raises(LocalProtocolError, match="banner"):
        core.send(Reply(250, None, "hello"))


# --- HELO / EHLO --------------------------------------------------------------


def test_ehlo_lists_extensions_for_the_default_config() -> None:
    d = Driver()
    assert d.feed(b"EHLO client.example\r\n") == [Hello("EHLO", "client.example")]
    assert d.replies() == ["250 " + "|".join(EHLO_LINES)]
    assert d.server.state is State.READY
    assert d.server.helo == "client.example"


def test_ehlo_drops_an_enhanced_code_from_the_apps_250() -> None:
    d = Driver(answer=lambda e: Reply(250, "2.0.0", "hi") if isinstance(e, Hello) else None)
    d.feed(b"EHLO client.example\r\n")
    assert d.replies()[0].startswith("250 hi|PIPELINING")


def test_helo_gets_no_extension_lines() -> None:
    d = Driver()
    assert d.feed(b"helo client.example\r\n") == [Hello("HELO", "client.example")]
    assert d.replies() == [f"250 {HOST} Hello client.example"]


def test_size_zero_advertises_size_without_a_number() -> None:
    assert "SIZE" in ehlo_keywords(Driver(max_message_size=0))
    d = Driver(max_message_size=0)
    d.feed(b"EHLO x\r\n")
    assert "|SIZE|" in d.replies()[0]


def test_disabled_extensions_are_not_listed() -> None:
    d = Driver(chunking=False, dsn=False, pipelining=False, smtputf8=False, eightbitmime=False)
    assert ehlo_keywords(d) == ["SIZE", "ENHANCEDSTATUSCODES"]


def test_smtputf8_is_only_offered_with_8bitmime() -> None:
    # RFC 6531 3.1 (8)
    assert "SMTPUTF8" not in ehlo_keywords(Driver(eightbitmime=False))


def test_starttls_and_auth_offers_follow_the_tls_state() -> None:
    d = Driver(starttls=True, auth_mechanisms=("PLAIN", "LOGIN"))
    keywords = ehlo_keywords(d)
    assert "STARTTLS" in keywords and "AUTH" not in keywords
    d.feed(b"STARTTLS\r\n")
    d.server.tls_started()
    d.replies()
    d.feed(b"EHLO client.example\r\n")
    reply = d.replies()[0]
    assert "STARTTLS" not in reply and "|AUTH PLAIN LOGIN|" in reply
    d.feed(b"AUTH PLAIN dGVzdAB0ZXN0ADEyMzQ=\r\n")
    assert d.replies() == ["235 2.7.0 Authentication successful"]
    assert "AUTH" not in ehlo_keywords(d)  # not after authentication


def test_auth_plaintext_offers_auth_before_tls() -> None:
    assert "AUTH" in ehlo_keywords(Driver(auth_mechanisms=("PLAIN",), auth_plaintext=True))
    assert "AUTH" in ehlo_keywords(Driver(auth_mechanisms=("PLAIN",), tls_active=True))


@pytest.mark.parametrize("line", [b"EHLO\r\n", b"EHLO   \r\n", b"HELO a b\r\n"])
def test_hello_needs_one_domain(line: bytes) -> None:
    d = Driver()
    assert d.feed(line) == []
    verb = line.split()[0].decode()
    assert d.replies() == [f"501 5.5.4 Syntax: {verb} hostname"]


def test_refused_ehlo_leaves_the_client_ungreeted() -> None:
    d = Driver(answer=lambda e: Reply(550, "5.7.1", "Go away"))
    d.feed(b"EHLO bad.example\r\nMAIL FROM:<a@b.example>\r\n")
    assert d.replies() == ["550 5.7.1 Go away", "503 5.5.1 Send HELO/EHLO first"]
    assert d.server.helo is None


def test_ehlo_inside_a_transaction_resets_it() -> None:
    # RFC 5321 4.1.4: HELO/EHLO is an implicit RSET.
    d = in_transaction()
    assert d.feed(b"EHLO again.example\r\nRCPT TO:<c@example.net>\r\n") == [
        Reset(),
        Hello("EHLO", "again.example"),
    ]
    assert d.replies()[1] == "503 5.5.1 Send MAIL first"


# --- MAIL ---------------------------------------------------------------------


def test_mail_with_every_parameter() -> None:
    d = greeted(auth_mechanisms=("PLAIN",), auth_plaintext=True)
    events = d.feed(
        b"MAIL FROM:<a@example.org> SIZE=1000 BODY=8bitmime SMTPUTF8 RET=hdrs "
        b"ENVID=QQ+2B314 AUTH=e+3Dmc2@example.com\r\n"
    )
    assert events == [
        MailFrom(
            "a@example.org",
            size=1000,
            body="8BITMIME",
            smtputf8=True,
            ret="HDRS",
            envid="QQ+314",
            auth="<>",  # RFC 4954 5: not authenticated, so not trusted
        )
    ]
    assert d.replies() == ["250 2.1.0 Sender ok"]
    assert d.server.state is State.MAIL


def test_mail_auth_parameter_is_kept_once_authenticated() -> None:
    d = greeted(auth_mechanisms=("PLAIN",), auth_plaintext=True)
    d.feed(b"AUTH PLAIN dGVzdAB0ZXN0ADEyMzQ=\r\n")
    events = d.feed(b"MAIL FROM:<a@example.org> AUTH=e+3Dmc2@example.com\r\n")
    assert events == [MailFrom("a@example.org", auth="e=mc2@example.com")]


@pytest.mark.parametrize(
    ("line", "address", "route"),
    [
        (b"MAIL FROM:<>", "", ()),
        (b"mail from:<A@Example.ORG>", "A@Example.ORG", ()),
        (b"MAIL FROM: <a@example.org>", "a@example.org", ()),  # lenient about the space
        (b"MAIL FROM:<@relay.example,@hop.example:u@example.org>", "u@example.org",
         ("relay.example", "hop.example")),
        (b'MAIL FROM:<"john doe"@example.org>', '"john doe"@example.org', ()),
        (b"MAIL FROM:<u@[192.0.2.1]>", "u@[192.0.2.1]", ()),
        (b"MAIL FROM:<u@[IPv6:2001:db8::1]>", "u@[IPv6:2001:db8::1]", ()),
    ],
)
def test_mail_paths(line: bytes, address: str, route: tuple[str, ...]) -> None:
    d = greeted()
    assert d.feed(line + b"\r\n") == [MailFrom(address, route=route)]


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (b"MAIL FROM:a@example.org", "501 5.1.7 Bad sender address syntax: "
                                     "the address must be enclosed in <>"),
        (b"MAIL FROM:<a@example.org", "501 5.1.7 Bad sender address syntax: missing closing >"),
        (b"MAIL FROM:<a@>", "501 5.1.7 Bad sender address syntax: malformed address"),
        (b"MAIL FROM:<a@b..c>", "501 5.1.7 Bad sender address syntax: malformed address"),
        (b"MAIL FROM:<a@[300.1.1.1]>",
         "501 5.1.7 Bad sender address syntax: invalid IPv4 address literal"),
        (b"MAIL TO:<a@example.org>", "501 5.5.4 Syntax: MAIL FROM:<address>"),
        (b"MAIL", "501 5.5.4 Syntax: MAIL FROM:<address>"),
        (b"MAIL FROM:<a@example.org> FOO=1", "555 5.5.4 MAIL FROM parameter FOO not supported"),
        (b"MAIL FROM:<a@example.org> SIZE=1 size=2", "501 5.5.4 duplicate parameter SIZE"),
        (b"MAIL FROM:<a@example.org> SIZE=ten", "501 5.5.4 SIZE needs a number of octets"),
        (b"MAIL FROM:<a@example.org> SIZE=99999999999",
         "552 5.3.4 Message size exceeds fixed maximum message size"),
        (b"MAIL FROM:<a@example.org> BODY=BINARYMIME",
         "504 5.5.4 BODY=BINARYMIME is not supported"),
        (b"MAIL FROM:<a@example.org> BODY=9BIT", "501 5.5.4 BODY must be 7BIT or 8BITMIME"),
        (b"MAIL FROM:<a@example.org> RET=ALL", "501 5.5.4 RET must be FULL or HDRS"),
        (b"MAIL FROM:<a@example.org> ENVID=" + b"x" * 101,
         "501 5.5.4 ENVID longer than 100 characters"),
        (b"MAIL FROM:<a@example.org> ENVID=a+zz", "501 5.5.4 malformed + escape in xtext"),
        (b"MAIL FROM:<a@example.org> SMTPUTF8=yes", "501 5.5.4 SMTPUTF8 takes no value"),
        ("MAIL FROM:<jos\u00e9@example.org>".encode(),
         "550 5.6.7 Non-ASCII address needs the SMTPUTF8 parameter"),
        (b"MAIL FROM:<a@example.org> AUTH=x", "555 5.5.4 MAIL FROM parameter AUTH not supported"),
    ],
)
def test_mail_errors(line: bytes, reply: str) -> None:
    d = greeted()
    assert d.feed(line + b"\r\n") == []
    assert d.replies() == [reply]
    assert d.server.state is State.READY


def test_mail_utf8_address_with_smtputf8() -> None:
    d = greeted()
    events = d.feed("MAIL FROM:<jos\u00e9@b\u00fccher.example> SMTPUTF8\r\n".encode())
    assert events == [MailFrom("jos\u00e9@b\u00fccher.example", smtputf8=True)]


def test_mail_with_smtputf8_given_twice() -> None:
    # Python's smtplib writes this when its caller passes SMTPUTF8 too (Exim accepts it).
    d = greeted()
    events = d.feed("MAIL FROM:<jos\u00e9@b\u00fccher.example> SMTPUTF8 SMTPUTF8 "
                    "BODY=8BITMIME\r\n".encode())
    assert events == [MailFrom("jos\u00e9@b\u00fccher.example", body="8BITMIME", smtputf8=True)]
    d.feed(b"RSET\r\nMAIL FROM:<a@example.org> SMTPUTF8 SMTPUTF8=yes\r\n")
    assert d.replies()[-1] == "501 5.5.4 duplicate parameter SMTPUTF8"


def test_dsn_parameters_are_unknown_without_dsn() -> None:
    d = greeted(dsn=False)
    d.feed(b"MAIL FROM:<a@example.org> RET=FULL\r\n")
    assert d.replies() == ["555 5.5.4 MAIL FROM parameter RET not supported"]


def test_mail_sequence_errors() -> None:
    d = Driver()
    d.feed(b"MAIL FROM:<a@example.org>\r\n")
    assert d.replies() == ["503 5.5.1 Send HELO/EHLO first"]
    d = in_transaction()
    d.feed(b"MAIL FROM:<a@example.org>\r\n")
    assert d.replies() == ["503 5.5.1 Nested MAIL command"]


def test_auth_required_refuses_mail_before_auth() -> None:
    d = greeted(auth_required=True, auth_mechanisms=("PLAIN",), tls_active=True)
    d.feed(b"MAIL FROM:<a@example.org>\r\n")
    assert d.replies() == ["530 5.7.0 Authentication required"]  # RFC 4954 6
    d.feed(b"AUTH PLAIN dGVzdAB0ZXN0ADEyMzQ=\r\nMAIL FROM:<a@example.org>\r\n")
    assert d.replies() == ["235 2.7.0 Authentication successful", "250 2.1.0 Sender ok"]


def test_refused_mail_keeps_the_session_ready() -> None:
    def answer(e: Event) -> Reply | None:
        return Reply(550, "5.7.1", "No") if isinstance(e, MailFrom) else accept(e)

    d = greeted(answer=answer)
    d.feed(b"MAIL FROM:<spam@example.org>\r\nRCPT TO:<b@example.net>\r\n")
    assert d.replies() == ["550 5.7.1 No", "503 5.5.1 Send MAIL first"]
    assert d.server.state is State.READY


def test_mail_line_may_use_the_extension_allowances() -> None:
    # RFC 1870, 3461, 6531 each lengthen MAIL; the line below is over 512 octets.
    envid = b"E" * 100
    line = b"MAIL FROM:<" + b"a" * 350 + b"@example.org> SIZE=100 RET=FULL ENVID=" + envid
    line += b" SMTPUTF8 BODY=8BITMIME\r\n"
    assert MAX_COMMAND_LINE < len(line) <= MAX_MAIL_LINE
    d = greeted()
    assert kinds(d.feed(line)) == ["MailFrom"]
    d = greeted()
    d.feed(b"MAIL FROM:<" + b"a" * MAX_MAIL_LINE + b"@example.org>\r\n")
    assert d.replies() == ["500 5.5.2 Line too long (RFC 5321 4.5.3.1.4)"]


# --- RCPT ---------------------------------------------------------------------


def test_rcpt_with_dsn_parameters() -> None:
    d = greeted()
    d.feed(b"MAIL FROM:<a@example.org>\r\n")
    events = d.feed(
        b"RCPT TO:<b@example.net> NOTIFY=success,DELAY ORCPT=rfc822;b+2Bx@example.net\r\n"
        b"RCPT TO:<c@example.net> NOTIFY=NEVER\r\n"
    )
    assert events == [
        RcptTo("b@example.net", notify=("SUCCESS", "DELAY"), orcpt="rfc822;b+x@example.net"),
        RcptTo("c@example.net", notify=("NEVER",)),
    ]
    assert d.server.state is State.RCPT


def test_rcpt_postmaster_without_domain_and_source_route() -> None:
    d = greeted()
    d.feed(b"MAIL FROM:<>\r\n")
    events = d.feed(b"RCPT TO:<Postmaster>\r\nRCPT TO:<@hop.example:u@example.net>\r\n")
    assert events == [RcptTo("Postmaster"), RcptTo("u@example.net", route=("hop.example",))]


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (b"RCPT TO:<>", "501 5.1.3 Bad recipient address syntax: "
                        "the null path is not a valid recipient"),
        (b"RCPT TO:b@example.net", "501 5.1.3 Bad recipient address syntax: "
                                   "the address must be enclosed in <>"),
        (b"RCPT FROM:<b@example.net>", "501 5.5.4 Syntax: RCPT TO:<address>"),
        (b"RCPT TO:<b@example.net> NOTIFY=NEVER,SUCCESS",
         "501 5.5.4 NOTIFY must be NEVER or a list of SUCCESS, FAILURE, DELAY"),
        (b"RCPT TO:<b@example.net> NOTIFY=", "501 5.5.4 malformed value for NOTIFY"),
        (b"RCPT TO:<b@example.net> ORCPT=b@example.net",
         "501 5.5.4 ORCPT must be addr-type;address"),
        (b"RCPT TO:<b@example.net> SIZE=1", "555 5.5.4 RCPT TO parameter SIZE not supported"),
        ("RCPT TO:<b\u00f6b@example.net>".encode(),
         "553 5.6.7 Non-ASCII address needs SMTPUTF8 on MAIL FROM"),
    ],
)
def test_rcpt_errors(line: bytes, reply: str) -> None:
    d = greeted()
    d.feed(b"MAIL FROM:<a@example.org>\r\n")
    d.replies()
    assert d.feed(line + b"\r\n") == []
    assert d.replies() == [reply]


def test_rcpt_line_may_use_the_dsn_allowance() -> None:
    orcpt = b"rfc822;" + b"o" * 480 + b"@example.net"
    line = b"RCPT TO:<b@example.net> NOTIFY=SUCCESS ORCPT=" + orcpt + b"\r\n"
    assert MAX_COMMAND_LINE < len(line) <= MAX_RCPT_LINE
    d = greeted()
    d.feed(b"MAIL FROM:<a@example.org>\r\n")
    assert kinds(d.feed(line)) == ["RcptTo"]


def test_rcpt_before_mail_and_before_helo() -> None:
    d = Driver()
    d.feed(b"RCPT TO:<b@example.net>\r\nEHLO x\r\nRCPT TO:<b@example.net>\r\n")
    replies = d.replies()
    assert replies[0] == "503 5.5.1 Send HELO/EHLO first"
    assert replies[2] == "503 5.5.1 Send MAIL first"


def test_too_many_recipients_get_452() -> None:
    # RFC 5321 4.5.3.1.10; the client goes on in a new transaction.
    d = greeted(max_recipients=2)
    d.feed(b"MAIL FROM:<a@example.org>\r\n")
    events = d.feed(b"".join(b"RCPT TO:<r%d@example.net>\r\n" % i for i in range(4)))
    assert kinds(events) == ["RcptTo", "RcptTo"]
    assert d.replies()[-2:] == ["452 4.5.3 Too many recipients"] * 2


def test_refused_recipients_do_not_count_and_data_needs_one() -> None:
    def answer(e: Event) -> Reply | None:
        if isinstance(e, RcptTo):
            return Reply(550, "5.1.1", "No such user")
        return accept(e)

    d = greeted(max_recipients=1, answer=answer)
    d.feed(b"MAIL FROM:<a@example.org>\r\n")
    d.feed(b"RCPT TO:<x@example.net>\r\nRCPT TO:<y@example.net>\r\nDATA\r\n")
    assert d.replies()[1:] == [
        "550 5.1.1 No such user",
        "550 5.1.1 No such user",
        "554 5.5.1 No valid recipients",  # RFC 5321 3.3
    ]


# --- Simple commands -----------------------------------------------------------


def test_noop_rset_vrfy_expn_help() -> None:
    d = in_transaction(starttls=True)
    events = d.feed(
        b"NOOP\r\nNOOP anything\r\nRSET\r\nVRFY someone\r\nEXPN list\r\nHELP\r\nHELP MAIL\r\n"
    )
    assert events == [Reset()]
    help_text = "214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP"
    help_text += " STARTTLS"
    assert d.replies() == [
        "250 2.0.0 OK",
        "250 2.0.0 OK",
        "250 2.0.0 OK",
        "252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery",
        "502 5.5.1 EXPN not available",
        help_text,
        help_text,
    ]
    assert d.server.state is State.READY


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (b"RSET now", "501 5.5.4 Syntax: RSET"),
        (b"VRFY", "501 5.5.4 Syntax: VRFY address"),
        (b"DATA now", "501 5.5.4 Syntax: DATA"),
    ],
)
def test_arguments_where_none_belong(line: bytes, reply: str) -> None:
    d = in_transaction()
    d.feed(line + b"\r\n")
    assert d.replies()[-1] == reply
    d = greeted(starttls=True)
    d.feed(b"STARTTLS now\r\n")
    assert d.replies() == ["501 5.5.4 Syntax: STARTTLS"]  # RFC 3207 4


def test_rset_before_helo_is_fine() -> None:
    d = Driver()
    assert d.feed(b"RSET\r\n") == [Reset()]
    assert d.replies() == ["250 2.0.0 OK"]
    assert d.server.state is State.GREETED


def test_quit_closes() -> None:
    d = greeted()
    assert d.feed(b"QUIT\r\nNOOP\r\n") == [Quit(), ConnectionClosed()]
    assert d.replies() == [f"221 2.0.0 {HOST} closing connection"]
    assert d.server.closing
    assert d.server.next_event() == ConnectionClosed()
    d.server.receive_data(b"more")  # ignored once closed
    assert d.server.data_to_send() == b""


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (b"XYZZY", "500 5.5.1 Command unrecognized"),
        (b"", "500 5.5.2 Empty command"),
        (b"   ", "500 5.5.2 Empty command"),
        (b"NOOP\x00", "500 5.5.2 Control character in command"),
        (b"NO\tOP", "500 5.5.2 Control character in command"),
        (b"NOOP\rRSET", "500 5.5.2 Bare <CR> in command"),
        (b"NOOP \xff\xfe", "500 5.5.2 Command is not valid UTF-8"),
    ],
)
def test_unusable_command_lines(line: bytes, reply: str) -> None:
    d = greeted()
    assert d.feed(line + b"\r\n") == []
    assert d.replies() == [reply]


def test_command_words_are_case_insensitive_and_trailing_spaces_ignored() -> None:
    d = Driver()
    assert d.feed(b"eHlO client.example  \r\n") == [Hello("EHLO", "client.example")]
    d.feed(b"noop\r\nrset \r\n")
    assert d.replies()[1:] == ["250 2.0.0 OK", "250 2.0.0 OK"]


def test_http_request_closes_at_once() -> None:
    d = Driver()
    assert d.feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") == [ConnectionClosed()]
    assert d.replies() == [f"421 4.7.0 {HOST} This is an SMTP server; closing"]


def test_bare_lf_command_is_refused_in_reject_mode() -> None:
    d = Driver()
    assert d.feed(b"EHLO client.example\nNOOP\r\n") == []
    assert d.replies() == [
        "500 5.5.2 Bare <LF> received; commands end with <CR><LF>",
        "250 2.0.0 OK",
    ]
    assert d.server.state is State.GREETED  # the EHLO was not run


def test_bare_lf_command_is_accepted_in_normalize_mode() -> None:
    d = Driver(bare_newline="normalize")
    assert d.feed(b"EHLO client.example\nMAIL FROM:<a@example.org>\n") == [
        Hello("EHLO", "client.example"),
        MailFrom("a@example.org"),
    ]


def test_too_many_errors_close_the_session() -> None:
    d = greeted(max_errors=3)
    events = d.feed(b"BAD1\r\nBAD2\r\nBAD3\r\nNOOP\r\n")
    assert events == [ConnectionClosed()]
    assert d.replies() == [
        "500 5.5.1 Command unrecognized",
        "500 5.5.1 Command unrecognized",
        "500 5.5.1 Command unrecognized",
        f"421 4.7.0 {HOST} Error: too many errors",
    ]


def test_long_command_lines() -> None:
    d = greeted()
    # RFC 5321 4.5.3.1.4: 512 octets with the CRLF.
    d.feed(b"NOOP " + b"x" * (MAX_COMMAND_LINE - 7) + b"\r\n")
    d.feed(b"NOOP " + b"x" * (MAX_COMMAND_LINE - 6) + b"\r\n")
    assert d.replies() == ["250 2.0.0 OK", "500 5.5.2 Line too long (RFC 5321 4.5.3.1.4)"]


def test_a_huge_line_is_skipped_not_parsed_and_not_held() -> None:
    d = greeted()
    # A long line whose tail looks like a command must not run that command.
    d.feed(b"X" * 30000)
    assert d.server.bytes_buffered <= MAX_AUTH_LINE
    d.feed(b" QUIT\r\nNOOP\r\n")
    assert d.replies() == ["500 5.5.2 Line too long (RFC 5321 4.5.3.1.4)", "250 2.0.0 OK"]
    assert not d.server.closing


# --- STARTTLS -----------------------------------------------------------------


def test_starttls_discards_pipelined_commands() -> None:
    # RFC 3207 4.2: whatever followed STARTTLS in the clear must not be
    # executed after the handshake (the CVE-2011-0411 class of injection).
    d = greeted(starttls=True)
    events = d.feed(b"STARTTLS\r\nMAIL FROM:<evil@example.org>\r\n")
    assert events == [StartTLS()]
    assert d.replies() == ["220 2.0.0 Ready to start TLS"]
    assert d.server.state is State.TLS_WAIT
    assert d.feed(b"RCPT TO:<victim@example.net>\r\n") == []  # still cleartext: dropped
    assert d.server.bytes_buffered == 0
    d.server.tls_started()
    assert d.server.tls_active and d.server.state is State.GREETED and d.server.helo is None
    assert d.feed(b"MAIL FROM:<a@example.org>\r\n") == []
    assert d.replies() == ["503 5.5.1 Send HELO/EHLO first"]
    assert "STARTTLS" not in ehlo_keywords(d)


def test_starttls_errors() -> None:
    d = greeted()
    d.feed(b"STARTTLS\r\n")
    assert d.replies() == ["502 5.5.1 STARTTLS not available"]
    d = greeted(starttls=True, tls_active=True)
    d.feed(b"STARTTLS\r\n")
    assert d.replies() == ["503 5.5.1 TLS already active"]
    d = in_transaction(starttls=True)
    d.feed(b"STARTTLS\r\n")
    assert d.replies() == ["503 5.5.1 Not permitted during a mail transaction"]
    d = Driver(starttls=True)
    d.feed(b"STARTTLS\r\n")
    assert d.replies() == ["503 5.5.1 Send HELO/EHLO first"]


def test_starttls_refused_by_the_app_keeps_reading_commands() -> None:
    d = greeted(starttls=True, answer=lambda e: Reply(454, "4.7.0", "TLS not available"))
    d.feed(b"STARTTLS\r\nNOOP\r\n")
    assert d.replies() == ["454 4.7.0 TLS not available", "250 2.0.0 OK"]


def test_tls_started_only_after_starttls() -> None:
    d = greeted(starttls=True)
    with pytest.raises(LocalProtocolError, match="tls_started.*ready"):
        d.server.tls_started()


# --- AUTH ---------------------------------------------------------------------


def sasl_app(passwords: dict[str, str]) -> tuple[Driver, list[sasl.Credentials]]:
    """A Driver whose application runs real SASL exchanges."""
    seen: list[sasl.Credentials] = []
    exchange: list[sasl.ServerExchange] = []

    def answer(e: Event) -> Reply | None:
        try:
            if isinstance(e, AuthStart):
                exchange[:] = [sasl.ServerExchange(e.mechanism)]
                result = exchange[0].start(e.initial_response)
            elif isinstance(e, AuthResponse):
                result = exchange[0].respond(e.data)
            else:
                return accept(e)
        except sasl.SASLError as exc:
            return exc.reply
        if isinstance(result, Reply):
            return result
        seen.append(result)
        if passwords.get(result.authcid) == result.password:
            d.identity = result.authcid
            return sasl.AUTH_SUCCEEDED
        return sasl.AUTH_FAILED

    d = greeted(answer=answer, auth_mechanisms=("PLAIN", "LOGIN"), tls_active=True)
    return d, seen


def b64(text: str) -> bytes:
    return base64.b64encode(text.encode())


def test_auth_plain_with_initial_response() -> None:
    d, seen = sasl_app({"alice": "secret"})
    events = d.feed(b"AUTH PLAIN " + b64("\0alice\0secret") + b"\r\n")
    assert events == [AuthStart("PLAIN", b64("\0alice\0secret").decode())]
    assert d.replies() == ["235 2.7.0 Authentication successful"]
    assert d.server.authenticated == "alice"
    assert seen[0].authcid == "alice" and "secret" not in repr(seen[0])
    d.feed(b"AUTH PLAIN " + b64("\0alice\0secret") + b"\r\n")
    assert d.replies() == ["503 5.5.1 Already authenticated"]  # RFC 4954 4


def test_auth_plain_with_empty_challenge() -> None:
    d, _ = sasl_app({"alice": "secret"})
    d.feed(b"AUTH PLAIN\r\n")
    assert parse_replies(bytes(d.out)) == [(334, [""])]
    assert bytes(d.out) == b"334 \r\n"  # RFC 4954 4: "334" and a space
    d.replies()
    d.feed(b64("\0alice\0secret") + b"\r\n")
    assert d.replies() == ["235 2.7.0 Authentication successful"]


def test_auth_login_exchange_and_failure() -> None:
    d, _ = sasl_app({"bob": "hunter2"})
    events = d.feed(b"AUTH LOGIN\r\n" + b64("bob") + b"\r\n" + b64("wrong") + b"\r\n")
    assert kinds(events) == ["AuthStart", "AuthResponse", "AuthResponse"]
    assert d.replies() == [
        "334 VXNlcm5hbWU6",
        "334 UGFzc3dvcmQ6",
        "535 5.7.8 Authentication credentials invalid",
    ]
    assert d.server.authenticated is None and d.server.state is State.READY
    d.feed(b"AUTH LOGIN " + b64("bob") + b"\r\n" + b64("hunter2") + b"\r\n")
    assert d.replies() == ["334 UGFzc3dvcmQ6", "235 2.7.0 Authentication successful"]
    assert d.server.authenticated == "bob"


def test_auth_cancel_and_bad_base64() -> None:
    d, _ = sasl_app({})
    d.feed(b"AUTH LOGIN\r\n*\r\n")
    assert d.replies() == ["334 VXNlcm5hbWU6", "501 5.7.0 Authentication cancelled"]
    d.feed(b"AUTH PLAIN not=base64\r\n")
    assert d.replies() == ["501 5.5.2 Cannot decode the base64 response"]
    assert d.server.state is State.READY


def test_auth_response_too_long() -> None:
    d, _ = sasl_app({})
    d.feed(b"AUTH PLAIN\r\n" + b"A" * (MAX_AUTH_LINE + 10) + b"\r\nNOOP\r\n")
    assert d.replies() == [
        "334 ",
        "500 5.5.6 Authentication exchange line is too long",  # RFC 4954 4
        "250 2.0.0 OK",
    ]


@pytest.mark.parametrize(
    ("config", "line", "reply"),
    [
        ({}, b"AUTH PLAIN", "502 5.5.1 AUTH not available"),
        ({"auth_mechanisms": ("PLAIN",), "starttls": True}, b"AUTH PLAIN",
         "530 5.7.0 Must issue a STARTTLS command first"),  # RFC 3207 4
        ({"auth_mechanisms": ("PLAIN",)}, b"AUTH PLAIN",
         "502 5.5.1 AUTH not available without TLS"),
        ({"auth_mechanisms": ("PLAIN",), "tls_active": True}, b"AUTH CRAM-MD5",
         "504 5.5.4 Unrecognized authentication type"),
        ({"auth_mechanisms": ("PLAIN",), "tls_active": True}, b"AUTH",
         "501 5.5.4 Syntax: AUTH mechanism [initial-response]"),
        ({"auth_mechanisms": ("PLAIN",), "tls_active": True}, b"AUTH PLAIN a b",
         "501 5.5.4 Syntax: AUTH mechanism [initial-response]"),
    ],
)
def test_auth_errors(config: dict[str, object], line: bytes, reply: str) -> None:
    d = greeted(**config)
    assert d.feed(line + b"\r\n") == []
    assert d.replies() == [reply]


def test_auth_inside_a_transaction_is_refused() -> None:
    d = in_transaction(auth_mechanisms=("PLAIN",), tls_active=True)
    d.feed(b"AUTH PLAIN dGVzdAB0ZXN0ADEyMzQ=\r\n")
    assert d.replies() == ["503 5.5.1 Not permitted during a mail transaction"]


def test_starttls_forgets_an_earlier_authentication() -> None:
    d = greeted(auth_mechanisms=("PLAIN",), auth_plaintext=True, starttls=True)
    d.feed(b"AUTH PLAIN dGVzdAB0ZXN0ADEyMzQ=\r\n")
    assert d.server.authenticated == "user@example.org"
    d.feed(b"STARTTLS\r\n")
    d.server.tls_started()
    assert d.server.authenticated is None  # RFC 3207 4.2


# --- Misuse by the application raises ------------------------------------------


def paused_at_mail() -> Driver:
    d = greeted(answer=lambda e: None)
    d.feed(b"MAIL FROM:<a@example.org>\r\nNOOP\r\n")
    assert d.server.next_event() is PAUSED
    return d


def test_pending_event_pauses_pipelined_commands() -> None:
    d = paused_at_mail()
    assert d.replies() == []  # the NOOP waits behind MAIL
    d.server.send(Reply(250, "2.1.0", "ok"))
    assert d.server.next_event() is NEED_DATA
    assert d.server.data_to_send() == b"250 2.1.0 ok\r\n250 2.0.0 OK\r\n"


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (Reply(354, None, "go"), "354 does not fit MailFrom in state ready"),
        (Reply(235, "2.7.0", "ok"), "235 does not fit MailFrom"),
        (Reply(250, "5.1.0", "x"), "does not fit reply 250"),
        (Reply(250, "2.1", "x"), "does not fit reply 250"),
        (Reply(250, None, "a\r\nb"), "control character"),
        (Reply(250, None, "a\tb"), "control character"),
    ],
)
def test_replies_that_do_not_fit_raise(reply: Reply, message: str) -> None:
    d = paused_at_mail()
    with pytest.raises(LocalProtocolError, match=message):
        d.server.send(reply)
    d.server.send(Reply(250, "2.1.0", "ok"))  # the event still awaits its answer


def test_send_without_pending_event_raises() -> None:
    d = greeted()
    with pytest.raises(LocalProtocolError, match="no event awaiting a reply.*ready"):
        d.server.send(Reply(250, "2.0.0", "ok"))
    with pytest.raises(LocalProtocolError, match="auth_succeeded"):
        d.server.auth_succeeded("x", Reply(235, "2.7.0", "ok"))
    with pytest.raises(LocalProtocolError, match="Reply"):
        d.server.send("250 ok")  # type: ignore[arg-type]


def test_send_after_close_and_data_after_eof_raise() -> None:
    d = paused_at_mail()
    d.server.receive_data(b"")
    with pytest.raises(LocalProtocolError, match="after EOF"):
        d.server.receive_data(b"NOOP\r\n")
    d.server.send(Reply(250, "2.1.0", "ok"))
    assert kinds(d.pump()) == ["ConnectionClosed"]
    with pytest.raises(LocalProtocolError, match="closed"):
        d.server.send(Reply(250, "2.0.0", "ok"))


def test_app_may_close_with_any_reply() -> None:
    d = greeted(answer=lambda e: Reply(421, "4.3.2", f"{HOST} shutting down", close=True))
    assert kinds(d.feed(b"MAIL FROM:<a@example.org>\r\nNOOP\r\n")) == [
        "MailFrom",
        "ConnectionClosed",
    ]
    assert d.replies() == [f"421 4.3.2 {HOST} shutting down"]


# --- Timeouts, shutdown and EOF -------------------------------------------------


def test_timeout_and_shutdown() -> None:
    d = greeted()
    d.server.timeout()
    assert d.replies() == [f"421 4.4.2 {HOST} Error: timeout exceeded"]
    assert d.server.closing
    assert d.pump() == [ConnectionClosed()]
    d = greeted()
    d.server.shutdown(f"{HOST} Service shutting down")
    assert d.replies() == [f"421 4.3.2 {HOST} Service shutting down"]
    d.server.timeout()  # already closed: nothing more
    assert d.replies() == []


def test_eof_when_idle_and_with_a_partial_line() -> None:
    d = greeted()
    d.feed(b"NOO")
    assert d.eof() == [ConnectionClosed()]
    assert d.replies() == []
    assert d.server.closing


def test_eof_after_pipelined_commands_still_answers_them() -> None:
    d = greeted()
    events = d.feed(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n")
    events += d.eof()
    assert kinds(events) == ["MailFrom", "RcptTo", "ConnectionClosed"]
    assert len(d.replies()) == 2


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="bare_newline"):
        SMTPServerConfig(hostname=HOST, bare_newline="allow")
    with pytest.raises(ValueError, match="hostname"):
        SMTPServerConfig(hostname="a b")
    with pytest.raises(ValueError, match="hostname"):
        SMTPServerConfig(hostname="mx.example\n421-injected")  # it goes into replies
    with pytest.raises(ValueError, match="limits"):
        SMTPServerConfig(hostname=HOST, max_recipients=0)
    with pytest.raises(ValueError, match="mechanism"):
        SMTPServerConfig(hostname=HOST, auth_mechanisms=("plain",))


def test_needs_reply_is_readable_on_classes_and_events() -> None:
    assert MailFrom.needs_reply and MailFrom("a@b").needs_reply
    assert not Reset.needs_reply and not Reset().needs_reply
    assert DataStart(chunking=False).needs_reply
    assert not DataStart(chunking=True).needs_reply
    assert MessageEnd().needs_reply
