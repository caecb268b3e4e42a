"""Delivery status notifications: parsed back with the email package, field by field."""

from __future__ import annotations

import email
import email.utils
from email.message import Message
from pathlib import Path

import pytest

from postroom.queue.dsn import (
    Report,
    build_dsn,
    dsn_envelope,
    mta_name,
    queue_dsn,
    wants_dsn,
)
from postroom.queue.envelope import Envelope, Recipient
from postroom.queue.queuefile import ENVELOPE_TAG
from postroom.queue.result import DeliveryResult
from postroom.queue.store import QueueStore

NOW = 1_700_086_400.0
CREATED = 1_700_000_000.0
ORIGINAL = (
    b"From: Boss <boss@corp.example>\r\n"
    b"To: bob@isp.example\r\n"
    b"Subject: Quarterly numbers\r\n"
    b"Message-ID: <orig-1@corp.example>\r\n"
    b"\r\n"
    b"The numbers are good.\r\n"
)


def queued_message(store: QueueStore, queue_id: str) -> bytes:
    """The message in a queue file, past its envelope line."""
    with store.open_content(queue_id) as content, content.reader() as f:
        return f.read()


def make_envelope(**kw: object) -> Envelope:
    fields: dict[str, object] = {
        "queue_id": "ORIG00000001",
        "sender": "boss@corp.example",
        "recipients": [Recipient("bob@isp.example")],
        "created": CREATED,
    }
    fields.update(kw)
    return Envelope(**fields)  # type: ignore[arg-type]


@pytest.fixture
def original(tmp_path: Path) -> Path:
    path = tmp_path / "original"
    path.write_bytes(ORIGINAL)
    return path


def bounced(address: str = "bob@isp.example", **kw: object) -> tuple[Recipient, DeliveryResult]:
    recipient = Recipient(address, state="bounced", done_at=NOW - 60, **kw)  # type: ignore[arg-type]
    result = DeliveryResult(
        address, "permanent", "5.1.1", "550 5.1.1 <bob@isp.example>: no such user",
        remote_mta="mx.isp.example[192.0.2.1]:25",
    )
    return recipient, result


def parse(data: bytes) -> Message:
    assert b"\n" not in data.replace(b"\r\n", b""), "every line ends in CRLF"
    return email.message_from_bytes(data)


def parts(msg: Message) -> list[Message]:
    payload = msg.get_payload()
    assert isinstance(payload, list)
    return payload


def status_blocks(msg: Message) -> list[Message]:
    blocks = parts(msg)[1].get_payload()
    assert isinstance(blocks, list)
    return blocks


def test_failure_dsn_has_every_field(original: Path) -> None:
    env = make_envelope(envid="QQ314159", client="[192.0.2.9]")
    recipient, result = bounced(orcpt="rfc822;Bob@ISP.example")
    report = Report(env, [(recipient, result)], "failed", "mx.corp.example", NOW)
    msg = parse(build_dsn(report, original))

    assert msg["From"].startswith("MAILER-DAEMON@mx.corp.example")
    assert msg["To"] == "<boss@corp.example>"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert email.utils.parsedate_to_datetime(msg["Date"]).timestamp() == NOW
    assert msg["Message-ID"].endswith("@mx.corp.example>")
    assert msg["MIME-Version"] == "1.0"
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"

    text, status, returned = parts(msg)
    assert text.get_content_type() == "text/plain"
    body = text.get_payload(decode=True).decode()
    assert "<bob@isp.example>" in body
    assert "550 5.1.1 <bob@isp.example>: no such user" in body
    assert "mx.isp.example[192.0.2.1]:25" in body
    assert "could not be delivered" in body
    assert "Quarterly numbers" in body

    assert status.get_content_type() == "message/delivery-status"
    per_message, per_recipient = status_blocks(msg)
    assert per_message["Reporting-MTA"] == "dns; mx.corp.example"
    assert per_message["Original-Envelope-Id"] == "QQ314159"
    assert per_message["Received-From-MTA"] == "dns; [192.0.2.9]"
    assert email.utils.parsedate_to_datetime(per_message["Arrival-Date"]).timestamp() == CREATED
    assert per_recipient["Original-Recipient"] == "rfc822; Bob@ISP.example"
    assert per_recipient["Final-Recipient"] == "rfc822; bob@isp.example"
    assert per_recipient["Action"] == "failed"
    assert per_recipient["Status"] == "5.1.1"
    assert per_recipient["Remote-MTA"] == "dns; mx.isp.example"
    assert per_recipient["Diagnostic-Code"] == "smtp; 550 5.1.1 <bob@isp.example>: no such user"
    last = email.utils.parsedate_to_datetime(per_recipient["Last-Attempt-Date"]).timestamp()
    assert last == NOW - 60
    assert per_recipient["Will-Retry-Until"] is None

    assert returned.get_content_type() == "message/rfc822"
    inner = returned.get_payload()[0]
    assert inner["Subject"] == "Quarterly numbers"
    assert inner.get_payload() == "The numbers are good.\r\n"


def test_without_envid_or_orcpt_those_fields_are_absent(original: Path) -> None:
    msg = parse(build_dsn(Report(make_envelope(), [bounced()], "failed", "mx", NOW), original))
    per_message, per_recipient = status_blocks(msg)
    assert per_message["Original-Envelope-Id"] is None
    assert per_recipient["Original-Recipient"] is None


def test_one_block_per_recipient(original: Path) -> None:
    items = [bounced("bob@isp.example"), bounced("eve@isp.example")]
    msg = parse(build_dsn(Report(make_envelope(), items, "failed", "mx", NOW), original))
    blocks = status_blocks(msg)
    assert [b["Final-Recipient"] for b in blocks[1:]] == [
        "rfc822; bob@isp.example", "rfc822; eve@isp.example"
    ]


def test_ret_hdrs_returns_only_headers(original: Path) -> None:
    env = make_envelope(ret="HDRS")
    msg = parse(build_dsn(Report(env, [bounced()], "failed", "mx", NOW), original))
    returned = parts(msg)[2]
    assert returned.get_content_type() == "text/rfc822-headers"
    payload = returned.get_payload()
    assert "Subject: Quarterly numbers" in payload
    assert "The numbers are good" not in payload


@pytest.mark.parametrize("ret", [None, "FULL"])
def test_ret_full_or_absent_returns_the_message(original: Path, ret: str | None) -> None:
    report = Report(make_envelope(ret=ret), [bounced()], "failed", "mx", NOW)
    msg = parse(build_dsn(report, original))
    assert parts(msg)[2].get_content_type() == "message/rfc822"


def test_huge_original_returns_headers_only(tmp_path: Path) -> None:
    path = tmp_path / "big"
    path.write_bytes(ORIGINAL + b"x" * 998 + b"\r\n" * 200)
    report = Report(make_envelope(), [bounced()], "failed", "mx", NOW)
    msg = parse(build_dsn(report, path, max_full=1000))
    text, _status, returned = parts(msg)
    assert returned.get_content_type() == "text/rfc822-headers"
    assert "Message-ID: <orig-1@corp.example>" in returned.get_payload()
    assert "too large" in text.get_payload(decode=True).decode()


def test_missing_original_leaves_the_third_part_out(tmp_path: Path) -> None:
    report = Report(make_envelope(), [bounced()], "failed", "mx", NOW)
    msg = parse(build_dsn(report, tmp_path / "gone"))
    assert len(parts(msg)) == 2


def test_delayed_dsn(original: Path) -> None:
    recipient = Recipient("bob@isp.example", state="deferred", attempts=4)
    result = DeliveryResult("bob@isp.example", "temporary", "4.4.1",
                            "connect to mx.isp.example[192.0.2.1]:25: Connection refused",
                            remote_mta="mx.isp.example[192.0.2.1]:25")
    until = CREATED + 5 * 86400
    report = Report(make_envelope(), [(recipient, result)], "delayed", "mx.corp.example", NOW,
                    retry_until=until)
    data = build_dsn(report, original)
    msg = parse(data)
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    text, _status, returned = parts(msg)
    body = text.get_payload(decode=True).decode()
    assert "no need to send it again" in body
    assert "Connection refused" in body
    _per_message, block = status_blocks(msg)
    assert block["Action"] == "delayed"
    assert block["Status"] == "4.4.1"
    # Not an SMTP reply: our own diagnostic type (RFC 3464 2.3.6).
    assert block["Diagnostic-Code"].startswith("X-Postroom; connect to")
    assert email.utils.parsedate_to_datetime(block["Will-Retry-Until"]).timestamp() == until
    assert returned.get_content_type() == "message/rfc822"


def test_relayed_dsn(original: Path) -> None:
    recipient = Recipient("bob@isp.example", notify=("SUCCESS",), state="delivered")
    result = DeliveryResult("bob@isp.example", "delivered", "2.0.0", "250 2.0.0 Ok: queued",
                            remote_mta="mx.isp.example[192.0.2.1]:25", relayed_without_dsn=True)
    report = Report(make_envelope(), [(recipient, result)], "relayed", "mx", NOW)
    msg = parse(build_dsn(report, original))
    assert msg["Subject"] == "Successful Mail Delivery Report"
    block = status_blocks(msg)[1]
    assert (block["Action"], block["Status"]) == ("relayed", "2.0.0")
    assert "handed on" in parts(msg)[0].get_payload(decode=True).decode()


def test_expired_temporary_status_becomes_permanent(original: Path) -> None:
    recipient = Recipient("bob@isp.example", state="bounced")
    result = DeliveryResult("bob@isp.example", "temporary", "4.4.7", "delivery time expired")
    report = Report(make_envelope(), [(recipient, result)], "failed", "mx", NOW)
    msg = parse(build_dsn(report, original))
    assert status_blocks(msg)[1]["Status"] == "5.4.7"


def test_long_diagnostics_are_folded(original: Path) -> None:
    long_reply = "550 5.7.1 " + " ".join(["word"] * 60)
    recipient = Recipient("bob@isp.example", state="bounced")
    result = DeliveryResult("bob@isp.example", "permanent", "5.7.1", long_reply + "\nsecond")
    data = build_dsn(Report(make_envelope(), [(recipient, result)], "failed", "mx", NOW), original)
    status_part = data.split(b"message/delivery-status")[1].split(b"\r\n--")[0]
    assert all(len(line) <= 100 for line in status_part.split(b"\r\n"))
    block = status_blocks(parse(data))[1]
    unfolded = " ".join(block["Diagnostic-Code"].split())
    assert unfolded == f"smtp; {long_reply} second"


def test_utf8_addresses_use_the_global_types(tmp_path: Path) -> None:
    path = tmp_path / "orig"
    path.write_bytes("Subject: Grüße\r\nFrom: jörg@bücher.example\r\n\r\nHallo\r\n".encode())
    env = make_envelope(sender="jörg@bücher.example", smtputf8=True)
    recipient = Recipient("zoë@isp.example", state="bounced")
    result = DeliveryResult("zoë@isp.example", "permanent", "5.1.1", "550 5.1.1 unknown")
    data = build_dsn(Report(env, [(recipient, result)], "failed", "mx", NOW), path)
    msg = email.message_from_bytes(data)
    assert msg.get_param("report-type") == "global-delivery-status"
    status, returned = parts(msg)[1:]
    assert status.get_content_type() == "message/global-delivery-status"
    assert b"Final-Recipient: utf-8; zo\xc3\xab@isp.example" in data
    assert returned.get_content_type() == "message/global"
    assert "Grüße" in parts(msg)[0].get_payload(decode=True).decode()


def test_smtputf8_flag_alone_keeps_the_plain_types(original: Path) -> None:
    # RFC 6531 3.4: an ASCII envelope and ASCII headers need no UTF-8 types.
    report = Report(make_envelope(smtputf8=True), [bounced()], "failed", "mx", NOW)
    data = build_dsn(report, original)
    msg = email.message_from_bytes(data)
    assert msg.get_param("report-type") == "delivery-status"
    status, returned = parts(msg)[1:]
    assert status.get_content_type() == "message/delivery-status"
    assert returned.get_content_type() == "message/rfc822"


def test_boundary_never_occurs_in_the_content(original: Path) -> None:
    data = build_dsn(Report(make_envelope(), [bounced()], "failed", "mx", NOW), original)
    boundary = email.message_from_bytes(data).get_boundary()
    assert boundary is not None
    assert data.count(b"--" + boundary.encode()) == 4  # three parts and the close


# -- who gets a notice (RFC 3461 4.1) ---------------------------------------------


@pytest.mark.parametrize(
    ("sender", "notify", "action", "wanted"),
    [
        ("boss@corp.example", None, "failed", True),
        ("boss@corp.example", None, "delayed", True),
        ("boss@corp.example", None, "relayed", False),
        ("boss@corp.example", None, "delivered", False),
        ("boss@corp.example", ("NEVER",), "failed", False),
        ("boss@corp.example", ("NEVER",), "delayed", False),
        ("boss@corp.example", ("SUCCESS",), "failed", False),
        ("boss@corp.example", ("SUCCESS",), "relayed", True),
        ("boss@corp.example", ("SUCCESS",), "delivered", True),
        ("boss@corp.example", ("DELAY",), "delayed", True),
        ("boss@corp.example", ("FAILURE",), "delayed", False),
        ("boss@corp.example", ("failure", "delay"), "failed", True),
        ("", None, "failed", False),  # never a notice about a notice
        ("", ("SUCCESS", "FAILURE"), "failed", False),
    ],
)
def test_wants_dsn(
    sender: str, notify: tuple[str, ...] | None, action: str, wanted: bool
) -> None:
    env = make_envelope(sender=sender)
    assert wants_dsn(env, Recipient("bob@isp.example", notify=notify), action) is wanted


def test_queue_dsn_queues_a_null_sender_message_to_the_sender(tmp_path: Path) -> None:
    store = QueueStore(tmp_path)
    env = make_envelope()
    store.add(env, [ORIGINAL])
    notice = queue_dsn(store, Report(env, [bounced()], "failed", "mx.corp.example", NOW))
    assert notice is not None
    assert notice.sender == ""
    assert [r.address for r in notice.recipients] == ["boss@corp.example"]
    assert notice.recipients[0].notify == ("NEVER",)
    assert store.load(notice.queue_id) == notice
    msg = email.message_from_bytes(queued_message(store, notice.queue_id))
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    with store.open_content(notice.queue_id) as content:
        assert notice.size == content.size
    # The original comes back whole, read from its queue file past the envelope line.
    returned = msg.get_payload()[2].get_payload()[0].as_bytes()
    assert returned.replace(b"\r\n", b"\n") == ORIGINAL.replace(b"\r\n", b"\n")
    assert ENVELOPE_TAG not in queued_message(store, notice.queue_id)


def test_queue_dsn_without_the_original_leaves_it_out(tmp_path: Path) -> None:
    """The original left the queue meanwhile (`postroom queue delete`): the notice
    goes without its third part (RFC 3464 2)."""
    store = QueueStore(tmp_path)
    env = make_envelope()
    notice = queue_dsn(store, Report(env, [bounced()], "failed", "mx.corp.example", NOW))
    assert notice is not None
    msg = email.message_from_bytes(queued_message(store, notice.queue_id))
    assert len(msg.get_payload()) == 2


@pytest.mark.parametrize(
    ("sender", "notify"), [("", None), ("boss@corp.example", ("NEVER",)),
                           ("boss@corp.example", ("SUCCESS", "DELAY"))],
)
def test_queue_dsn_sends_nothing_when_not_wanted(
    tmp_path: Path, sender: str, notify: tuple[str, ...] | None
) -> None:
    store = QueueStore(tmp_path)
    env = make_envelope(sender=sender)
    store.add(env, [ORIGINAL])
    assert queue_dsn(store, Report(env, [bounced(notify=notify)], "failed", "mx", NOW)) is None
    assert store.ids() == ["ORIG00000001"]


def test_dsn_envelope_for_an_utf8_sender() -> None:
    notice = dsn_envelope(make_envelope(sender="jörg@bücher.example"), NOW)
    assert notice.smtputf8 and notice.sender == "" and notice.created == NOW


@pytest.mark.parametrize(
    ("remote", "name"),
    [("mx.isp.example[192.0.2.1]:25", "mx.isp.example"), ("[192.0.2.1]:25", "[192.0.2.1]"),
     ("mx.isp.example:2525", "mx.isp.example"), ("mx.isp.example", "mx.isp.example")],
)
def test_mta_name(remote: str, name: str) -> None:
    assert mta_name(remote) == name
