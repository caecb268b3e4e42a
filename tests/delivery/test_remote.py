"""The remote courier: hop order, outcomes per recipient, DSN hints and idle sessions.

Most tests replace the SMTP client session with a scripted fake (each hop's
behaviour is a table entry) and the router with a fixed answer. The last ones
deliver for real over loopback: to aiosmtpd, and to a postroom receiving host,
with the next hop found through a static route.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest

from message_content import content_of
from postroom.config import Endpoint, Route
from postroom.delivery import remote
from postroom.delivery.remote import RemoteCourier
from postroom.delivery.routing import Failure, Hops, Local, Router, RouteResult, RouterOptions
from postroom.delivery.smtp_errors import SMTPError
from postroom.delivery.smtp_out import Hop, OutRecipient, TransactionResult
from postroom.protocol.replies import Reply
from postroom.queue.content import Content
from postroom.queue.envelope import Envelope, Recipient
from postroom.queue.result import DeliveryResult

MESSAGE = b"From: a@corp.example\r\nTo: b@isp.example\r\nSubject: hi\r\n\r\nHello.\r\n"
OK = Reply(250, "2.0.0", "Ok: queued")
MX1 = Hop(host="192.0.2.1", port=25, name="mx1.isp.example")
MX2 = Hop(host="192.0.2.2", port=25, name="mx2.isp.example")
MX3 = Hop(host="192.0.2.3", port=25, name="mx3.isp.example")


def smtp_error(
    text: str, *, temporary: bool, reply: Reply | None = None, status: str | None = None
) -> SMTPError:
    return SMTPError(text, temporary=temporary, reply=reply, status=status)


# -- the fakes --------------------------------------------------------------------


@dataclass
class Behaviour:
    """How one fake host acts: fail to connect, fail a transaction, or answer with replies."""

    connect_error: BaseException | None = None
    send_errors: list[BaseException] = field(default_factory=list)  # raised by the next sends
    replies: dict[str, Reply] = field(default_factory=dict)  # RCPT refusals by address
    data_reply: Reply = OK
    dsn: bool = True


@dataclass
class Sent:
    hop: Hop
    kwargs: dict[str, Any]


class FakeNet:
    """Every fake host by address, and a log of what the courier did to them."""

    def __init__(self) -> None:
        self.hosts: dict[str, Behaviour] = {}
        self.connects: list[Hop] = []
        self.sent: list[Sent] = []
        self.quits: list[Hop] = []

    def behaviour(self, hop: Hop) -> Behaviour:
        return self.hosts.setdefault(hop.host, Behaviour())


class FakeSession:
    net: FakeNet  # set by the fixture

    def __init__(self, hop: Hop) -> None:
        self.hop = hop
        self.peer = f"{hop.name}[{hop.host}]:{hop.port}"
        self.closed = False

    @classmethod
    async def connect(
        cls, hop: Hop, *, helo: str, tls_context: ssl.SSLContext, connect_timeout: float = 30,
        command_timeout: float = 300,
    ) -> FakeSession:
        assert helo == "out.corp.example"
        await asyncio.sleep(0)  # a real connect yields to other deliveries
        cls.net.connects.append(hop)
        behaviour = cls.net.behaviour(hop)
        if behaviour.connect_error is not None:
            raise behaviour.connect_error
        return cls(hop)

    async def send(
        self, *, sender: str, recipients: list[OutRecipient], message: IO[bytes], size: int,
        body: str | None = None, smtputf8: bool = False, ret: str | None = None,
        envid: str | None = None,
    ) -> TransactionResult:
        assert not self.closed, "send on a session that was closed"
        assert len(message.read()) == size  # each hop reads the whole message
        behaviour = self.net.behaviour(self.hop)
        self.net.sent.append(Sent(self.hop, dict(
            sender=sender, recipients=recipients, size=size, body=body, smtputf8=smtputf8,
            ret=ret, envid=envid,
        )))
        if behaviour.send_errors:
            error = behaviour.send_errors.pop(0)
            # Like the real session: only a refusal made before sending keeps it open.
            self.closed = not isinstance(error, SMTPError) or error.temporary
            raise error
        replies: dict[str, Reply] = {}
        accepted = []
        for r in recipients:
            if r.address in behaviour.replies:
                replies[r.address] = behaviour.replies[r.address]
            else:
                accepted.append(r.address)
        data_reply = behaviour.data_reply if accepted else None
        for address in accepted:
            assert data_reply is not None
            replies[address] = data_reply
        return TransactionResult(
            recipients=replies, data_reply=data_reply, dsn_offered=behaviour.dsn
        )

    async def quit(self) -> None:
        if not self.closed:
            self.closed = True
            self.net.quits.append(self.hop)


class FixedRouter:
    def __init__(self, answers: dict[str, RouteResult]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    async def route(self, domain: str) -> RouteResult:
        self.asked.append(domain)
        return self.answers[domain]


@pytest.fixture
def net(monkeypatch: pytest.MonkeyPatch) -> FakeNet:
    fake = FakeNet()
    session_class = type("Session", (FakeSession,), {"net": fake})
    monkeypatch.setattr(remote, "ClientSession", session_class)
    return fake


@pytest.fixture
def message(tmp_path: Path) -> Iterator[Content]:
    path = tmp_path / "message"
    path.write_bytes(MESSAGE)
    with content_of(path) as content:
        yield content


def make_courier(answers: dict[str, RouteResult], **options: Any) -> RemoteCourier:
    return RemoteCourier(
        FixedRouter(answers),  # type: ignore[arg-type]
        "out.corp.example",
        ssl.create_default_context(),
        **options,
    )


def envelope(*recipients: Recipient | str, **fields: Any) -> Envelope:
    rcpts = [r if isinstance(r, Recipient) else Recipient(r) for r in recipients]
    return Envelope(queue_id="Q1", sender="a@corp.example", recipients=rcpts, created=0.0,
                    **fields)


def run_deliveries(
    courier: RemoteCourier, message: Content, *envelopes: Envelope
) -> list[list[DeliveryResult]]:
    async def main() -> list[list[DeliveryResult]]:
        results = [await courier.deliver(e, e.recipients, message) for e in envelopes]
        await courier.close()
        return results

    return asyncio.run(main())


def deliver_one(courier: RemoteCourier, message: Content, env: Envelope) -> list[DeliveryResult]:
    return run_deliveries(courier, message, env)[0]


def outcomes(results: list[DeliveryResult]) -> list[tuple[str, str, str]]:
    return [(r.recipient, r.outcome, r.dsn_status) for r in results]


# -- routing answers -----------------------------------------------------------------


def test_route_failure_is_every_recipients_outcome(net: FakeNet, message: Content) -> None:
    courier = make_courier({
        "gone.example": Failure(True, "5.1.2", "domain gone.example does not exist"),
        "flaky.example": Failure(False, "4.4.3", "DNS lookup failed"),
    })
    results = deliver_one(
        courier, message, envelope("a@gone.example", "b@gone.example", "c@flaky.example")
    )
    assert outcomes(results) == [
        ("a@gone.example", "permanent", "5.1.2"),
        ("b@gone.example", "permanent", "5.1.2"),
        ("c@flaky.example", "temporary", "4.4.3"),
    ]
    assert results[0].text == "domain gone.example does not exist"
    assert net.connects == []


def test_local_route_is_not_delivered_by_smtp(net: FakeNet, message: Content) -> None:
    courier = make_courier({"corp.example": Local()})
    [result] = deliver_one(courier, message, envelope("boss@corp.example"))
    assert (result.outcome, result.dsn_status) == ("temporary", "4.3.5")
    assert net.connects == []


# -- hops in order ---------------------------------------------------------------------


def test_unreachable_hop_passes_to_the_next(net: FakeNet, message: Content) -> None:
    net.behaviour(MX1).connect_error = ConnectionRefusedError(111, "Connection refused")
    courier = make_courier({"isp.example": Hops([MX1, MX2, MX3])})
    [result] = deliver_one(courier, message, envelope("b@isp.example"))
    assert result == DeliveryResult(
        "b@isp.example", "delivered", "2.0.0", "250 2.0.0 Ok: queued",
        "mx2.isp.example[192.0.2.2]:25",
    )
    assert net.connects == [MX1, MX2]


def test_all_hops_failing_is_temporary_with_the_last_error(
    net: FakeNet, message: Content
) -> None:
    net.behaviour(MX1).connect_error = smtp_error(
        "connect to mx1.isp.example[192.0.2.1]:25: timed out after 30s", temporary=True,
        status="4.4.1",
    )
    net.behaviour(MX2).connect_error = smtp_error(
        "connect to mx2.isp.example[192.0.2.2]:25: Connection refused", temporary=True,
        status="4.4.1",
    )
    courier = make_courier({"isp.example": Hops([MX1, MX2])})
    [result] = deliver_one(courier, message, envelope("b@isp.example"))
    assert result == DeliveryResult(
        "b@isp.example", "temporary", "4.4.1",
        "connect to mx2.isp.example[192.0.2.2]:25: Connection refused",
    )
    # Errors the session does not wrap are described the same way.
    net.behaviour(MX1).connect_error = TimeoutError()
    net.behaviour(MX2).connect_error = ConnectionRefusedError(111, "Connection refused")
    [result] = deliver_one(courier, message, envelope("b@isp.example"))
    assert (result.outcome, result.dsn_status) == ("temporary", "4.4.1")
    assert result.text == "connect to mx2.isp.example[192.0.2.2]:25: connection refused"
    net.behaviour(MX1).connect_error = ConnectionRefusedError(111, "Connection refused")
    net.behaviour(MX2).connect_error = TimeoutError()
    [result] = deliver_one(courier, message, envelope("b@isp.example"))
    assert result.text == "connect to mx2.isp.example[192.0.2.2]:25: timed out"


def test_refusing_greetings_pass_to_the_next_hop(net: FakeNet, message: Content) -> None:
    busy = Reply(421, "4.3.2", "mx1 busy, try later")
    net.behaviour(MX1).connect_error = smtp_error(str(busy), temporary=True, reply=busy)
    refused = Reply(554, "5.7.1", "no SMTP service here")
    net.behaviour(MX2).connect_error = smtp_error(str(refused), temporary=False, reply=refused)
    courier = make_courier({"isp.example": Hops([MX1, MX2, MX3])})
    [result] = deliver_one(courier, message, envelope("b@isp.example"))
    assert result.outcome == "delivered"
    assert net.connects == [MX1, MX2, MX3]


def test_a_5xx_greeting_from_the_last_hop_is_still_temporary(
    net: FakeNet, message: Content
) -> None:
    refused = Reply(554, "5.7.1", "no SMTP service here")
    net.behaviour(MX1).connect_error = smtp_error(str(refused), temporary=False, reply=refused)
    courier = make_courier({"isp.example": Hops([MX1])})
    [result] = deliver_one(courier, message, envelope("b@isp.example"))
    assert (result.outcome, result.dsn_status) == ("temporary", "4.7.1")
    assert "554 5.7.1 no SMTP service here" in result.text
    assert result.remote_mta == "mx1.isp.example[192.0.2.1]:25"


def test_temporary_transaction_errors_pass_to_the_next_hop(
    net: FakeNet, message: Content
) -> None:
    shutting = Reply(421, "4.4.2", "shutting down")
    net.behaviour(MX1).send_errors = [smtp_error("421", temporary=True, reply=shutting)]
    net.behaviour(MX2).send_errors = [ConnectionResetError(104, "Connection reset by peer")]
    courier = make_courier({"isp.example": Hops([MX1, MX2, MX3])})
    [result] = deliver_one(courier, message, envelope("b@isp.example"))
    assert result.outcome == "delivered"
    assert [s.hop for s in net.sent] == [MX1, MX2, MX3]
    assert net.quits == [MX3]  # broken sessions are gone; the good one was kept till close()

    net.sent.clear()
    net.behaviour(MX1).send_errors = [ConnectionResetError(104, "Connection reset by peer")]
    net.behaviour(MX3).send_errors = [smtp_error("lost", temporary=True, status="4.4.2")]
    net.behaviour(MX2).send_errors = [TimeoutError()]
    courier = make_courier({"isp.example": Hops([MX1, MX2, MX3])})
    [result] = deliver_one(courier, message, envelope("b@isp.example"))
    assert (result.outcome, result.dsn_status) == ("temporary", "4.4.2")
    assert result.text == "lost"

    net.behaviour(MX1).send_errors = [asyncio.IncompleteReadError(b"", 3)]
    courier = make_courier({"isp.example": Hops([MX1])})
    [result] = deliver_one(courier, message, envelope("b@isp.example"))
    assert result.text == (
        "lost connection with mx1.isp.example[192.0.2.1]:25: connection closed by the server"
    )


def test_permanent_transaction_error_fails_everyone_without_trying_more_hops(
    net: FakeNet, message: Content
) -> None:
    net.behaviour(MX1).send_errors = [smtp_error(
        "message size 70 exceeds size limit 50 of server mx1.isp.example[192.0.2.1]:25",
        temporary=False, status="5.3.4",
    )]
    courier = make_courier({"isp.example": Hops([MX1, MX2])})
    results = deliver_one(courier, message, envelope("b@isp.example", "c@isp.example"))
    assert outcomes(results) == [
        ("b@isp.example", "permanent", "5.3.4"),
        ("c@isp.example", "permanent", "5.3.4"),
    ]
    assert results[0].text == (
        "message size 70 exceeds size limit 50 of server mx1.isp.example[192.0.2.1]:25"
    )
    assert results[0].remote_mta == "mx1.isp.example[192.0.2.1]:25"
    assert net.connects == [MX1]
    assert net.quits == [MX1]  # kept for the next message, then closed by close()


# -- replies per recipient -------------------------------------------------------------


def test_one_transaction_with_a_reply_per_recipient(net: FakeNet, message: Content) -> None:
    net.behaviour(MX1).replies = {
        "gone@isp.example": Reply(550, "5.1.1", "no such user"),
        "full@isp.example": Reply(452, "4.2.2", "mailbox full"),
        "odd@isp.example": Reply(550, None, "go away"),
        "mixed@isp.example": Reply(451, "5.7.1", "class mismatch"),
    }
    courier = make_courier({"isp.example": Hops([MX1])})
    env = envelope(
        Recipient("b@isp.example", notify=("FAILURE",), orcpt="rfc822;b@isp.example"),
        "gone@isp.example", "full@isp.example", "odd@isp.example", "mixed@isp.example",
        body="8BITMIME", ret="HDRS", envid="QQ1", smtputf8=False,
    )
    results = deliver_one(courier, message, env)
    assert outcomes(results) == [
        ("b@isp.example", "delivered", "2.0.0"),
        ("gone@isp.example", "permanent", "5.1.1"),
        ("full@isp.example", "temporary", "4.2.2"),
        ("odd@isp.example", "permanent", "5.0.0"),
        ("mixed@isp.example", "temporary", "4.0.0"),
    ]
    assert results[1].text == "550 5.1.1 no such user"
    assert {r.remote_mta for r in results} == {"mx1.isp.example[192.0.2.1]:25"}
    [sent] = net.sent
    assert sent.kwargs["sender"] == "a@corp.example"
    assert sent.kwargs["recipients"][0] == OutRecipient(
        "b@isp.example", ("FAILURE",), "rfc822;b@isp.example"
    )
    assert len(sent.kwargs["recipients"]) == 5
    assert (sent.kwargs["body"], sent.kwargs["ret"], sent.kwargs["envid"]) == (
        "8BITMIME", "HDRS", "QQ1",
    )
    assert sent.kwargs["size"] == len(MESSAGE)


@pytest.mark.parametrize(
    ("data_reply", "outcome", "status"),
    [
        (Reply(452, "4.3.1", "insufficient storage"), "temporary", "4.3.1"),
        (Reply(554, "5.6.0", "content rejected"), "permanent", "5.6.0"),
    ],
)
def test_data_reply_decides_for_every_accepted_recipient(
    net: FakeNet, message: Content, data_reply: Reply, outcome: str, status: str
) -> None:
    net.behaviour(MX1).data_reply = data_reply
    net.behaviour(MX1).replies = {"gone@isp.example": Reply(550, "5.1.1", "no such user")}
    courier = make_courier({"isp.example": Hops([MX1, MX2])})
    results = deliver_one(courier, message, envelope("b@isp.example", "gone@isp.example",
                                                     "c@isp.example"))
    assert outcomes(results) == [
        ("b@isp.example", outcome, status),
        ("gone@isp.example", "permanent", "5.1.1"),
        ("c@isp.example", outcome, status),
    ]
    assert results[0].text == str(data_reply)
    assert net.connects == [MX1]  # a decided transaction is not tried elsewhere


def test_relayed_without_dsn_when_success_was_asked_of_a_hop_without_dsn(
    net: FakeNet, message: Content
) -> None:
    env = envelope(
        Recipient("s@isp.example", notify=("SUCCESS", "FAILURE")),
        Recipient("f@isp.example", notify=("FAILURE",)),
        Recipient("n@isp.example"),
    )
    net.behaviour(MX1).dsn = False
    courier = make_courier({"isp.example": Hops([MX1])})
    results = deliver_one(courier, message, env)
    assert [r.relayed_without_dsn for r in results] == [True, False, False]
    net.behaviour(MX1).dsn = True
    results = deliver_one(courier, message, env)
    assert [r.relayed_without_dsn for r in results] == [False, False, False]


def test_several_domains_in_one_call_keep_their_order(net: FakeNet, message: Content) -> None:
    other = Hop(host="198.51.100.7", port=25, name="mx.other.example")
    courier = make_courier({"isp.example": Hops([MX1]), "other.example": Hops([other])})
    results = deliver_one(
        courier, message, envelope("a@isp.example", "b@other.example", "c@isp.example")
    )
    assert [(r.recipient, r.remote_mta) for r in results] == [
        ("a@isp.example", "mx1.isp.example[192.0.2.1]:25"),
        ("b@other.example", "mx.other.example[198.51.100.7]:25"),
        ("c@isp.example", "mx1.isp.example[192.0.2.1]:25"),
    ]
    assert sorted(len(s.kwargs["recipients"]) for s in net.sent) == [1, 2]


# -- idle sessions -------------------------------------------------------------------


def test_next_message_reuses_the_idle_session(net: FakeNet, message: Content) -> None:
    courier = make_courier({"isp.example": Hops([MX1, MX2])})

    async def main() -> list[DeliveryResult]:
        first = await courier.deliver(envelope("a@isp.example"), [Recipient("a@isp.example")],
                                      message)
        second = await courier.deliver(envelope("b@isp.example"),
                                       [Recipient("b@isp.example")], message)
        assert net.quits == []
        await courier.close()
        return first + second

    results = asyncio.run(main())
    assert [r.outcome for r in results] == ["delivered", "delivered"]
    assert net.connects == [MX1]
    assert len(net.sent) == 2
    assert net.quits == [MX1]


def test_idle_session_is_closed_after_the_idle_timeout(net: FakeNet, message: Content) -> None:
    courier = make_courier({"isp.example": Hops([MX1])}, idle_timeout=0.05)

    async def main() -> None:
        await courier.deliver(envelope("a@isp.example"), [Recipient("a@isp.example")], message)
        assert net.quits == []
        for _ in range(100):
            await asyncio.sleep(0.02)
            if net.quits:
                break
        await courier.deliver(envelope("b@isp.example"), [Recipient("b@isp.example")], message)
        await courier.close()

    asyncio.run(main())
    assert net.connects == [MX1, MX1]
    assert net.quits == [MX1, MX1]


def test_stale_idle_session_is_replaced_by_a_fresh_one(net: FakeNet, message: Content) -> None:
    courier = make_courier({"isp.example": Hops([MX1])})

    async def main() -> list[DeliveryResult]:
        await courier.deliver(envelope("a@isp.example"), [Recipient("a@isp.example")], message)
        # The server closed the connection while it sat idle.
        net.behaviour(MX1).send_errors = [smtp_error("connection closed", temporary=True)]
        results = await courier.deliver(
            envelope("b@isp.example"), [Recipient("b@isp.example")], message
        )
        await courier.close()
        return results

    [result] = asyncio.run(main())
    assert result.outcome == "delivered"
    assert net.connects == [MX1, MX1]


def test_idle_sessions_per_domain_are_capped(net: FakeNet, message: Content) -> None:
    courier = make_courier({"isp.example": Hops([MX1])}, max_idle_sessions_per_domain=2)

    async def main() -> None:
        await asyncio.gather(*(
            courier.deliver(envelope(f"u{i}@isp.example"), [Recipient(f"u{i}@isp.example")],
                            message)
            for i in range(4)
        ))
        await asyncio.sleep(0)  # let the background QUITs run
        assert len(net.connects) == 4
        assert len(net.quits) == 2  # two kept, two closed
        await courier.close()

    asyncio.run(main())
    assert len(net.quits) == 4


def test_session_whose_recipients_were_all_refused_is_reused(
    net: FakeNet, message: Content
) -> None:
    net.behaviour(MX1).replies = {"gone@isp.example": Reply(550, "5.1.1", "no such user")}
    courier = make_courier({"isp.example": Hops([MX1])})
    results = run_deliveries(
        courier, message, envelope("gone@isp.example"), envelope("b@isp.example")
    )
    assert [r[0].outcome for r in results] == ["permanent", "delivered"]
    assert net.connects == [MX1]


def test_closed_session_is_not_kept(net: FakeNet, message: Content) -> None:
    net.behaviour(MX1).send_errors = [smtp_error("lost", temporary=True)]
    courier = make_courier({"isp.example": Hops([MX1, MX2])})
    results = run_deliveries(
        courier, message, envelope("a@isp.example"), envelope("b@isp.example")
    )
    assert [r[0].outcome for r in results] == ["delivered", "delivered"]
    # MX1 broke; MX2 took the first message and its session the second.
    assert net.connects == [MX1, MX2]


def test_idle_session_to_a_host_no_longer_routed_is_dropped(
    net: FakeNet, message: Content
) -> None:
    router_answers: dict[str, RouteResult] = {"isp.example": Hops([MX1])}
    courier = make_courier(router_answers)

    async def main() -> None:
        await courier.deliver(envelope("a@isp.example"), [Recipient("a@isp.example")], message)
        router_answers["isp.example"] = Hops([MX2])  # the MX records changed
        await courier.deliver(envelope("b@isp.example"), [Recipient("b@isp.example")], message)
        await courier.close()

    asyncio.run(main())
    assert net.connects == [MX1, MX2]
    assert sorted(h.host for h in net.quits) == ["192.0.2.1", "192.0.2.2"]


def test_sessions_carry_a_limited_number_of_messages(net: FakeNet, message: Content) -> None:
    courier = make_courier({"isp.example": Hops([MX1])}, max_messages_per_session=2)
    envelopes = [envelope(f"u{i}@isp.example") for i in range(5)]
    run_deliveries(courier, message, *envelopes)
    assert len(net.connects) == 3  # 2 + 2 + 1


# -- over real sockets ----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Recorder:
    """aiosmtpd handler: keeps every message, refuses the recipients in `refuse`."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes, Any]] = []
        self.refuse: dict[str, str] = {}

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if address in self.refuse:
            return self.refuse[address]
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(
            (envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content,
             session.peer)
        )
        return "250 2.0.0 Ok: queued as TEST"


@pytest.fixture
def aiosmtpd_server(require_peer: Callable[..., str]) -> Iterator[tuple[Recorder, int]]:
    require_peer("aiosmtpd", module=True)
    from aiosmtpd.controller import Controller

    recorder = Recorder()
    controller = Controller(recorder, hostname="127.0.0.1", port=_free_port())
    controller.start()
    try:
        yield recorder, controller.port
    finally:
        controller.stop()


def static_router(port: int, domain: str = "isp.example") -> Router:
    # The static route means DNS is never asked; the nameserver is a placeholder.
    options = RouterOptions(routes={domain: Route("127.0.0.1", port)},
                            nameservers=[Endpoint("127.0.0.1", 9)])
    return Router(options, lambda d: False)


def real_courier(router: Router, **options: Any) -> RemoteCourier:
    # Opportunistic TLS does not authenticate the server (RFC 7435); tests use a
    # self-signed certificate.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return RemoteCourier(router, "out.corp.example", context, connect_timeout=5,
                         command_timeout=10, **options)


def test_delivers_to_aiosmtpd_in_one_transaction(
    aiosmtpd_server: tuple[Recorder, int], message: Content
) -> None:
    recorder, port = aiosmtpd_server
    recorder.refuse["gone@isp.example"] = "550 5.1.1 no such user"
    courier = real_courier(static_router(port))
    results = deliver_one(
        courier, message,
        envelope("b@isp.example", "gone@isp.example", Recipient("c@isp.example",
                                                                 notify=("SUCCESS",))),
    )
    assert outcomes(results) == [
        ("b@isp.example", "delivered", "2.0.0"),
        ("gone@isp.example", "permanent", "5.1.1"),
        ("c@isp.example", "delivered", "2.0.0"),
    ]
    assert results[1].text == "550 5.1.1 no such user"
    assert results[0].remote_mta is not None and f"[127.0.0.1]:{port}" in results[0].remote_mta
    # aiosmtpd offers no DSN (RFC 3461): NOTIFY=SUCCESS earns a "relayed" notice.
    assert [r.relayed_without_dsn for r in results] == [False, False, True]
    [(sender, rcpts, content, _)] = recorder.messages
    assert (sender, rcpts) == ("a@corp.example", ["b@isp.example", "c@isp.example"])
    assert content == MESSAGE


def test_unreachable_hop_then_aiosmtpd_and_the_session_is_reused(
    aiosmtpd_server: tuple[Recorder, int], message: Content
) -> None:
    recorder, port = aiosmtpd_server
    dead = Hop(host="127.0.0.1", port=_free_port(), name="dead.isp.example")
    live = Hop(host="127.0.0.1", port=port, name="live.isp.example")
    router = FixedRouter({"isp.example": Hops([dead, live])})
    courier = real_courier(router)  # type: ignore[arg-type]
    results = run_deliveries(courier, message, envelope("a@isp.example"),
                             envelope("b@isp.example"))
    assert [r[0].outcome for r in results] == ["delivered", "delivered"]
    assert results[0][0].remote_mta == f"live.isp.example[127.0.0.1]:{port}"
    # Both messages came over one connection: the same client port.
    assert len({peer for *_, peer in recorder.messages}) == 1


def test_nothing_listening_is_temporary(message: Content) -> None:
    port = _free_port()
    courier = real_courier(static_router(port))
    [result] = deliver_one(courier, message, envelope("b@isp.example"))
    assert (result.outcome, result.dsn_status) == ("temporary", "4.4.1")
    assert result.text.startswith(f"connect to 127.0.0.1[127.0.0.1]:{port}: ")


def test_delivers_to_a_postroom_receiving_host(tmp_path: Path, message: Content) -> None:
    from postroom.config import load_config
    from postroom.server.main import start
    from postroom.store.factory import open_store

    data = tmp_path / "receiver"
    data.mkdir()
    (data / "postroom.toml").write_text(
        'hostname = "mx.isp.example"\ndomains = ["isp.example"]\n'
        '[listen]\nsmtp = "127.0.0.1:0"\n'
    )
    config = load_config(data)
    open_store(config.store).users.add_user("boss@isp.example", "boss-secret")

    async def main() -> list[DeliveryResult]:
        running = await start(config)
        try:
            _, port = running.address("smtp")
            courier = real_courier(static_router(port))
            results = await courier.deliver(
                envelope("boss@isp.example", "nobody@isp.example"),
                [Recipient("boss@isp.example"), Recipient("nobody@isp.example")],
                message,
            )
            await courier.close()
            return results
        finally:
            await running.stop(grace=2)

    results = asyncio.run(main())
    assert outcomes(results) == [
        ("boss@isp.example", "delivered", "2.0.0"),
        ("nobody@isp.example", "permanent", "5.1.1"),
    ]
    [stored] = (data / "mail" / "isp.example" / "boss" / "new").iterdir()
    content = stored.read_bytes()
    # The receiving host files the envelope sender first (RFC 5321 4.4), then its trace.
    assert content.startswith(b"Return-Path: <a@corp.example>\r\nReceived: from out.corp.example")
    assert content.endswith(MESSAGE)
