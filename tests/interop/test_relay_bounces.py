"""Bounces the provider host sends without a next hop ever saying no: null MX and giving up.

RFC 7505 3: a domain whose only MX is "0 ." takes no mail, and a sender's host
should return the message at once with 5.1.10 rather than queue it. dnsmasq
cannot serve a "." MX target, so a small DNS server built on dnspython's
message API answers here. RFC 5321 4.5.4.1: a message that still cannot be
delivered after the give-up time goes back to its sender; RFC 3463 calls
that 5.4.7 (delivery time expired).

Each test runs its own provider host (mail.isp.example, user smith@) and reads
the bounce from smith's Maildir.
"""

from __future__ import annotations

import email
import email.message
import email.policy
import socket
import threading
from collections.abc import Callable, Iterator

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from mailcheck import make_message, new_token
from mailharness import (
    LOOPBACK,
    Postroom,
    free_ports,
    send_and_get_queue_id,
    submission_client,
    wait_until_unqueued,
)

pytestmark = pytest.mark.interop

SMITH = "smith@isp.example"
SMITH_PASSWORD = "smith-secret"
ISP_HOSTNAME = "mail.isp.example"


class TinyDNS:
    """An authoritative DNS server on 127.0.0.1 (UDP) answering from a table, in a thread.

    A name with records of some type gets an empty NOERROR answer for other
    types; any other name is NXDOMAIN.
    """

    def __init__(self, records: dict[tuple[str, str], list[str]]) -> None:
        self.records = records
        self.queries: list[tuple[str, str]] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((LOOPBACK, 0))
        self.sock.settimeout(0.1)
        self.port = int(self.sock.getsockname()[1])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="tiny-dns", daemon=True)

    def answer(self, request: dns.message.Message) -> dns.message.Message:
        question = request.question[0]
        name = question.name.to_text(omit_final_dot=True).lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        self.queries.append((name, rdtype))
        response = dns.message.make_response(request)
        response.flags |= dns.flags.AA
        values = self.records.get((name, rdtype))
        if values:
            response.answer.append(
                dns.rrset.from_text_list(question.name, 60, "IN", rdtype, values)
            )
        elif not any(known == name for known, _ in self.records):
            response.set_rcode(dns.rcode.NXDOMAIN)
        return response

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                wire, client = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                request = dns.message.from_wire(wire)
            except Exception:  # noqa: BLE001 - a malformed packet gets no answer
                continue
            self.sock.sendto(self.answer(request).to_wire(), client)

    def __enter__(self) -> TinyDNS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


@pytest.fixture
def tiny_dns() -> Iterator[TinyDNS]:
    """nullmx.example has the null MX "0 ." (RFC 7505); nothing else exists."""
    with TinyDNS({("nullmx.example", "MX"): ["0 ."]}) as server:
        yield server


def provider(make_postroom: Callable[..., Postroom], toml: str) -> Postroom:
    return make_postroom(
        hostname=ISP_HOSTNAME, domains=["isp.example"], users={SMITH: SMITH_PASSWORD},
        aliases={}, listeners=("smtp", "submission"), extra_toml=toml,
    )


def submit(isp: Postroom, recipient: str, token: str) -> str:
    message = make_message(token, sender=SMITH, recipient=recipient, subject="bounce me")
    with submission_client(isp.ports["submission"], SMITH, SMITH_PASSWORD) as client:
        return send_and_get_queue_id(client, SMITH, [recipient], message)


def the_bounce(isp: Postroom, token: str, timeout: float) -> email.message.Message:
    """The one DSN in smith's Maildir that returns the message carrying `token`."""
    found = isp.wait_for_message(SMITH, token.encode(), timeout=timeout)
    assert len(found) == 1, (
        f"expected one bounce in smith's Maildir, found {len(found)}\n{isp.output()}"
    )
    report = email.message_from_bytes(found[0], policy=email.policy.compat32)
    assert report.get_content_type() == "multipart/report", report.get_content_type()
    assert report.get_param("report-type") == "delivery-status"
    return report


def recipient_fields(report: email.message.Message) -> dict[str, str]:
    """The per-recipient fields of the (single-recipient) delivery-status part."""
    (status,) = [p for p in report.walk() if p.get_content_type() == "message/delivery-status"]
    blocks = status.get_payload()
    assert isinstance(blocks, list) and len(blocks) == 2, blocks
    block = blocks[1]
    assert isinstance(block, email.message.Message), block
    return {k.lower(): " ".join(str(v).split()) for k, v in block.items()}


def test_null_mx_bounces_at_once_with_5_1_10(
    postroom_factory: Callable[..., Postroom], tiny_dns: TinyDNS
) -> None:
    # An hour between attempts: only an immediate (permanent) failure can
    # bounce within this test.
    isp = provider(postroom_factory, (
        f'[dns]\nnameservers = ["{LOOPBACK}:{tiny_dns.port}"]\n\n'
        '[queue]\nretry_after = ["1h"]\ngive_up_after = "5d"\n'
    ))
    token = new_token()
    queue_id = submit(isp, "someone@nullmx.example", token)
    report = the_bounce(isp, token, timeout=20)
    fields = recipient_fields(report)
    assert fields.get("final-recipient", "").lower() == "rfc822; someone@nullmx.example", fields
    assert fields.get("action") == "failed", fields
    assert fields.get("status") == "5.1.10", fields
    assert ("nullmx.example", "MX") in tiny_dns.queries
    # No address lookups for "." (RFC 7505 3: the null MX is not a host to try).
    assert not [q for q in tiny_dns.queries if q[0] in ("", ".")], tiny_dns.queries
    assert queue_id not in wait_until_unqueued(isp, queue_id)


def test_next_hop_that_never_answers_gives_up_with_5_4_7(
    postroom_factory: Callable[..., Postroom],
) -> None:
    # A static route to a loopback port nobody listens on: every attempt is
    # refused, a temporary failure; after give_up_after the message goes back.
    (dead_port,) = free_ports(1)
    isp = provider(postroom_factory, (
        f'[routes]\n"never.example" = "{LOOPBACK}:{dead_port}"\n\n'
        '[queue]\nretry_after = ["1s"]\ngive_up_after = "3s"\n'
    ))
    token = new_token()
    queue_id = submit(isp, "someone@never.example", token)
    report = the_bounce(isp, token, timeout=30)
    fields = recipient_fields(report)
    assert fields.get("final-recipient", "").lower() == "rfc822; someone@never.example", fields
    assert fields.get("action") == "failed", fields
    assert fields.get("status") == "5.4.7", fields
    # The last temporary failure is kept as the diagnosis.
    diagnosis = fields.get("diagnostic-code", "")
    assert f"{LOOPBACK}]:{dead_port}" in diagnosis, fields
    assert "refused" in diagnosis.lower(), fields
    assert queue_id not in wait_until_unqueued(isp, queue_id)
