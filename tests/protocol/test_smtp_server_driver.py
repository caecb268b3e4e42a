"""A small driver for the SMTP server core, shared by the test_smtp_server* files.

It plays the server layer: feeds bytes, collects events, answers every event
that needs a reply through an `answer` function, and keeps what the core
wrote. `parse_replies` checks the output strictly (RFC 5321 4.2) so that every
test also asserts the core never writes a malformed reply.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

from postroom.protocol.replies import Reply
from postroom.protocol.smtp_server import (
    MAX_REPLY_LINE,
    NEED_DATA,
    PAUSED,
    AuthResponse,
    AuthStart,
    ConnectionClosed,
    DataStart,
    Event,
    Hello,
    MailFrom,
    MessageAborted,
    MessageData,
    MessageEnd,
    RcptTo,
    SMTPServer,
    SMTPServerConfig,
    StartTLS,
)

HOST = "mx.example"
BANNER = Reply(220, None, f"{HOST} ESMTP postroom")

Answer = Callable[[Event], Reply | None]


def accept(event: Event) -> Reply | None:
    """The friendliest application: yes to everything."""
    if isinstance(event, Hello):
        return Reply(250, None, f"{HOST} Hello {event.domain}")
    if isinstance(event, MailFrom):
        return Reply(250, "2.1.0", "Sender ok")
    if isinstance(event, RcptTo):
        return Reply(250, "2.1.5", "Recipient ok")
    if isinstance(event, DataStart):
        return Reply(354, None, "End data with <CR><LF>.<CR><LF>")
    if isinstance(event, MessageEnd):
        return Reply(250, "2.0.0", "Ok: queued as Q1")
    if isinstance(event, StartTLS):
        return Reply(220, "2.0.0", "Ready to start TLS")
    if isinstance(event, AuthStart | AuthResponse):
        return Reply(235, "2.7.0", "Authentication successful")
    raise AssertionError(f"no answer for {event}")


class Driver:
    """Runs one core; `feed` returns the events that input produced."""

    def __init__(
        self,
        config: SMTPServerConfig | None = None,
        *,
        answer: Answer = accept,
        banner: bool = True,
        **config_fields: object,
    ) -> None:
        if config is None:
            config = SMTPServerConfig(hostname=HOST, **config_fields)  # type: ignore[arg-type]
        self.server = SMTPServer(config)
        self.answer = answer
        self.events: list[Event] = []
        self.out = bytearray()
        self.identity = "user@example.org"
        self.banner = b""
        if banner:
            self.server.send(BANNER)
            self.banner = self.server.data_to_send()

    def feed(self, data: bytes) -> list[Event]:
        self.server.receive_data(data)
        return self.pump()

    def eof(self) -> list[Event]:
        return self.feed(b"")

    def pump(self) -> list[Event]:
        """Take events until the core needs data, is paused, or closed."""
        new: list[Event] = []
        server = self.server
        while True:
            event = server.next_event()
            if event is NEED_DATA or event is PAUSED:
                break
            assert isinstance(event, Event)
            new.append(event)
            if isinstance(event, ConnectionClosed):
                break
            if event.needs_reply:
                reply = self.answer(event)
                if reply is None:
                    break  # the test answers it later
                self.reply(event, reply)
        self.out += server.data_to_send()
        self.events += new
        return new

    def reply(self, event: Event, reply: Reply) -> None:
        if isinstance(event, AuthStart | AuthResponse) and 200 <= reply.code < 300:
            self.server.auth_succeeded(self.identity, reply)
        else:
            self.server.send(reply)
        self.out += self.server.data_to_send()

    def replies(self) -> list[str]:
        """The replies written since the last call, each as "code text|text"."""
        self.out += self.server.data_to_send()
        data = bytes(self.out)
        self.out.clear()
        return [format_reply(code, lines) for code, lines in parse_replies(data)]

    def last(self) -> str:
        replies = self.replies()
        assert replies, "the core wrote no reply"
        return replies[-1]


def format_reply(code: int, lines: list[str]) -> str:
    return f"{code} " + "|".join(lines)


_LINE_RE = re.compile(rb"([2-5][0-9][0-9])([ -])([^\r\n]*)\r\n")
_ENHANCED_RE = re.compile(r"([245])\.[0-9]{1,3}\.[0-9]{1,3}(?: |$)")


def parse_replies(data: bytes) -> list[tuple[int, list[str]]]:
    """Split reply bytes into (code, lines), asserting RFC 5321 4.2 syntax.

    Every line is "ddd-" or "ddd " plus text and CRLF, at most 512 octets, with
    no other CR or LF; a multi-line reply repeats its code; an enhanced status
    code, when present, has the reply's class (RFC 3463 2).
    """
    replies: list[tuple[int, list[str]]] = []
    pos = 0
    current: list[str] = []
    code = None
    while pos < len(data):
        m = _LINE_RE.match(data, pos)
        assert m is not None, f"malformed reply line at {pos}: {data[pos:pos + 80]!r}"
        assert m.end() - pos <= MAX_REPLY_LINE, f"reply line over 512 octets: {m.group(0)!r}"
        pos = m.end()
        line_code = int(m.group(1))
        assert code is None or line_code == code, f"code changed inside a reply: {data!r}"
        code = line_code
        text = m.group(3).decode("utf-8")
        e = _ENHANCED_RE.match(text)
        if e is not None:
            assert e.group(1) == str(code)[0], f"enhanced class mismatch: {code} {text}"
        current.append(text)
        if m.group(2) == b" ":
            replies.append((code, current))
            current, code = [], None
    assert not current, f"unfinished multi-line reply: {data!r}"
    return replies


def merged(events: Iterable[Event], *, drop_aborted_data: bool = False) -> list[Event]:
    """Events with consecutive MessageData joined (batching is not behaviour).

    With `drop_aborted_data`, the data of a message that ends in
    MessageAborted is left out: how much of a refused message was streamed
    before the refusal depends on how the bytes were split.
    """
    out: list[Event] = []
    pending: list[Event] = []  # events of the message in progress
    for event in events:
        if isinstance(event, MessageData):
            if pending and isinstance(pending[-1], MessageData):
                pending[-1] = MessageData(pending[-1].data + event.data)
            else:
                pending.append(event)
            continue
        if isinstance(event, MessageAborted) and drop_aborted_data:
            pending = [e for e in pending if not isinstance(e, MessageData)]
        out += pending
        pending = []
        out.append(event)
    return out + pending


def content(events: Iterable[Event]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, MessageData))


def kinds(events: Iterable[Event]) -> list[str]:
    return [type(e).__name__ for e in events]
