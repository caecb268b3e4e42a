"""The metrics endpoint adds up every server process: after a known mix of traffic, the
counters read from /metrics match it exactly, and /health says what works.

postroom runs as `postroom serve` with two processes (the primary and a worker
sharing the listeners); SMTP, submission and POP3 sessions run in parallel so
both take some, and the primary relays to a sink (aiosmtpd) that accepts one
recipient and refuses another, and to a port where nothing listens.
"""

from __future__ import annotations

import poplib
import re
import smtplib
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from mailharness import LOOPBACK, Postroom, free_ports, unverified_tls_context

pytestmark = pytest.mark.interop

USER, PASSWORD = "smith@corp.example", "smith-secret"
LOCAL = "boss@corp.example"
WAIT = 60.0
MX_SESSIONS = 12


class SinkHandler:
    """Accepts mail for anyone but reject@; refuses that one for good (550)."""

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        if address.startswith("reject@"):
            return "550 5.1.1 no such user"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        return "250 2.0.0 Ok"


@pytest.fixture(name="server")
def server_fixture(tmp_path: Path) -> Iterator[tuple[Postroom, int]]:
    sink_port, metrics_port, closed_port = free_ports(3)
    sink = Controller(SinkHandler(), hostname=LOOPBACK, port=sink_port)
    sink.start()
    server = Postroom(
        tmp_path / "postroom", users={USER: PASSWORD, LOCAL: "boss-secret"}, aliases={},
        listeners=("smtp", "submission", "pop3s"), workers=2,
        extra_toml=(f'[metrics]\nlisten = "{LOOPBACK}:{metrics_port}"\n'
                    '[pop3]\nauth_failure_delay = "0"\n'
                    '[queue]\nretry_after = ["1h"]\n'  # one attempt each within the test
                    f'[routes]\n"sink.example" = "{LOOPBACK}:{sink_port}"\n'
                    f'"down.example" = "{LOOPBACK}:{closed_port}"\n'))
    try:
        server.start()
        yield server, metrics_port
    finally:
        server.stop()
        sink.stop()


def scrape(port: int) -> dict[str, float]:
    """{'name{labels}': value} from the endpoint (comments left out)."""
    with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/metrics", timeout=30) as answer:
        text = answer.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def mx_session(port: int, number: int) -> None:
    with smtplib.SMTP(LOOPBACK, port, timeout=30) as client:
        client.sendmail("someone@elsewhere.example", [LOCAL],
                        f"Subject: mx {number}\r\n\r\nhello\r\n".encode())


def submission_session(port: int, password: str, recipient: str | None) -> None:
    with smtplib.SMTP(LOOPBACK, port, timeout=30) as client:
        client.starttls(context=unverified_tls_context())
        client.ehlo()
        client.user, client.password = USER, password
        try:  # one mechanism: smtplib's login() would try the next after a failure
            client.auth("PLAIN", client.auth_plain)
        except smtplib.SMTPAuthenticationError:
            return
        assert recipient is not None
        client.sendmail(USER, [recipient], f"From: {USER}\r\nTo: {recipient}\r\n"
                        "Subject: out\r\n\r\nhello\r\n".encode())


def pop3_session(port: int, password: str, retrieve: int) -> None:
    client = poplib.POP3_SSL(LOOPBACK, port, timeout=30, context=unverified_tls_context())
    try:
        client.user(LOCAL)
        try:
            client.pass_(password)
        except poplib.error_proto:
            return
        for number in range(1, retrieve + 1):
            client.retr(number)
    finally:
        client.quit()


EXPECTED = {
    # The sessions, and the harness's look for the banner before the test.
    'postroom_connections_total{listener="smtp"}': MX_SESSIONS + 1,
    'postroom_connections_total{listener="submission"}': 7,
    'postroom_connections_total{listener="pop3s"}': 3,
    'postroom_messages_received_total{listener="smtp"}': MX_SESSIONS,
    'postroom_messages_received_total{listener="submission"}': 4,
    'postroom_data_to_reply_seconds_count{listener="smtp"}': MX_SESSIONS,
    'postroom_data_to_reply_seconds_count{listener="submission"}': 4,
    'postroom_auth_total{listener="submission",result="success"}': 4,
    'postroom_auth_total{listener="submission",result="failure"}': 3,
    'postroom_auth_total{listener="pop3s",result="success"}': 2,
    'postroom_auth_total{listener="pop3s",result="failure"}': 1,
    'postroom_pop3_logins_total{listener="pop3s"}': 2,
    'postroom_pop3_retrievals_total{listener="pop3s"}': 3,
    # MX mail filed at once, and the bounce of the refused recipient, to smith.
    "postroom_messages_delivered_total": MX_SESSIONS + 1,
    'postroom_relay_recipients_total{outcome="relayed"}': 2,
    'postroom_relay_recipients_total{outcome="bounced"}': 1,
    'postroom_relay_recipients_total{outcome="deferred"}': 1,
    "postroom_relay_seconds_count": 4,
    'postroom_sessions{listener="smtp"}': 0,
    'postroom_sessions{listener="submission"}': 0,
    'postroom_sessions{listener="pop3s"}': 0,
    'postroom_queue_messages{age="under_5m",state="deferred"}': 1,
}


def test_counters_add_up_across_processes(server: tuple[Postroom, int]) -> None:
    postroom, metrics_port = server
    smtp, submission, pop3s = (postroom.ports[n] for n in ("smtp", "submission", "pop3s"))
    with ThreadPoolExecutor(8) as pool:
        jobs = [pool.submit(mx_session, smtp, n) for n in range(MX_SESSIONS)]
        jobs += [pool.submit(submission_session, submission, "wrong", None) for _ in range(3)]
        jobs += [pool.submit(submission_session, submission, PASSWORD, rcpt) for rcpt in (
            "a@sink.example", "b@sink.example", "reject@sink.example", "c@down.example")]
        for job in jobs:
            job.result()
    pop3_session(pop3s, "boss-secret", 2)
    pop3_session(pop3s, "bad", 0)
    pop3_session(pop3s, "boss-secret", 1)

    # The relay and the bounce run on in the primary: wait for their counts to land.
    deadline = time.monotonic() + WAIT
    while True:
        values = scrape(metrics_port)
        seen = {key: values.get(key, 0.0) for key in EXPECTED}
        if seen == EXPECTED or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert seen == EXPECTED
    tls = {k: v for k, v in values.items() if k.startswith("postroom_tls_handshakes_total")}
    by_listener = {name: sum(v for k, v in tls.items() if f'listener="{name}"' in k)
                   for name in ("submission", "pop3s")}
    assert by_listener == {"submission": 7, "pop3s": 3}
    assert all(re.search(r'version="TLSv1\.[23]"', k) for k in tls)
    # Counted in more than one process (the primary relays, both take sessions).
    files = list((postroom.data / "metrics").glob("counter_*.db"))
    assert len(files) >= 2
    with urllib.request.urlopen(f"http://{LOOPBACK}:{metrics_port}/health", timeout=30) as r:
        assert r.status == 200
        health = r.read().decode()
    assert "listeners: ok" in health and "queue: ok (1 messages)" in health
    assert "store: ok" in health


def test_metrics_are_off_by_default(tmp_path: Path) -> None:
    server = Postroom(tmp_path / "postroom", listeners=("smtp",), workers=1)
    try:
        server.start()
        assert not (server.data / "metrics").exists()
        assert "serving metrics" not in server.output()
    finally:
        server.stop()
