"""The seed's path across two postroom processes, with real clients and a real DNS server.

A provider host (mail.isp.example, users smith@ and jones@isp.example) takes
mail from its users on submission (587-style STARTTLS and 465-style implicit
TLS, AUTH required), queues it, finds corp.example's MX through dnsmasq on
loopback and relays it to the receiving host (mx.corp.example), which files
it into boss's Maildir. The provider's `[relay] mx_port` is the receiving
host's SMTP port, as port 25 cannot be shared on one machine.

Checked here: four submission clients (swaks, msmtp, smtplib with STARTTLS,
smtplib over implicit TLS) each get a message through, stored with both
hosts' Received headers; a down next hop leaves the message deferred in the
queue (`postroom queue show` says why and when it is tried next) until the
host is back; a 550 from the next hop comes back to smith as a DSN (RFC 3464),
read over POP3.
"""

from __future__ import annotations

import email
import email.message
import email.policy
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from mailcheck import make_message, new_token, received_headers, split_message
from mailharness import (
    LOOPBACK,
    Dnsmasq,
    HarnessError,
    Postroom,
    pop3_message,
    pop3_session,
    send_and_get_queue_id,
    submission_client,
    wait_until_unqueued,
)

pytestmark = pytest.mark.interop

SMITH = "smith@isp.example"
SMITH_PASSWORD = "smith-secret"
JONES = "jones@isp.example"
JONES_PASSWORD = "jones-secret"
BOSS = "boss@corp.example"
ISP_HOSTNAME = "mail.isp.example"
CORP_HOSTNAME = "mx.corp.example"

# corp.example's MX, served by dnsmasq: the address the provider then connects to.
MX_RECORDS = (
    "--mx-host=corp.example,mx.corp.example,10",
    "--host-record=mx.corp.example,127.0.0.1",
)


@dataclass
class Hosts:
    """The provider host, the receiving host and the DNS server between them."""

    isp: Postroom
    corp: Postroom
    dns: Dnsmasq


def start_hosts(
    make_postroom: Callable[..., Postroom],
    dns: Dnsmasq,
    *,
    retry_after: str = "1s",
    give_up_after: str = "1h",
) -> Hosts:
    """Start the receiving host, then the provider pointed at it through `dns`'s MX."""
    corp = make_postroom(
        hostname=CORP_HOSTNAME, domains=["corp.example"], users={BOSS: "boss-secret"},
        aliases={}, listeners=("smtp",),
    )
    isp = make_postroom(
        hostname=ISP_HOSTNAME, domains=["isp.example"],
        users={SMITH: SMITH_PASSWORD, JONES: JONES_PASSWORD}, aliases={},
        listeners=("smtp", "submission", "submissions", "pop3"),
        extra_toml=(
            f'[dns]\nnameservers = ["{LOOPBACK}:{dns.port}"]\n\n'
            f"[relay]\nmx_port = {corp.smtp_port}\n\n"
            f'[queue]\nretry_after = ["{retry_after}"]\ngive_up_after = "{give_up_after}"\n'
        ),
    )
    return Hosts(isp, corp, dns)


@pytest.fixture(scope="module")
def hosts(
    _module_servers: Any, tmp_path_factory: pytest.TempPathFactory,
    peer_missing: Callable[[str], None],
) -> Iterator[Hosts]:
    """One provider + receiving host pair (and dnsmasq) shared by this module's tests."""
    dns = Dnsmasq(tmp_path_factory.mktemp("dns"), *MX_RECORDS)
    if dns.program is None:
        peer_missing("program 'dnsmasq' is not installed")
    try:
        dns.start()
    except HarnessError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield start_hosts(_module_servers.postroom, dns)
    finally:
        dns.stop()


def arrived(corp: Postroom, token: str, timeout: float = 20.0) -> bytes:
    """The one message carrying `token` in boss's Maildir on the receiving host."""
    found = corp.wait_for_message(BOSS, token.encode(), timeout=timeout)
    assert len(found) == 1, (
        f"expected one message with token {token} in boss's Maildir, found {len(found)}\n"
        f"corp output:\n{corp.output()}"
    )
    return found[0]


def assert_relayed(stored: bytes, message: bytes) -> None:
    """Both hosts' Received headers, receiving host on top; the body byte for byte."""
    received = [" ".join(r.split()) for r in received_headers(stored)]
    assert len(received) >= 2, received
    assert f"by {CORP_HOSTNAME}" in received[0], received
    assert f"from {ISP_HOSTNAME}" in received[0], received
    assert f"by {ISP_HOSTNAME}" in received[1], received
    # RFC 3848: TLS and AUTH on the submission hop ("ESMTPSA"); the relay hop
    # used opportunistic STARTTLS ("ESMTPS").
    assert "with ESMTPSA" in received[1], received
    assert "with ESMTPS" in received[0], received
    assert split_message(stored)[1] == split_message(message)[1]


def run(command: list[str], stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    result = subprocess.run(command, input=stdin, capture_output=True, timeout=30, check=False)
    assert result.returncode == 0, (
        f"{command[0]} exited {result.returncode}\n"
        f"stdout:\n{result.stdout.decode(errors='replace')}\n"
        f"stderr:\n{result.stderr.decode(errors='replace')}"
    )
    return result


# -- 1. four submission clients, one path ------------------------------------------


def test_swaks_starttls_auth_plain(
    hosts: Hosts, require_peer: Callable[..., str], tmp_path: Path
) -> None:
    swaks = require_peer("swaks")
    token = new_token()
    message = make_message(token, sender=SMITH, recipient=BOSS, subject="swaks")
    eml = tmp_path / "message.eml"
    eml.write_bytes(message + b".\r\n")  # swaks sends data ending in "." as it is
    result = run([
        swaks, "--server", f"{LOOPBACK}:{hosts.isp.ports['submission']}",
        "--helo", "laptop.isp.example", "-tls",
        "--auth", "PLAIN", "--auth-user", SMITH, "--auth-password", SMITH_PASSWORD,
        "--from", SMITH, "--to", BOSS, "--data", f"@{eml}", "--timeout", "15",
    ])
    assert b"TLS started" in result.stdout
    assert_relayed(arrived(hosts.corp, token), message)


def test_msmtp_starttls_auth_plain(hosts: Hosts, require_peer: Callable[..., str]) -> None:
    msmtp = require_peer("msmtp")
    token = new_token()
    message = make_message(token, sender=SMITH, recipient=BOSS, subject="msmtp")
    # --host makes msmtp ignore every configuration file.
    run([
        msmtp, f"--host={LOOPBACK}", f"--port={hosts.isp.ports['submission']}",
        "--domain=laptop.isp.example", "--tls=on", "--tls-starttls=on",
        "--tls-certcheck=off", "--auth=plain", f"--user={SMITH}",
        f"--passwordeval=echo {SMITH_PASSWORD}", "--timeout=15", f"--from={SMITH}", BOSS,
    ], stdin=message)
    assert_relayed(arrived(hosts.corp, token), message)


@pytest.mark.parametrize("implicit_tls", [False, True], ids=["starttls", "submissions"])
def test_smtplib(hosts: Hosts, implicit_tls: bool) -> None:
    token = new_token()
    message = make_message(token, sender=SMITH, recipient=BOSS, subject="smtplib")
    port = hosts.isp.ports["submissions" if implicit_tls else "submission"]
    with submission_client(port, SMITH, SMITH_PASSWORD, implicit_tls=implicit_tls) as client:
        queue_id = send_and_get_queue_id(client, SMITH, [BOSS], message)
    assert queue_id
    assert_relayed(arrived(hosts.corp, token), message)


# -- 3. a 550 from the next hop: a DSN, read over POP3 --------------------------------


def _delivery_status(report: email.message.Message) -> list[dict[str, str]]:
    """The message/delivery-status part as field groups (per-message, then per-recipient)."""
    (status,) = [p for p in report.walk() if p.get_content_type() == "message/delivery-status"]
    groups: list[dict[str, str]] = []
    payload = status.get_payload()
    # The email package parses the part into a list of header blocks (RFC 3464 2.1).
    for block in payload if isinstance(payload, list) else []:
        assert isinstance(block, email.message.Message), block
        groups.append({k.lower(): " ".join(str(v).split()) for k, v in block.items()})
    return groups


def test_refused_recipient_bounces_to_the_sender_over_pop3(hosts: Hosts) -> None:
    token = new_token()
    ghost = "nobody-here@corp.example"
    message = make_message(token, sender=SMITH, recipient=ghost, subject="to a ghost")
    with submission_client(hosts.isp.ports["submission"], SMITH, SMITH_PASSWORD) as client:
        queue_id = send_and_get_queue_id(client, SMITH, [ghost], message)

    # smith reads the bounce the way a user does: POP3 with STLS.
    deadline = time.monotonic() + 20
    while True:
        pop = pop3_session(hosts.isp.ports["pop3"], security="stls",
                           user=SMITH, password=SMITH_PASSWORD)
        try:
            count, _ = pop.stat()
            if count or time.monotonic() > deadline:
                dsns = [pop3_message(pop, n) for n in range(1, count + 1)]
                break
        finally:
            pop.quit()
        time.sleep(0.2)
    assert len(dsns) == 1, (
        f"expected one bounce for smith, found {len(dsns)} (queue {queue_id})\n"
        f"isp output:\n{hosts.isp.output()}"
    )
    report = email.message_from_bytes(dsns[0], policy=email.policy.compat32)
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    assert report["From"] and report["To"] and SMITH in report["To"]
    assert report.get_all("Auto-Submitted") == ["auto-replied"]
    groups = _delivery_status(report)
    assert len(groups) >= 2, groups
    per_message, per_recipient = groups[0], groups[1]
    assert ISP_HOSTNAME in per_message.get("reporting-mta", ""), per_message
    assert per_recipient.get("final-recipient", "").lower() == f"rfc822; {ghost}", per_recipient
    assert per_recipient.get("action") == "failed", per_recipient
    assert per_recipient.get("status") == "5.1.1", per_recipient
    assert "550" in per_recipient.get("diagnostic-code", ""), per_recipient
    assert per_recipient.get("diagnostic-code", "").lower().startswith("smtp;"), per_recipient
    assert per_recipient.get("remote-mta", "").lower() == "dns; mx.corp.example", per_recipient
    # The original message (or its header) rides along (RFC 3464 2: third part).
    assert token.encode() in dsns[0]
    # Nothing for the ghost reached the receiving host's mailboxes, and the
    # provider's queue let go of the message.
    assert not hosts.corp.wait_for_message(BOSS, token.encode(), timeout=0.1)
    listing = wait_until_unqueued(hosts.isp, queue_id)
    assert queue_id not in listing, listing


# -- 2. next hop down: deferred, shown by `postroom queue show`, delivered later ------


def test_next_hop_down_defers_then_delivers(
    postroom_factory: Callable[..., Postroom],
    dnsmasq_factory: Callable[..., Dnsmasq],
) -> None:
    hosts = start_hosts(postroom_factory, dnsmasq_factory(*MX_RECORDS), retry_after="2s")
    hosts.corp.stop()
    token = new_token()
    message = make_message(token, sender=SMITH, recipient=BOSS, subject="while down")
    with submission_client(hosts.isp.ports["submission"], SMITH, SMITH_PASSWORD) as client:
        queue_id = send_and_get_queue_id(client, SMITH, [BOSS], message)

    # `postroom queue show ID`, as an administrator runs it, until it reports the failure.
    deadline = time.monotonic() + 20
    while True:
        shown = hosts.isp.cli("queue", "show", queue_id).stdout
        if ("deferred" in shown and "last answer" in shown and "next try at" in shown) or (
            time.monotonic() > deadline
        ):
            break
        time.sleep(0.2)
    assert f"message {queue_id}" in shown, shown
    assert f"<{SMITH}>" in shown, shown
    (line,) = [x for x in shown.splitlines() if f"<{BOSS}>" in x]
    assert "deferred" in line, shown
    assert "next try at" in shown, shown
    (answer,) = [x for x in shown.splitlines() if "last answer" in x]
    # The error names the hop found through the MX lookup and what went wrong.
    assert f"mx.corp.example[127.0.0.1]:{hosts.corp.smtp_port}" in answer, answer
    assert "refused" in answer.lower(), answer
    listing = hosts.isp.cli("queue", "list").stdout
    assert queue_id in listing and "1/1 pending" in listing, listing

    hosts.corp.start()
    stored = arrived(hosts.corp, token, timeout=30)
    assert_relayed(stored, message)
    assert queue_id not in wait_until_unqueued(hosts.isp, queue_id), "delivered but queued"
