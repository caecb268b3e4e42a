"""Property tests of the POP3 server core over random command streams and messages.

Three claims: how the bytes are split never changes what the core does; whatever
the client sends and however the app answers, every reply is well formed and
nothing but LocalProtocolError (for a wrong app call) is raised; and the streamed
RETR/TOP body equals a line-by-line reference of RFC 1939 3 byte-stuffing.
"""

from __future__ import annotations

import base64
import hashlib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postroom.protocol.lines import DotStuffer
from postroom.protocol.pop3_server import (
    NEED_DATA,
    PAUSED,
    Apop,
    AuthCancelled,
    AuthResponse,
    AuthStart,
    ConnectionClosed,
    Event,
    LocalProtocolError,
    Pass,
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

STAMP = "<42.1700000000@pop.example>"
CONFIG = POP3ServerConfig(
    stls=True, allow_plaintext_auth=True, apop_timestamp=STAMP, max_errors=25,
    sasl_mechanisms=("PLAIN", "LOGIN", "X-TEST"),
)
MESSAGES = [
    b"Subject: a\r\n\r\n.dot\r\nbody\r\n",
    b"Subject: b\n\n..two dots\n.\nlast line without end",
    b"no header or body separator\r\n.\r\n",
]
DROP = Snapshot.of([(len(m) + 8, f"u{i}") for i, m in enumerate(MESSAGES, 1)])
GOOD_DIGEST = hashlib.md5(f"{STAMP}secret".encode()).hexdigest()
PLAIN_OK = base64.b64encode(b"\0alice\0secret").decode()

COMMANDS = (
    st.sampled_from([
        "USER alice", "USER nobody", "PASS secret", "PASS wrong", "PASS",
        f"APOP alice {GOOD_DIGEST}", "APOP alice " + "0" * 32, "APOP alice",
        "AUTH", "AUTH PLAIN", f"AUTH PLAIN {PLAIN_OK}", "AUTH PLAIN =", "AUTH LOGIN",
        "AUTH X-TEST", "AUTH CRAM-MD5", "*", PLAIN_OK, "YWxpY2U=", "c2VjcmV0", "!!",
        "STLS", "CAPA", "UTF8", "QUIT", "STAT", "LIST", "LIST 1", "LIST 9", "UIDL",
        "UIDL 2", "RETR 1", "RETR 2", "RETR 3", "TOP 1 0", "TOP 2 1", "TOP 3 5",
        "DELE 1", "DELE 3", "NOOP", "RSET", "", "stat", "list 2", "retr x", "XYZZY",
    ]).map(str.encode)
)
# Mostly commands, some noise, now and then a line past a limit (255 or 8192 octets).
LINES = st.one_of(
    COMMANDS, COMMANDS, COMMANDS, COMMANDS, COMMANDS, COMMANDS,
    st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")),
    st.integers(240, 9000).map(lambda n: b"A" * n),
)
TERMINATORS = st.sampled_from([b"\r\n", b"\r\n", b"\n"])


def deterministic_answer(core: POP3Server, event: Event) -> None:
    """An app whose answers depend only on the event (so runs can be compared)."""
    if isinstance(event, User):
        if event.name == "alice":
            core.ok()
        else:
            core.err("no such mailbox", "AUTH")
    elif isinstance(event, Pass):
        if event.password == "secret":
            core.login_succeeded(DROP)
        else:
            core.err("invalid password", "AUTH")
    elif isinstance(event, Apop):
        if event.digest == GOOD_DIGEST:
            core.login_succeeded(DROP)
        else:
            core.err("invalid digest", "AUTH")
    elif isinstance(event, (AuthStart, AuthResponse)):
        data = event.initial_response if isinstance(event, AuthStart) else event.data
        if data is None or data == b"alice":
            core.auth_challenge(b"next")
        elif data == b"\0alice\0secret":
            core.login_succeeded(DROP)
        else:
            core.err("authentication failed", "AUTH")
    elif isinstance(event, StartTLS):
        # Accepting would make the outcome depend on when the handshake ends.
        core.err("TLS unavailable", "SYS/TEMP")
    elif isinstance(event, (Retrieve, Top)):
        message = MESSAGES[event.msg_number - 1]
        for i in range(0, len(message), 5):
            core.send_message_chunk(message[i : i + 5])
        core.end_message()
    elif isinstance(event, Update):
        core.update_done(True)


def run(chunks: list[bytes]) -> tuple[list[Event], bytes]:
    core = POP3Server(CONFIG)
    core.greeting()
    out = [core.data_to_send()]
    events: list[Event] = []
    for chunk in [*chunks, b""]:
        core.receive_data(chunk)
        while (event := core.next_event()) not in (NEED_DATA, PAUSED):
            assert not isinstance(event, Signal)
            events.append(event)
            if isinstance(event, ConnectionClosed):
                return events, b"".join(out)
            deterministic_answer(core, event)
            out.append(core.data_to_send())
    raise AssertionError("EOF did not end the session")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(LINES, TERMINATORS), max_size=30), st.data())
def test_splitting_never_changes_the_session(
    lines: list[tuple[bytes, bytes]], data: st.DataObject
) -> None:
    stream = b"".join(line + end for line, end in lines)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    pairs = zip([0, *cuts], [*cuts, len(stream)], strict=True)
    chunks = [stream[a:b] for a, b in pairs if b > a]  # b"" would mean EOF
    assert run(chunks) == run([stream])
    assert run(chunks) == run([stream[i : i + 1] for i in range(len(stream))])


# --------------------------------------------------------------------------- reply shapes

MULTILINE = {b"CAPA", b"LIST", b"UIDL", b"AUTH", b"RETR", b"TOP"}


def check_reply(line: bytes, sasl: bool, out: bytes) -> None:
    """`out` is the one reply to `line`: a status line, plus a dot-ended body when the
    command is multi-line and succeeded."""
    assert out.endswith(b"\r\n"), out
    first, _, rest = out.partition(b"\r\n")
    assert first.startswith((b"+OK", b"-ERR", b"+ ")), out
    assert len(first) + 2 <= 512
    words = line.split()
    keyword = words[0].upper() if words else b""
    multi = (
        not sasl
        and first.startswith(b"+OK")
        and keyword in MULTILINE
        and (keyword in (b"RETR", b"TOP") or len(words) == 1)
    )
    if not multi:
        assert rest == b"", out
        return
    body = rest.split(b"\r\n")
    assert body[-2:] == [b".", b""], out
    assert b"." not in body[:-2], out  # a lone "." only ends the body: stuffing worked


@st.composite
def app_choice(draw: st.DrawFn, event: Event) -> str:
    """Which answer the random app gives this event."""
    options = {
        User: ["ok", "ok", "err"],
        Pass: ["login", "login", "login", "err", "err_close"],
        Apop: ["login", "err"],
        AuthStart: ["login", "err", "challenge"],
        AuthResponse: ["login", "err", "challenge"],
        StartTLS: ["ok", "err"],
        Retrieve: ["stream", "stream", "err"],
        Top: ["stream", "stream", "err"],
        Update: ["done", "failed"],
    }[type(event)]
    return draw(st.sampled_from(options))


def send_chunk(core: POP3Server) -> None:
    core.send_message_chunk(b"x")


WRONG_CALLS = [
    lambda c: c.ok(),
    lambda c: c.login_succeeded(DROP),
    lambda c: c.auth_challenge(b"x"),
    send_chunk,
    lambda c: c.end_message(),
    lambda c: c.update_done(),
    lambda c: c.tls_started(),
    lambda c: c.greeting(),
    lambda c: c.err("bad\nline"),
]


def answer_randomly(core: POP3Server, event: Event, data: st.DataObject) -> None:
    # Any wrong call may come first: it must raise LocalProtocolError and send nothing.
    if data.draw(st.integers(0, 3)) == 3:
        wrong = data.draw(st.sampled_from(range(len(WRONG_CALLS))))
        try:
            WRONG_CALLS[wrong](core)
        except LocalProtocolError:
            assert core.data_to_send() == b""
        else:  # that call happened to fit the event: it was (part of) the answer
            if WRONG_CALLS[wrong] is send_chunk:
                core.end_message()
            return
    choice = data.draw(app_choice(event))
    if choice == "ok":
        core.ok()
    elif choice == "err":
        core.err("refused", data.draw(st.sampled_from([None, "AUTH", "SYS/TEMP"])))
    elif choice == "err_close":
        core.err("locked", "IN-USE", close=True)
    elif choice == "login":
        core.login_succeeded(DROP)
    elif choice == "challenge":
        core.auth_challenge(data.draw(st.binary(max_size=20)))
    elif choice == "stream":
        message = data.draw(st.sampled_from(MESSAGES) | st.binary(max_size=60))
        cuts = sorted(data.draw(st.lists(st.integers(0, len(message)), max_size=4)))
        for a, b in zip([0, *cuts], [*cuts, len(message)], strict=True):
            core.send_message_chunk(message[a:b])
        core.end_message()
    elif choice == "done":
        core.update_done(True)
    else:
        core.update_done(False)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from([True, True, False]),
    st.lists(st.tuples(LINES, TERMINATORS), max_size=25),
    st.data(),
)
def test_any_client_and_app_get_well_formed_replies(
    login_first: bool, lines: list[tuple[bytes, bytes]], data: st.DataObject
) -> None:
    if login_first:  # random streams seldom log in by themselves
        lines = [(b"USER alice", b"\r\n"), (b"PASS secret", b"\r\n"), *lines]
    core = POP3Server(CONFIG)
    core.greeting()
    assert core.data_to_send().startswith(b"+OK ")
    for line, end in lines:
        if core.state is State.STARTING_TLS and data.draw(st.booleans()):
            core.tls_started()
        if data.draw(st.integers(0, 40)) == 0:
            core.timeout()
        sasl = core.state is State.SASL
        discarded = core.state in (State.STARTING_TLS, State.CLOSED)
        raw = line + end
        pieces = data.draw(st.integers(1, 3))
        size = max(1, len(raw) // pieces)
        out = b""
        for i in range(0, len(raw), size):
            core.receive_data(raw[i : i + size])
            while (event := core.next_event()) not in (NEED_DATA, PAUSED):
                assert not isinstance(event, Signal)
                if isinstance(event, (AuthCancelled, ConnectionClosed)):
                    break
                out += core.data_to_send()  # an event's command has no reply yet
                assert out == b""
                answer_randomly(core, event, data)
            out += core.data_to_send()
        if discarded:
            assert out == b""
        else:
            check_reply(line, sasl, out)
    core.receive_data(b"")
    while (event := core.next_event()) is not PAUSED:
        if isinstance(event, ConnectionClosed):
            break
        assert not isinstance(event, Signal)
        answer_randomly(core, event, data)
    else:
        assert core.state is State.STARTING_TLS  # EOF ends it once the app looks again
        core.timeout()
    assert core.closing


# --------------------------------------------------------------------------- message bodies


def reference_body(message: bytes, top: int | None) -> bytes:
    """RFC 1939 3 and 7 line by line: CRLF ends (a bare CR or LF is a line end, RFC 5322
    2.3), stuffed dots, TOP's cut, "." line."""
    text = message.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    lines = text.split(b"\r\n")
    if lines[-1] == b"":
        lines.pop()
    if top is not None and b"" in lines:
        blank = lines.index(b"")
        lines = lines[: blank + 1 + top]
    return b"".join((b"." + ln if ln.startswith(b".") else ln) + b"\r\n" for ln in lines) + (
        b".\r\n"
    )


MESSAGE_BYTES = st.lists(
    st.sampled_from([b"a", b"b", b".", b"..", b"\r", b"\n", b"\r\n", b"\n\n", b"\r\n.\r\n"]),
    max_size=40,
).map(b"".join)


@settings(max_examples=300, deadline=None)
@given(MESSAGE_BYTES, st.none() | st.integers(0, 6), st.data())
def test_streamed_body_matches_line_by_line_reference(
    message: bytes, top: int | None, data: st.DataObject
) -> None:
    core = POP3Server(CONFIG)
    core.greeting()
    core.receive_data(b"USER alice\r\n")
    core.next_event()
    core.ok()
    core.receive_data(b"PASS secret\r\n")
    core.next_event()
    core.login_succeeded(DROP)
    core.data_to_send()
    core.receive_data(b"RETR 1\r\n" if top is None else b"TOP 1 %d\r\n" % top)
    assert isinstance(core.next_event(), (Retrieve, Top))
    # crlf=True is the caller's word that no CR or LF is bare (a Maildir name with W=
    # equal to S=): for such messages it must not change a single byte of what is sent.
    crlf = data.draw(st.booleans())
    if crlf:
        message = message.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    cuts = sorted(data.draw(st.lists(st.integers(0, len(message)), max_size=8)))
    out = []
    for a, b in zip([0, *cuts], [*cuts, len(message)], strict=True):
        core.send_message_chunk(message[a:b], crlf=crlf)
        out.append(core.data_to_send())
    core.end_message()
    out.append(core.data_to_send())
    status, _, body = b"".join(out).partition(b"\r\n")
    assert status.startswith(b"+OK")
    assert body == reference_body(message, top)


@settings(max_examples=200, deadline=None)
@given(MESSAGE_BYTES)
def test_retr_sends_a_message_as_smtp_data_does(message: bytes) -> None:
    """One dot-stuffer for both protocols: RETR's body is what the SMTP client sends
    after DATA, bare CRs and LFs included (each a line end)."""
    core = POP3Server(CONFIG)
    core.greeting()
    core.receive_data(b"USER alice\r\n")
    core.next_event()
    core.ok()
    core.receive_data(b"PASS secret\r\n")
    core.next_event()
    core.login_succeeded(DROP)
    core.data_to_send()
    core.receive_data(b"RETR 1\r\n")
    assert isinstance(core.next_event(), Retrieve)
    core.send_message(message)
    stuffer = DotStuffer()
    assert core.data_to_send().partition(b"\r\n")[2] == stuffer.feed(message) + stuffer.end()
