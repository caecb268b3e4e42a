"""The trace header we add (RFC 5321 4.4) and the hop count that detects mail loops.

Every host that accepts a message prepends one Received header. A message that
already carries many of them is going round in circles: RFC 5321 6.3 asks a
host to count them and refuse past a limit (Postfix: hopcount_limit = 50).
"""

from __future__ import annotations

import email.utils
import time
from dataclasses import dataclass
from datetime import UTC, datetime

# RFC 5321 6.3: "a simple counting of the number of Received: header fields"
# with a limit of at least 100 suggested; Postfix and Exim use 50 in practice.
DEFAULT_MAX_RECEIVED = 50

# Header bytes we look at for the count. A header section longer than this is
# not a header section a loop produced; counting stops there.
MAX_HEADER_SCAN = 1024 * 1024


@dataclass(frozen=True, slots=True)
class TraceInfo:
    """What a Received header says about one SMTP hop."""

    helo: str
    client_ip: str
    client_name: str | None
    hostname: str
    queue_id: str
    esmtp: bool
    tls_version: str | None
    tls_cipher: str | None
    authenticated: bool
    smtputf8: bool
    recipient: str | None  # shown only when the transaction has exactly one


def with_protocol(info: TraceInfo) -> str:
    """The "with" keyword: SMTP, ESMTP, plus S (TLS) and A (AUTH) (RFC 3848), and
    the UTF8 variants of RFC 6531 3.7.3."""
    if not info.esmtp:
        return "SMTP"
    base = "UTF8SMTP" if info.smtputf8 else "ESMTP"
    return base + ("S" if info.tls_version else "") + ("A" if info.authenticated else "")


def rfc5322_date(when: float | None = None) -> str:
    """A date-time in UTC written "+0000" (RFC 5322 3.3: "-0000" would mean the zone
    is unknown, and we know it).

    Every message received in the same second gets the same text, so the last
    one is kept: formatting it costs more than the rest of the Received header.
    """
    global _last_date
    second = int(time.time() if when is None else when)
    last = _last_date  # one read of a pair that is only ever replaced whole
    if last[0] == second:
        return last[1]
    text = email.utils.format_datetime(datetime.fromtimestamp(second, UTC))
    _last_date = (second, text)
    return text


_last_date: tuple[int, str] = (-1, "")  # (second, its text)


def received_header(info: TraceInfo, when: float | None = None) -> bytes:
    """The Received header line, folded, CRLF-terminated (RFC 5321 4.4, RFC 5322 3.6.7)."""
    literal = f"[{info.client_ip}]" if ":" not in info.client_ip else f"[IPv6:{info.client_ip}]"
    tcp_info = f"{info.client_name} {literal}" if info.client_name else literal
    lines = [f"Received: from {info.helo or 'unknown'} ({tcp_info})"]
    by = f"\tby {info.hostname} (postroom) with {with_protocol(info)} id {info.queue_id}"
    if info.tls_version:
        by += f"\r\n\t(using {info.tls_version} with cipher {info.tls_cipher})"
    lines.append(by)
    stamp = rfc5322_date(when)
    if info.recipient:
        lines.append(f"\tfor <{info.recipient}>; {stamp}")
    else:
        lines[-1] += ";"
        lines.append(f"\t{stamp}")
    text = "\r\n".join(lines) + "\r\n"
    return text.encode("utf-8")


class HopCounter:
    """Counts Received fields in the header section of a message as it streams in.

    Feed message pieces with `feed()`; the count is final once the blank line
    that ends the header section has gone by (or MAX_HEADER_SCAN octets have).
    """

    __slots__ = ("count", "_tail", "_scanned", "done")

    def __init__(self) -> None:
        self.count = 0
        self._tail = b"\r\n"  # so a Received field on the very first line is seen
        self._scanned = 0
        self.done = False

    def feed(self, data: bytes) -> None:
        if self.done:
            return
        chunk = self._tail + data
        end = chunk.find(b"\r\n\r\n")
        if end >= 0:
            chunk = chunk[: end + 2]
            self.done = True
        # A field starts right after a CRLF; header names are case-insensitive.
        lowered = chunk.lower()
        self.count += lowered.count(b"\r\nreceived:")
        # Keep one octet less than the field name, enough to catch a name split
        # across pieces but never a whole one we already counted.
        self._tail = chunk[-(len(b"\r\nreceived:") - 1) :]
        self._scanned += len(data)
        if self._scanned > MAX_HEADER_SCAN:
            self.done = True
