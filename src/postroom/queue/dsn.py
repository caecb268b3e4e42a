"""Delivery status notifications (RFC 3464): who gets one, what it says, and queueing it.

A DSN is an ordinary message from the null reverse-path <> to the original
sender, queued like any other, so the same machinery delivers it; being from
<> it is never bounced itself (RFC 5321 4.5.5, 6.1), which is what stops
bounce loops. Its body is multipart/report (RFC 6522) with three parts: a
text for people, the machine-readable message/delivery-status fields, and
the original message (or only its headers).

Mail from <> that cannot be delivered (a bounce to a sender who does not
exist) is not lost in silence: the same report goes to the postmaster instead
(a "double bounce", as Postfix sends with notify_classes = 2bounce), marked so
that if it fails too it is only logged (RFC 5321 6.1: no loops).
"""

from __future__ import annotations

import dataclasses
import email.utils
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from email.header import decode_header, make_header
from email.message import MIMEPart
from email.parser import HeaderParser
from email.policy import compat32
from pathlib import Path
from typing import Literal

from postroom.ids import new_queue_id
from postroom.queue.envelope import Envelope, Recipient
from postroom.queue.result import DeliveryResult
from postroom.queue.store import QueueError, QueueStore

Action = Literal["failed", "delayed", "delivered", "relayed", "expanded"]

# Originals larger than this are returned as headers only, even with RET=FULL:
# a bounce should not carry a 50 MB attachment back through every hop.
RETURN_FULL_LIMIT = 512 * 1024
HEADER_LIMIT = 256 * 1024  # at most this much of a header section is returned
FOLD_AT = 78  # RFC 5322 2.1.1: lines SHOULD be at most 78 characters

DOUBLE_BOUNCE = "double_bounce"  # Envelope.extra key of a report sent to the postmaster
POSTMASTER_SUBJECT = "Postmaster Copy: Undeliverable Mail from <>"

# Per action: the NOTIFY keyword that asks for it (RFC 3461 4.1), the Subject, and
# what the text part says first.
_SUCCESS = "Successful Mail Delivery Report"
_ACTIONS: dict[str, tuple[str, str, str]] = {
    "failed": ("FAILURE", "Undelivered Mail Returned to Sender",
               "Your message could not be delivered to the recipients below, and the mail "
               "system has stopped trying. The reason for each is given under its address."),
    "delayed": ("DELAY", "Delayed Mail (still being retried)",
                "Your message has not yet reached the recipients below. The mail system keeps "
                "trying{until}; there is no need to send it again. You will hear again only "
                "if it finally fails."),
    "delivered": ("SUCCESS", _SUCCESS, "Your message was delivered to the recipients below."),
    "relayed": ("SUCCESS", _SUCCESS,
                "Your message was handed on to the next mail system for the recipients below. "
                "That system does not send delivery reports, so this is the last report you "
                "will get about them."),
    "expanded": ("SUCCESS", _SUCCESS,
                 "Your message was delivered to the recipients below, which forward it to "
                 "further addresses."),
}
# What a report to the postmaster says first (queue_dsn's `to`).
_POSTMASTER_OPENING = (
    "A message from the null sender <> (usually a delivery report) could not be "
    "delivered to the recipients below, and the mail system has stopped trying. Mail "
    "from <> is never returned to its sender, so this report comes to the postmaster."
)

_STATUS = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
_SMTP_REPLY = re.compile(r"[2-5]\d\d(?:[ -]|$)")


@dataclass(frozen=True)
class Report:
    """One delivery status notification to make: on which recipients of which message."""

    envelope: Envelope  # the message reported on
    items: Sequence[tuple[Recipient, DeliveryResult]]  # each recipient with its last result
    action: Action
    reporting_mta: str  # this host's name (Reporting-MTA, From)
    now: float
    retry_until: float | None = None  # delayed notices: when the queue gives up
    to: str | None = None  # the postmaster, for mail from <>; None: the sender

    def wanted(self) -> Report:
        """The report on just those recipients that want it (see wants_dsn); a report
        to the postmaster is about every recipient given."""
        if self.to is not None:
            return self
        items = [(r, res) for r, res in self.items if wants_dsn(self.envelope, r, self.action)]
        return dataclasses.replace(self, items=items)


def wants_dsn(envelope: Envelope, recipient: Recipient, action: str) -> bool:
    """Whether the sender asked for (or by default gets) a notice of `action` for `recipient`.

    RFC 3461 4.1: NOTIFY=NEVER asks for none; otherwise only the listed
    kinds. Without NOTIFY, failures are reported and delays may be (we do).
    A message from <> never gets one (RFC 3461 6.2, RFC 5321 6.1).
    """
    if envelope.sender == "":
        return False
    if recipient.notify is None:
        return action in ("failed", "delayed")
    words = {word.upper() for word in recipient.notify}
    if "NEVER" in words:
        return False
    return action in _ACTIONS and _ACTIONS[action][0] in words


def build_dsn(
    report: Report, original: Path | bytes | None, *, max_full: int = RETURN_FULL_LIMIT
) -> bytes:
    """The complete DSN message (CRLF lines): multipart/report (RFC 6522) with a text
    for people, the message/delivery-status fields, and the original.

    The original is returned whole when RET=FULL or RET is absent and it is at
    most `max_full` octets, else only its header section; a missing original
    (None, or no such file) leaves the third part out (RFC 3464 2: it is
    optional). The original is a message file (not a queue file) or its
    octets.
    """
    envelope = report.envelope
    headers, full = _read_original(original, max_full)
    want_full = (envelope.ret or "FULL").upper() != "HDRS"
    returned, whole = (full, True) if want_full and full is not None else (headers, False)
    # RFC 6533 3-6: UTF-8 addresses or header fields need the "global" media types;
    # the client's SMTPUTF8 flag alone does not (RFC 6531 3.4).
    addresses = [envelope.sender]
    for recipient, _result in report.items:
        addresses += [recipient.address, recipient.orcpt or ""]
    global_types = not all(a.isascii() for a in addresses) or not (headers or b"").isascii()
    boundary = _boundary(report.reporting_mta, returned or b"")
    text = _human_text(report, headers, truncated=want_full and not whole and full is None)
    status_type = "message/global-delivery-status" if global_types else "message/delivery-status"
    out = _top_fields(report, boundary, global_types)
    delimiter = b"\r\n--" + boundary.encode("ascii")
    out += [delimiter, b"\r\n", _text_part(text)]
    out += [delimiter, b"\r\n", _field("Content-Type", status_type)]
    out += [_field("Content-Description", "Delivery report"), b"\r\n", _status_fields(report)]
    if returned is not None:
        out += [delimiter, b"\r\n", *_returned_part(report.action, returned, whole, global_types)]
    out += [delimiter, b"--\r\n"]
    return b"".join(out)


def _top_fields(report: Report, boundary: str, global_types: bool) -> list[bytes]:
    """The DSN's own header section and preamble."""
    reporting_mta, to = report.reporting_mta, report.to
    return [
        _field("From", f"MAILER-DAEMON@{reporting_mta} (Mail Delivery System)"),
        _field("To", f"<{to if to is not None else report.envelope.sender}>"),
        _field("Subject", POSTMASTER_SUBJECT if to is not None else _ACTIONS[report.action][1]),
        _field("Date", email.utils.formatdate(report.now, localtime=True)),
        _field("Message-ID", email.utils.make_msgid(domain=reporting_mta)),
        _field("Auto-Submitted", "auto-replied"),  # RFC 3834 5: never answer this
        _field("MIME-Version", "1.0"),
        _field(
            "Content-Type",
            f'multipart/report; report-type={"global-" if global_types else ""}'
            f'delivery-status; boundary="{boundary}"',
        ),
        b"\r\n",
        b"This is a MIME-formatted message; a delivery status report.\r\n",
    ]


def _returned_part(action: str, returned: bytes, whole: bool, global_types: bool) -> list[bytes]:
    """The third part: the original message, or its header section (RFC 3462 2, 6533)."""
    if whole:
        kind = "message/global" if global_types else "message/rfc822"
        description = "Undelivered message" if action == "failed" else "Message"
    else:
        kind = "message/global-headers" if global_types else "text/rfc822-headers"
        description = "Headers of the message"
    part = [_field("Content-Type", kind), _field("Content-Description", description)]
    if not returned.isascii():
        part.append(_field("Content-Transfer-Encoding", "8bit"))
    return [*part, b"\r\n", returned]


def dsn_envelope(original: Envelope, now: float, *, to: str | None = None) -> Envelope:
    """The envelope of a DSN about `original`: from <>, to its sender (or `to`, the
    postmaster, marked as such), nothing to report back."""
    recipient = to if to is not None else original.sender
    extra: dict[str, object] = {"dsn_for": original.queue_id}
    if to is not None:
        extra[DOUBLE_BOUNCE] = True
    return Envelope(
        queue_id=new_queue_id(now),
        sender="",
        recipients=[Recipient(address=recipient, notify=("NEVER",))],
        created=now,
        smtputf8=not recipient.isascii(),
        body="8BITMIME",  # the returned original may hold 8-bit text
        extra=extra,
    )


def queue_dsn(
    store: QueueStore, report: Report, original: Path | bytes | None = None,
    *, sign: Callable[[bytes], bytes] | None = None,
) -> Envelope | None:
    """Build and durably queue the DSN for those recipients that want one (see wants_dsn).

    `original` is the message (its file or its octets) when it is not in the
    queue: mail the SMTP session filed straight into Maildirs. Returns the
    DSN's envelope, or None when nobody is owed a notice. `sign` puts the DKIM
    signatures of the From domain on it. Blocking (it writes the queue).
    """
    report = report.wanted()
    if not report.items:
        return None
    if original is None:
        original = _queued_original(store, report.envelope.queue_id)
    notice = dsn_envelope(report.envelope, report.now, to=report.to)
    content = build_dsn(report, original)
    store.add(notice, [sign(content) if sign is not None else content])
    return notice


# -- the parts -------------------------------------------------------------------


def _queued_original(store: QueueStore, queue_id: str) -> bytes | None:
    """As much of a queued message as a DSN may return (see _read_original); None
    when it is no longer in the queue."""
    try:
        content = store.open_content(queue_id)
    except QueueError:
        return None
    with content, content.reader() as f:
        return f.read(max(RETURN_FULL_LIMIT, HEADER_LIMIT) + 1)


def _read_original(
    original: Path | bytes | None, max_full: int
) -> tuple[bytes | None, bytes | None]:
    """(header section, whole message or None when too large); (None, None) if missing."""
    if original is None:
        return None, None
    if isinstance(original, bytes):
        head = original[: max(max_full, HEADER_LIMIT) + 1]
    else:
        try:
            with open(original, "rb") as f:
                head = f.read(max(max_full, HEADER_LIMIT) + 1)
        except FileNotFoundError:
            return None, None
    full = head if len(head) <= max_full else None
    end = head.find(b"\r\n\r\n")
    if end >= 0:
        headers = head[: end + 2]
    elif full is not None:
        headers = full  # no body at all
    else:
        cut = head.rfind(b"\r\n", 0, HEADER_LIMIT)
        headers = head[: cut + 2] if cut >= 0 else b""
    if len(headers) > HEADER_LIMIT:
        cut = headers.rfind(b"\r\n", 0, HEADER_LIMIT)
        headers = headers[: cut + 2] if cut >= 0 else b""
    return headers, full


def _boundary(host: str, content: bytes) -> str:
    while True:
        boundary = f"{secrets.token_hex(12)}/{host}"
        if b"--" + boundary.encode("ascii", "replace") not in content:
            return boundary


def _field(name: str, value: str) -> bytes:
    """One header field, folded at spaces so lines stay near FOLD_AT (RFC 5322 2.2.3)."""
    line = f"{name}: "
    lines = []
    for word in value.split(" "):
        if len(line) + len(word) > FOLD_AT and line.strip() and not line.endswith(": "):
            lines.append(line.rstrip(" "))
            line = "    "
        line += word + " "
    lines.append(line.rstrip(" "))
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


def _text_part(text: str) -> bytes:
    part = MIMEPart()
    # Quoted-printable keeps the part 7-bit for hosts without 8BITMIME (RFC 6152).
    part.set_content(text, cte="7bit" if text.isascii() else "quoted-printable")
    part["Content-Description"] = "Notification"
    return part.as_bytes(policy=part.policy.clone(linesep="\r\n"))


def _one_line(text: str) -> str:
    """Reply text as one printable line (multiline replies joined)."""
    joined = " ".join(piece.strip() for piece in text.splitlines() if piece.strip())
    return "".join(ch if ch.isprintable() else " " for ch in joined)


def _address_field(address: str) -> str:
    # RFC 3464 2.3.2 "rfc822" addresses are ASCII; RFC 6533 3 adds "utf-8" for the rest.
    return f"{'rfc822' if address.isascii() else 'utf-8'}; {address}"


def _original_recipient(orcpt: str) -> str:
    kind, sep, address = orcpt.partition(";")
    if not sep:
        return _address_field(orcpt)
    if kind.strip().lower() == "rfc822" and not address.isascii():
        return f"utf-8; {address.strip()}"
    return f"{kind.strip()}; {address.strip()}"


def mta_name(remote: str) -> str:
    """The host part of a courier's "host[ip]:port" relay description, for Remote-MTA."""
    if remote.startswith("["):
        end = remote.find("]")
        return remote[: end + 1] if end > 0 else remote
    name = remote.split("[", 1)[0]
    if name.count(":") == 1:
        name = name.split(":", 1)[0]
    return name


def _status(result: DeliveryResult, action: str) -> str:
    status = result.dsn_status if _STATUS.fullmatch(result.dsn_status or "") else ""
    if action == "failed":
        # A message given up after temporary failures is reported permanent (5.4.7 etc.).
        return "5" + status[1:] if status and status[0] != "2" else "5.0.0"
    if action == "delayed":
        return "4" + status[1:] if status else "4.0.0"
    return status if status.startswith("2") else "2.0.0"


def _diagnostic(text: str) -> str:
    line = _one_line(text)
    # RFC 3464 2.3.6: "smtp" when the text is an SMTP reply, else our own type.
    return f"smtp; {line}" if _SMTP_REPLY.match(line) else f"X-Postroom; {line}"


def _status_fields(report: Report) -> bytes:
    """The message/delivery-status body: per-message fields, then one block per recipient
    (RFC 3464 2.2, 2.3); a field without a value is left out."""
    envelope, action = report.envelope, report.action
    until = report.retry_until if action == "delayed" else None
    blocks = [[
        ("Reporting-MTA", f"dns; {report.reporting_mta}"),
        ("X-Postroom-Queue-ID", envelope.queue_id),
        ("Original-Envelope-Id", envelope.envid),
        ("Received-From-MTA", envelope.client and f"dns; {envelope.client}"),
        ("Arrival-Date", email.utils.formatdate(envelope.created, True)),
    ]]
    for recipient, result in report.items:
        attempted = recipient.done_at if recipient.done_at is not None else report.now
        blocks.append([
            ("Original-Recipient", recipient.orcpt and _original_recipient(recipient.orcpt)),
            ("Final-Recipient", _address_field(recipient.address)),
            ("Action", action),
            ("Status", _status(result, action)),
            ("Remote-MTA", result.remote_mta and f"dns; {mta_name(result.remote_mta)}"),
            ("Diagnostic-Code", result.text and _diagnostic(result.text)),
            ("Last-Attempt-Date", email.utils.formatdate(attempted, True)),
            ("Will-Retry-Until", None if until is None else email.utils.formatdate(until, True)),
        ])
    return b"\r\n".join(b"".join(_field(name, value) for name, value in block if value)
                         for block in blocks)


def _subject_of(headers: bytes | None) -> str | None:
    if not headers:
        return None
    # RFC 6532: header text may be raw UTF-8; encoded words (RFC 2047) are decoded below.
    parsed = HeaderParser(policy=compat32).parsestr(headers.decode("utf-8", "replace"))
    raw = parsed.get("Subject")
    if raw is None:
        return None
    try:
        return _one_line(str(make_header(decode_header(str(raw)))))
    except (ValueError, LookupError):
        return _one_line(str(raw))


def _human_text(report: Report, headers: bytes | None, *, truncated: bool) -> str:
    """The text part for people: what happened, and to whom."""
    envelope, retry_until, postmaster = report.envelope, report.retry_until, report.to is not None
    until = ""
    if retry_until is not None:
        until = " until " + email.utils.formatdate(retry_until, localtime=True)
    lines = [f"Delivery report from the mail system at {report.reporting_mta}.", ""]
    opening = _ACTIONS[report.action][2].format(until=until)
    lines.append(_POSTMASTER_OPENING if postmaster else opening)
    lines.append("")
    subject = _subject_of(headers)
    sent = email.utils.formatdate(envelope.created, localtime=True)
    whose = "The message" if postmaster else "Your message"
    lines.append(f"{whose} of {sent}" + (f', subject "{subject}"' if subject else ""))
    lines.append(f"(queue ID {envelope.queue_id}):")
    lines.append("")
    for recipient, result in report.items:
        lines.append(f"<{recipient.address}>")
        reply = _one_line(result.text) if result.text else "(no further detail)"
        if result.remote_mta:
            lines.append(f"    {result.remote_mta} answered: {reply}")
        else:
            lines.append(f"    {reply}")
        lines.append("")
    if headers is None:
        lines.append("The message itself is no longer available to return.")
    elif truncated:
        lines.append("The message was too large to return in full; its headers are attached.")
    elif (envelope.ret or "").upper() == "HDRS":
        lines.append("As you asked, only the message's headers are attached.")
    else:
        lines.append(f"{whose} is attached.")
    return "\n".join(lines) + "\n"
