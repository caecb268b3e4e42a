"""The POP3 server core: client bytes in, events and reply bytes out, no sockets."""

from __future__ import annotations

import base64
import hashlib

import pytest

from postroom.protocol.pop3_server import (
    MAX_AUTH_LINE,
    MAX_COMMAND_LINE,
    NEED_DATA,
    PAUSED,
    Apop,
    AuthCancelled,
    AuthResponse,
    AuthStart,
    ConnectionClosed,
    Event,
    LocalProtocolError,
    MessageInfo,
    Pass,
    Pop3Reply,
    POP3Server,
    POP3ServerConfig,
    Retrieve,
    Signal,
    Snapshot,
    StartTLS,
    State,
    Top,
    Update,
    User,
)

PLAIN = POP3ServerConfig(allow_plaintext_auth=True)
MSG1 = b"From: a@example.org\r\nSubject: one\r\n\r\nfirst\r\n.hidden dot\r\n"
MSG2 = b"From: b@example.org\r\nSubject: two\r\n\r\nline 1\r\nline 2\r\nline 3\r\n"
MSG3 = b"Subject: three\r\n\r\nshort\r\n"
DROP = Snapshot.of([(len(MSG1), "uid-1"), (len(MSG2), "uid-2"), (len(MSG3), "uid-3")])
BODIES = {1: MSG1, 2: MSG2, 3: MSG3}


def step(core: POP3Server, data: bytes = b"") -> Event | Signal:
    """Feed bytes (if any) and return the next event."""
    if data:
        core.receive_data(data)
    return core.next_event()


def started(config: POP3ServerConfig = PLAIN) -> POP3Server:
    core = POP3Server(config)
    core.greeting("ready")
    assert core.data_to_send() == b"+OK ready\r\n"
    return core


def logged_in(config: POP3ServerConfig = PLAIN, drop: Snapshot = DROP) -> POP3Server:
    core = started(config)
    assert step(core, b"USER alice\r\n") == User("alice")
    core.ok()
    assert step(core, b"PASS secret\r\n") == Pass("alice", "secret")
    core.login_succeeded(drop)
    core.data_to_send()
    assert core.state is State.TRANSACTION
    return core


def command(core: POP3Server, line: bytes) -> bytes:
    """Send one command the core answers by itself; return its reply bytes."""
    assert step(core, line) in (NEED_DATA, PAUSED) or core.closing
    return core.data_to_send()


def retrieved(core: POP3Server, line: bytes, chunks: list[bytes]) -> bytes:
    event = step(core, line)
    assert isinstance(event, (Retrieve, Top))
    for chunk in chunks:
        core.send_message_chunk(chunk)
    core.end_message()
    return core.data_to_send()


# --------------------------------------------------------------------------- RFC 1939 10


def test_rfc1939_section10_example_session() -> None:
    stamp = "<1896.697170952@dbc.mtview.ca.us>"
    core = POP3Server(POP3ServerConfig(implementation="dewey", apop_timestamp=stamp))
    message1 = b"x" * 118 + b"\r\n"
    message2 = b"y" * 198 + b"\r\n"
    drop = Snapshot.of([(120, "m1"), (200, "m2")])
    core.greeting("POP3 server ready")
    transcript = [core.data_to_send()]

    event = step(core, b"APOP mrose c4c9334bac560ecc979e58001b3e22fb\r\n")
    assert event == Apop("mrose", "c4c9334bac560ecc979e58001b3e22fb")
    # The shared secret of the RFC's example is "tanstaaf".
    assert hashlib.md5(f"{stamp}tanstaaf".encode()).hexdigest() == event.digest
    core.login_succeeded(drop)
    transcript.append(core.data_to_send())
    transcript.append(command(core, b"STAT\r\n"))
    transcript.append(command(core, b"LIST\r\n"))
    transcript.append(retrieved(core, b"RETR 1\r\n", [message1]))
    transcript.append(command(core, b"DELE 1\r\n"))
    transcript.append(retrieved(core, b"RETR 2\r\n", [message2]))
    transcript.append(command(core, b"DELE 2\r\n"))
    assert step(core, b"QUIT\r\n") == Update(((1, "m1"), (2, "m2")))
    core.update_done(True)
    transcript.append(core.data_to_send())

    assert b"".join(transcript) == (
        b"+OK POP3 server ready <1896.697170952@dbc.mtview.ca.us>\r\n"
        b"+OK mrose's maildrop has 2 messages (320 octets)\r\n"
        b"+OK 2 320\r\n"
        b"+OK 2 messages (320 octets)\r\n"
        b"1 120\r\n"
        b"2 200\r\n"
        b".\r\n"
        b"+OK 120 octets\r\n" + message1 + b".\r\n"
        b"+OK message 1 deleted\r\n"
        b"+OK 200 octets\r\n" + message2 + b".\r\n"
        b"+OK message 2 deleted\r\n"
        b"+OK dewey POP3 server signing off (maildrop empty)\r\n"
    )
    assert core.closing
    assert core.next_event() == ConnectionClosed("quit")


# --------------------------------------------------------------------------- feeding


SCRIPT = (
    b"CAPA\r\nUSER alice\r\nPASS secret\r\nSTAT\r\nLIST\r\nUIDL\r\nRETR 1\r\nTOP 2 1\r\n"
    b"DELE 3\r\nLIST 3\r\nRSET\r\nDELE 2\r\nNOOP\r\nbogus\r\nQUIT\r\n"
)


def run_script(chunks: list[bytes]) -> tuple[list[Event], bytes]:
    core = started()
    events: list[Event] = []
    out = [core.data_to_send()]
    for chunk in [*chunks, b""]:
        core.receive_data(chunk)
        while (event := core.next_event()) not in (NEED_DATA, PAUSED):
            assert not isinstance(event, Signal)
            events.append(event)
            if isinstance(event, ConnectionClosed):
                return events, b"".join(out)
            if isinstance(event, User):
                core.ok()
            elif isinstance(event, Pass):
                core.login_succeeded(DROP)
            elif isinstance(event, (Retrieve, Top)):
                core.send_message(BODIES[event.msg_number])
            elif isinstance(event, Update):
                core.update_done(True)
            out.append(core.data_to_send())
    raise AssertionError("session did not end")


def test_byte_at_a_time_equals_one_shot() -> None:
    whole = run_script([SCRIPT])
    bytewise = run_script([SCRIPT[i : i + 1] for i in range(len(SCRIPT))])
    assert bytewise == whole
    events, out = whole
    assert events == [
        User("alice"),
        Pass("alice", "secret"),
        Retrieve(1, "uid-1"),
        Top(2, "uid-2", 1),
        Update(((2, "uid-2"),)),
        ConnectionClosed("quit"),
    ]
    assert out.endswith(b"-ERR unknown command BOGUS\r\n"
                        b"+OK postroom POP3 server signing off (2 messages left)\r\n")


def test_pipelined_commands_answered_in_order() -> None:
    core = started()
    core.receive_data(b"USER alice\r\nPASS secret\r\nSTAT\r\nNOOP\r\nQUIT\r\n")
    assert core.next_event() == User("alice")
    assert core.next_event() is PAUSED  # nothing more until the app answers
    core.ok()
    assert core.next_event() == Pass("alice", "secret")
    core.login_succeeded(DROP)
    assert core.next_event() == Update(())
    core.update_done()
    assert core.data_to_send() == (
        b"+OK send PASS\r\n"
        b"+OK alice's maildrop has 3 messages (%d octets)\r\n"
        b"+OK 3 %d\r\n"
        b"+OK\r\n"
        b"+OK postroom POP3 server signing off (3 messages left)\r\n"
        % (sum(map(len, BODIES.values())), sum(map(len, BODIES.values())))
    )


def test_commands_are_case_insensitive_and_lf_only_lines_accepted() -> None:
    core = logged_in()
    assert command(core, b"stat\r\n") == command(core, b"StAt\n")
    assert command(core, b"list 2\r\n") == b"+OK 2 %d\r\n" % len(MSG2)


def test_eof_before_greeting_and_data_before_greeting_waits() -> None:
    core = POP3Server(PLAIN)
    core.receive_data(b"CAPA\r\n")
    assert core.next_event() is PAUSED
    core.greeting()
    assert core.data_to_send() == b"+OK postroom POP3 server ready\r\n"
    assert core.next_event() is NEED_DATA
    assert b"Capability list follows" in core.data_to_send()
    other = POP3Server()
    other.receive_data(b"")
    assert other.next_event() == ConnectionClosed("eof")


# --------------------------------------------------------------------------- state errors


@pytest.mark.parametrize(
    "line", [b"STAT", b"LIST", b"LIST 1", b"RETR 1", b"DELE 1", b"NOOP", b"RSET",
             b"TOP 1 0", b"UIDL"]
)
def test_transaction_commands_refused_before_login(line: bytes) -> None:
    core = started()
    reply = command(core, line + b"\r\n")
    assert reply == b"-ERR %s is not allowed before login\r\n" % line.split()[0]
    assert core.state is State.AUTHORIZATION


@pytest.mark.parametrize(
    "line", [b"USER bob", b"PASS x", b"APOP bob 0123456789abcdef0123456789abcdef",
             b"AUTH PLAIN", b"STLS"]
)
def test_authorization_commands_refused_after_login(line: bytes) -> None:
    core = logged_in(POP3ServerConfig(allow_plaintext_auth=True, stls=True))
    reply = command(core, line + b"\r\n")
    assert reply == b"-ERR %s is not allowed after login\r\n" % line.split()[0]
    assert core.state is State.TRANSACTION


def test_unknown_and_empty_commands() -> None:
    core = started()
    assert command(core, b"XYZZY\r\n") == b"-ERR unknown command XYZZY\r\n"
    assert command(core, b"\r\n") == b"-ERR unknown command\r\n"
    assert command(core, b"\xff\xfe\r\n") == b"-ERR command is not valid UTF-8\r\n"


def test_pass_needs_user_first_and_failed_pass_forgets_user() -> None:
    core = started()
    assert command(core, b"PASS secret\r\n") == b"-ERR send USER first\r\n"
    assert step(core, b"USER alice\r\n") == User("alice")
    core.ok()
    assert step(core, b"PASS wrong\r\n") == Pass("alice", "wrong")
    core.err("invalid user name or password", "AUTH")
    assert core.data_to_send() == (
        b"+OK send PASS\r\n-ERR [AUTH] invalid user name or password\r\n"
    )
    assert command(core, b"PASS secret\r\n") == b"-ERR send USER first\r\n"


def test_rejected_user() -> None:
    core = started()
    assert step(core, b"USER nobody\r\n") == User("nobody")
    core.err("no such mailbox", "AUTH")
    assert core.data_to_send() == b"-ERR [AUTH] no such mailbox\r\n"
    assert command(core, b"PASS x\r\n") == b"-ERR send USER first\r\n"


def test_pass_keeps_spaces_in_password() -> None:
    core = started()
    step(core, b"USER alice\r\n")
    core.ok()
    assert step(core, b"PASS  two words \r\n") == Pass("alice", " two words ")


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (b"RETR", b"-ERR message number required\r\n"),
        (b"RETR x", b"-ERR not a message number: 'x'\r\n"),
        (b"RETR -1", b"-ERR not a message number: '-1'\r\n"),
        (b"RETR 1 2", b"-ERR not a message number: '1 2'\r\n"),
        (b"RETR 0", b"-ERR no such message, only 3 messages in maildrop\r\n"),
        (b"RETR 4", b"-ERR no such message, only 3 messages in maildrop\r\n"),
        (b"LIST 99", b"-ERR no such message, only 3 messages in maildrop\r\n"),
        (b"DELE +1", b"-ERR not a message number: '+1'\r\n"),
        (b"UIDL \xc2\xb2", b"-ERR not a message number: '\xc2\xb2'\r\n"),
        (b"TOP 1", b"-ERR TOP needs a message number and a line count\r\n"),
        (b"TOP 1 x", b"-ERR not a line count: 'x'\r\n"),
        (b"TOP 9 0", b"-ERR no such message, only 3 messages in maildrop\r\n"),
        (b"STAT 1", b"-ERR STAT takes no arguments\r\n"),
        (b"NOOP 1", b"-ERR NOOP takes no arguments\r\n"),
        (b"RSET 1", b"-ERR RSET takes no arguments\r\n"),
    ],
)
def test_bad_arguments(line: bytes, reply: bytes) -> None:
    core = logged_in()
    assert command(core, line + b"\r\n") == reply


def test_deleted_message_cannot_be_read_listed_or_deleted_again() -> None:
    core = logged_in()
    assert command(core, b"DELE 2\r\n") == b"+OK message 2 deleted\r\n"
    for line in (b"RETR 2", b"TOP 2 0", b"LIST 2", b"UIDL 2", b"DELE 2"):
        assert command(core, line + b"\r\n") == b"-ERR message 2 already deleted\r\n"


def test_too_many_errors_closes_without_update() -> None:
    core = logged_in(POP3ServerConfig(allow_plaintext_auth=True, max_errors=3))
    command(core, b"DELE 1\r\n")
    assert command(core, b"FOO\r\n") == b"-ERR unknown command FOO\r\n"
    assert command(core, b"BAR\r\n") == b"-ERR unknown command BAR\r\n"
    assert command(core, b"BAZ\r\nSTAT\r\n") == (
        b"-ERR unknown command BAZ (too many errors, closing connection)\r\n"
    )
    assert core.closing
    assert core.next_event() == ConnectionClosed("errors")


def test_failed_logins_count_as_errors() -> None:
    core = started(POP3ServerConfig(allow_plaintext_auth=True, max_errors=2))
    for attempt in range(2):
        step(core, b"USER alice\r\n")
        core.ok()
        step(core, b"PASS guess\r\n")
        core.err("invalid user name or password", "AUTH")
        assert core.closing is (attempt == 1)
    assert core.data_to_send().endswith(
        b"-ERR [AUTH] invalid user name or password (too many errors, closing connection)\r\n"
    )
    assert core.next_event() == ConnectionClosed("errors")


# --------------------------------------------------------------------------- line limits


def test_command_line_limit_is_255_octets_with_crlf() -> None:
    core = started()
    fits = b"USER " + b"a" * (MAX_COMMAND_LINE - 7) + b"\r\n"
    assert len(fits) == MAX_COMMAND_LINE
    assert step(core, fits) == User("a" * (MAX_COMMAND_LINE - 7))
    core.err("no")
    core.data_to_send()
    too_long = b"USER " + b"a" * (MAX_COMMAND_LINE - 6) + b"\r\n"
    assert command(core, too_long + b"NOOP\r\n") == (
        b"-ERR command line too long (at most 255 octets)\r\n"
        b"-ERR NOOP is not allowed before login\r\n"
    )


def test_overlong_line_fed_in_pieces_is_answered_once() -> None:
    core = started()
    for _ in range(10):
        core.receive_data(b"x" * 100)
        assert core.next_event() is NEED_DATA
    core.receive_data(b"\r\nCAPA\r\n")
    assert core.next_event() is NEED_DATA
    out = core.data_to_send()
    assert out.startswith(b"-ERR command line too long (at most 255 octets)\r\n+OK Cap")
    assert out.count(b"-ERR") == 1


# --------------------------------------------------------------------------- TRANSACTION


def test_stat_list_uidl_from_snapshot() -> None:
    core = logged_in()
    total = sum(map(len, BODIES.values()))
    assert command(core, b"STAT\r\n") == b"+OK 3 %d\r\n" % total
    assert command(core, b"LIST\r\n") == (
        b"+OK 3 messages (%d octets)\r\n1 %d\r\n2 %d\r\n3 %d\r\n.\r\n"
        % (total, len(MSG1), len(MSG2), len(MSG3))
    )
    assert command(core, b"UIDL\r\n") == (
        b"+OK unique-id listing follows\r\n1 uid-1\r\n2 uid-2\r\n3 uid-3\r\n.\r\n"
    )
    assert command(core, b"UIDL 2\r\n") == b"+OK 2 uid-2\r\n"


def test_dele_then_rset() -> None:
    core = logged_in()
    total = sum(map(len, BODIES.values()))
    assert command(core, b"DELE 1\r\n") == b"+OK message 1 deleted\r\n"
    assert command(core, b"DELE 3\r\n") == b"+OK message 3 deleted\r\n"
    assert command(core, b"STAT\r\n") == b"+OK 1 %d\r\n" % len(MSG2)
    assert command(core, b"LIST\r\n") == b"+OK 1 message (%d octets)\r\n2 %d\r\n.\r\n" % (
        len(MSG2), len(MSG2))
    assert command(core, b"UIDL\r\n") == b"+OK unique-id listing follows\r\n2 uid-2\r\n.\r\n"
    assert command(core, b"RSET\r\n") == b"+OK maildrop has 3 messages (%d octets)\r\n" % total
    assert command(core, b"STAT\r\n") == b"+OK 3 %d\r\n" % total
    assert step(core, b"QUIT\r\n") == Update(())


def test_empty_maildrop() -> None:
    core = logged_in(drop=Snapshot(()))
    assert command(core, b"STAT\r\n") == b"+OK 0 0\r\n"
    assert command(core, b"LIST\r\n") == b"+OK 0 messages (0 octets)\r\n.\r\n"
    assert command(core, b"RETR 1\r\n") == b"-ERR no such message, only 0 messages in maildrop\r\n"


def test_quit_in_transaction_emits_update_and_closes() -> None:
    core = logged_in()
    command(core, b"DELE 3\r\n")
    command(core, b"DELE 1\r\n")
    assert step(core, b"QUIT\r\nSTAT\r\n") == Update(((1, "uid-1"), (3, "uid-3")))
    assert core.state is State.UPDATE
    assert core.next_event() is PAUSED
    core.update_done(True)
    assert core.data_to_send() == b"+OK postroom POP3 server signing off (1 message left)\r\n"
    assert core.next_event() == ConnectionClosed("quit")


def test_update_failure_reports_err() -> None:
    core = logged_in()
    command(core, b"DELE 1\r\n")
    assert isinstance(step(core, b"QUIT\r\n"), Update)
    core.update_done(False)
    assert core.data_to_send() == b"-ERR some deleted messages not removed\r\n"
    assert core.closing


def test_eof_after_dele_is_connection_closed_only() -> None:
    core = logged_in()
    command(core, b"DELE 1\r\n")
    core.receive_data(b"")
    assert core.next_event() == ConnectionClosed("eof")
    assert core.next_event() == ConnectionClosed("eof")
    assert core.data_to_send() == b""
    core.receive_data(b"QUIT\r\n")  # ignored once closed
    assert core.next_event() == ConnectionClosed("eof")


def test_pipelined_quit_before_eof_still_updates() -> None:
    core = logged_in()
    core.receive_data(b"DELE 2\r\nQUIT\r\n")
    core.receive_data(b"")
    assert core.next_event() == Update(((2, "uid-2"),))
    core.update_done()
    assert core.next_event() == ConnectionClosed("quit")


def test_quit_in_authorization() -> None:
    core = started()
    assert core.next_event() is NEED_DATA
    assert step(core, b"QUIT\r\n") == ConnectionClosed("quit")
    assert core.data_to_send() == b"+OK postroom POP3 server signing off\r\n"


def test_timeout_closes_without_reply_or_update() -> None:
    core = logged_in()
    command(core, b"DELE 1\r\n")
    core.timeout()
    assert core.data_to_send() == b""
    assert core.next_event() == ConnectionClosed("timeout")
    core.timeout()  # harmless once closed


# --------------------------------------------------------------------------- RETR / TOP


def test_retr_byte_stuffs_and_terminates() -> None:
    core = logged_in()
    out = retrieved(core, b"RETR 1\r\n", [MSG1])
    assert out == b"+OK %d octets\r\n" % len(MSG1) + MSG1.replace(
        b"\r\n.hidden", b"\r\n..hidden") + b".\r\n"


@pytest.mark.parametrize(
    ("chunks", "body"),
    [
        ([b".first\r\n", b".second\r\n"], b"..first\r\n..second\r\n"),
        ([b"a\r\n", b".b\r\n"], b"a\r\n..b\r\n"),
        ([b"a\r", b"\n.b\r\n"], b"a\r\n..b\r\n"),
        ([b"a\r", b"\n", b".", b"b"], b"a\r\n..b\r\n"),
        ([b"a\n", b".b\n.\n"], b"a\r\n..b\r\n..\r\n"),
        ([b"no line end"], b"no line end\r\n"),
        ([b"ends in cr\r"], b"ends in cr\r\n"),
        # A bare CR is a line end, as everywhere in postroom: RFC 5322 2.3 allows
        # CR only in CRLF, and RFC 1939 3 sends CRLF-terminated lines.
        ([b"bare\rcr\r\n"], b"bare\r\ncr\r\n"),
        ([b"bare\r", b"cr"], b"bare\r\ncr\r\n"),
        ([b".\r\n"], b"..\r\n"),
        ([b"", b""], b""),
        ([], b""),
    ],
)
def test_stuffing_across_chunks(chunks: list[bytes], body: bytes) -> None:
    core = logged_in()
    out = retrieved(core, b"RETR 3\r\n", chunks)
    assert out == b"+OK %d octets\r\n" % len(MSG3) + body + b".\r\n"


def test_large_message_streamed_in_chunks() -> None:
    line = b".x" + b"y" * 75 + b"\n"
    message = line * 20_000
    core = logged_in(drop=Snapshot.of([(len(message) + 20_000, "big")]))
    step(core, b"RETR 1\r\n")
    out = [core.data_to_send()]
    for i in range(0, len(message), 65_536):
        core.send_message_chunk(message[i : i + 65_536])
        out.append(core.data_to_send())
    core.end_message()
    out.append(core.data_to_send())
    body = b"".join(out).split(b"\r\n", 1)[1]
    assert body == (b"." + line.replace(b"\n", b"\r\n")) * 20_000 + b".\r\n"


@pytest.mark.parametrize(
    ("lines", "body"),
    [
        (0, b"From: b@example.org\r\nSubject: two\r\n\r\n"),
        (1, b"From: b@example.org\r\nSubject: two\r\n\r\nline 1\r\n"),
        (2, b"From: b@example.org\r\nSubject: two\r\n\r\nline 1\r\nline 2\r\n"),
        (3, MSG2),
        (50, MSG2),
    ],
)
def test_top(lines: int, body: bytes) -> None:
    core = logged_in()
    event = step(core, b"TOP 2 %d\r\n" % lines)
    assert event == Top(2, "uid-2", lines)
    for i in range(len(MSG2)):  # one byte at a time: the cut works across chunks
        core.send_message_chunk(MSG2[i : i + 1])
    core.end_message()
    assert core.data_to_send() == b"+OK top of message follows\r\n" + body + b".\r\n"


def test_top_tells_app_to_stop_and_handles_odd_messages() -> None:
    core = logged_in()
    step(core, b"TOP 1 0\r\n")
    assert core.wants_more
    core.send_message_chunk(b"Subject: x\n\n.body\n")
    assert not core.wants_more
    core.send_message_chunk(b"more body nobody wants\n")
    core.end_message()
    assert core.data_to_send() == b"+OK top of message follows\r\nSubject: x\r\n\r\n.\r\n"
    # No blank line: the whole message is header. Empty header: the cut starts at once.
    assert retrieved(core, b"TOP 1 0\r\n", [b"Subject: x"]) == (
        b"+OK top of message follows\r\nSubject: x\r\n.\r\n")
    assert retrieved(core, b"TOP 1 1\r\n", [b"\r", b"\n.a\r\nb\r\n"]) == (
        b"+OK top of message follows\r\n\r\n..a\r\n.\r\n")


def test_retrieve_refused_by_app_and_misuse_after_start() -> None:
    core = logged_in()
    assert step(core, b"RETR 2\r\n") == Retrieve(2, "uid-2")
    core.err("message is gone", "SYS/TEMP")
    assert core.data_to_send() == b"-ERR [SYS/TEMP] message is gone\r\n"
    step(core, b"RETR 2\r\n")
    core.send_message_chunk(b"partial")
    with pytest.raises(LocalProtocolError):
        core.err("too late")
    core.end_message()
    assert core.next_event() is NEED_DATA


# --------------------------------------------------------------------------- CAPA / STLS


def capa(core: POP3Server) -> list[bytes]:
    lines = command(core, b"CAPA\r\n").split(b"\r\n")
    assert lines[0] == b"+OK Capability list follows"
    assert lines[-2:] == [b".", b""]
    return lines[1:-2]


def test_capa_before_tls_with_stls() -> None:
    core = started(POP3ServerConfig(stls=True, sasl_mechanisms=("PLAIN", "LOGIN", "SCRAM-SHA-256"),
                                    login_delay=60, expire="NEVER"))
    assert capa(core) == [
        b"TOP", b"UIDL", b"SASL SCRAM-SHA-256", b"STLS", b"RESP-CODES", b"AUTH-RESP-CODE",
        b"PIPELINING", b"LOGIN-DELAY 60", b"EXPIRE NEVER", b"IMPLEMENTATION postroom",
    ]


def test_capa_on_implicit_tls_and_after_login() -> None:
    config = POP3ServerConfig(tls_active=True, stls=True)
    core = started(config)
    expected = [b"TOP", b"UIDL", b"USER", b"SASL PLAIN LOGIN", b"RESP-CODES",
                b"AUTH-RESP-CODE", b"PIPELINING", b"IMPLEMENTATION postroom"]
    assert capa(core) == expected
    assert capa(logged_in(config)) == expected


def test_capa_after_login_without_tls_leaves_out_stls() -> None:
    core = logged_in(POP3ServerConfig(stls=True, allow_plaintext_auth=True))
    assert b"STLS" not in capa(core)
    assert b"USER" in capa(core)


def test_plaintext_refused_before_tls() -> None:
    core = started(POP3ServerConfig(stls=True))
    refusal = b"-ERR [AUTH] Plaintext authentication disallowed without TLS (use STLS)\r\n"
    assert command(core, b"USER alice\r\n") == refusal
    assert command(core, b"PASS secret\r\n") == refusal
    assert command(core, b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n") == refusal
    assert command(core, b"AUTH LOGIN\r\n") == refusal
    no_stls = started(POP3ServerConfig())
    assert command(no_stls, b"USER alice\r\n") == (
        b"-ERR [AUTH] Plaintext authentication disallowed without TLS\r\n")


def test_stls_discards_pipelined_bytes_until_tls_started() -> None:
    core = started(POP3ServerConfig(stls=True))
    assert step(core, b"STLS\r\nUSER mallory\r\n") == StartTLS()
    core.ok()
    assert core.data_to_send() == b"+OK Begin TLS negotiation\r\n"
    assert core.state is State.STARTING_TLS
    assert core.next_event() is PAUSED
    core.receive_data(b"PASS injected\r\n")
    assert core.next_event() is PAUSED
    core.tls_started()
    assert core.tls_active
    assert core.next_event() is NEED_DATA
    assert b"STLS" not in capa(core)
    assert command(core, b"STLS\r\n") == b"-ERR TLS is already active\r\n"
    assert step(core, b"USER alice\r\n") == User("alice")


def test_stls_refusals() -> None:
    assert command(started(POP3ServerConfig()), b"STLS\r\n") == (
        b"-ERR STLS is not available on this port\r\n")
    core = started(POP3ServerConfig(stls=True))
    assert step(core, b"STLS\r\n") == StartTLS()
    core.err("TLS is not configured", "SYS/PERM")
    assert core.data_to_send() == b"-ERR [SYS/PERM] TLS is not configured\r\n"
    assert core.state is State.AUTHORIZATION


def test_utf8_is_not_offered_and_utf8_names_still_log_in() -> None:
    # RFC 6856 is not implemented (see _COMMANDS): neither advertised nor accepted,
    # so no client believes it will get downgraded messages.
    core = started(POP3ServerConfig(allow_plaintext_auth=True))
    assert b"UTF8" not in capa(core)
    assert command(core, b"UTF8\r\n") == b"-ERR unknown command UTF8\r\n"
    assert step(core, "USER jos\u00e9\r\n".encode()) == User("jos\u00e9")
    core.ok()
    core.data_to_send()
    assert step(core, "PASS g\u00fcltig\r\n".encode()) == Pass("jos\u00e9", "g\u00fcltig")
    plain = base64.b64encode("\0jos\u00e9\0g\u00fcltig".encode())
    assert step(started(), b"AUTH PLAIN " + plain + b"\r\n") == AuthStart(
        "PLAIN", "\0jos\u00e9\0g\u00fcltig".encode())


# --------------------------------------------------------------------------- AUTH / APOP


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def test_auth_plain_with_initial_response() -> None:
    core = started()
    event = step(core, b"AUTH PLAIN " + b64(b"\0alice\0secret") + b"\r\n")
    assert event == AuthStart("PLAIN", b"\0alice\0secret")
    core.login_succeeded(DROP)
    assert core.data_to_send().startswith(b"+OK maildrop has 3 messages")
    assert core.state is State.TRANSACTION


def test_auth_plain_with_empty_challenge() -> None:
    core = started()
    assert step(core, b"auth plain\r\n") == AuthStart("PLAIN", None)
    core.auth_challenge()
    assert core.data_to_send() == b"+ \r\n"
    assert core.state is State.SASL
    assert step(core, b64(b"\0alice\0secret") + b"\r\n") == AuthResponse(b"\0alice\0secret")
    core.login_succeeded(DROP, "welcome")
    assert core.data_to_send() == b"+OK welcome\r\n"


def test_auth_login_exchange_and_failure() -> None:
    core = started()
    assert step(core, b"AUTH LOGIN\r\n") == AuthStart("LOGIN", None)
    core.auth_challenge(b"Username:")
    assert step(core, b64(b"alice") + b"\r\n") == AuthResponse(b"alice")
    core.auth_challenge(b"Password:")
    assert step(core, b64(b"wrong") + b"\r\n") == AuthResponse(b"wrong")
    core.err("authentication failed", "AUTH")
    assert core.data_to_send() == (
        b"+ VXNlcm5hbWU6\r\n+ UGFzc3dvcmQ6\r\n-ERR [AUTH] authentication failed\r\n")
    assert core.state is State.AUTHORIZATION
    assert command(core, b"NOOP\r\n") == b"-ERR NOOP is not allowed before login\r\n"


def test_auth_cancel_with_star() -> None:
    core = started()
    step(core, b"AUTH LOGIN\r\n")
    core.auth_challenge(b"Username:")
    core.data_to_send()
    assert step(core, b"*\r\n") == AuthCancelled()
    assert core.data_to_send() == b"-ERR authentication cancelled\r\n"
    assert core.state is State.AUTHORIZATION
    assert core.next_event() is NEED_DATA  # AuthCancelled needs no answer


def test_auth_bad_base64_and_empty_response() -> None:
    core = started()
    step(core, b"AUTH PLAIN\r\n")
    core.auth_challenge()
    assert step(core, b"\r\n") == AuthResponse(b"")
    core.auth_challenge()
    core.data_to_send()
    assert step(core, b"not base64!\r\n") == AuthCancelled()
    assert core.data_to_send() == b"-ERR authentication response is not valid base64\r\n"
    assert command(core, b"AUTH PLAIN %%%\r\n") == (
        b"-ERR initial response is not valid base64\r\n")
    assert step(core, b"AUTH PLAIN =\r\n") == AuthStart("PLAIN", b"")


def test_auth_response_may_exceed_command_limit() -> None:
    core = started(POP3ServerConfig(sasl_mechanisms=("GSSAPI",)))
    assert step(core, b"AUTH GSSAPI\r\n") == AuthStart("GSSAPI", None)
    core.auth_challenge()
    token = bytes(range(256)) * 20
    assert step(core, b64(token) + b"\r\n") == AuthResponse(token)
    core.auth_challenge()
    core.data_to_send()
    assert step(core, b"A" * MAX_AUTH_LINE + b"\r\n") == AuthCancelled()
    assert core.data_to_send() == b"-ERR authentication line too long (at most 8192 octets)\r\n"
    assert core.next_event() is NEED_DATA


def test_auth_mechanism_checks_and_listing() -> None:
    core = started()
    assert command(core, b"AUTH CRAM-MD5\r\n") == (
        b"-ERR unsupported authentication mechanism CRAM-MD5\r\n")
    assert command(core, b"AUTH PLAIN a b\r\n") == (
        b"-ERR AUTH takes a mechanism and at most one initial response\r\n")
    assert command(core, b"AUTH\r\n") == b"+OK SASL mechanisms follow\r\nPLAIN\r\nLOGIN\r\n.\r\n"


def test_apop_needs_timestamp_in_greeting() -> None:
    core = started()
    assert command(core, b"APOP bob 0123456789abcdef0123456789abcdef\r\n") == (
        b"-ERR APOP is not available (the greeting has no timestamp)\r\n")


def test_apop_checks_digest_shape() -> None:
    core = POP3Server(POP3ServerConfig(apop_timestamp="<1.2@host>"))
    core.greeting("hi")
    assert core.data_to_send() == b"+OK hi <1.2@host>\r\n"
    bad = b"-ERR APOP needs a name and a 32-digit hex digest\r\n"
    assert command(core, b"APOP bob\r\n") == bad
    assert command(core, b"APOP bob 0123\r\n") == bad
    assert command(core, b"APOP bob " + b"g" * 32 + b"\r\n") == bad
    assert step(core, b"APOP bob " + b"AB" * 16 + b"\r\n") == Apop("bob", "ab" * 16)
    core.err("permission denied", "AUTH")
    assert core.data_to_send() == b"-ERR [AUTH] permission denied\r\n"


def test_login_refused_with_in_use_and_close() -> None:
    core = started()
    step(core, b"USER alice\r\n")
    core.ok()
    step(core, b"PASS secret\r\n")
    core.err("maildrop is locked by another session", "IN-USE", close=True)
    assert core.data_to_send().endswith(b"-ERR [IN-USE] maildrop is locked by another session\r\n")
    assert core.next_event() == ConnectionClosed("errors")


# --------------------------------------------------------------------------- app misuse


def test_app_misuse_raises_protocol_error() -> None:
    core = POP3Server(PLAIN)
    with pytest.raises(LocalProtocolError, match="GREETING"):
        core.ok()
    with pytest.raises(LocalProtocolError, match="one line"):
        core.greeting("two\nlines")
    assert core.state is State.GREETING  # a refused call changes nothing
    core.greeting()
    with pytest.raises(LocalProtocolError, match="tls_started"):
        core.tls_started()
    with pytest.raises(LocalProtocolError):
        core.greeting()
    step(core, b"USER alice\r\n")
    with pytest.raises(LocalProtocolError, match="login_succeeded.*User"):
        core.login_succeeded(DROP)
    with pytest.raises(LocalProtocolError):
        core.send_message_chunk(b"x")
    with pytest.raises(LocalProtocolError):
        core.update_done()
    with pytest.raises(LocalProtocolError):
        core.err("two\r\nlines")
    with pytest.raises(LocalProtocolError):
        core.err("bad code", "NOT A CODE")
    with pytest.raises(LocalProtocolError):
        core.ok("two\r\nlines")
    core.ok()
    assert core.next_event() is NEED_DATA
    core.receive_data(b"")
    with pytest.raises(LocalProtocolError, match="after EOF"):
        core.receive_data(b"more")


def test_refusing_the_connection_instead_of_greeting() -> None:
    core = POP3Server()
    core.err("too many connections, try later", "SYS/TEMP")
    assert core.data_to_send() == b"-ERR [SYS/TEMP] too many connections, try later\r\n"
    assert core.next_event() == ConnectionClosed("refused")


def test_bad_values_are_refused() -> None:
    with pytest.raises(LocalProtocolError):
        MessageInfo(10, "has space")
    with pytest.raises(LocalProtocolError):
        MessageInfo(10, "x" * 71)
    with pytest.raises(LocalProtocolError):
        MessageInfo(-1, "ok")
    with pytest.raises(LocalProtocolError):
        POP3Server(POP3ServerConfig(apop_timestamp="no brackets"))


def test_reply_value_encoding() -> None:
    assert Pop3Reply(True).to_bytes() == b"+OK\r\n"
    assert Pop3Reply(False, "locked", "IN-USE").to_bytes() == b"-ERR [IN-USE] locked\r\n"
    long = Pop3Reply(False, "\u00e9" * 400).to_bytes()
    assert len(long) <= 512
    long.decode("utf-8")
