"""Open-relay probes against a provider host that does relay — for its own users only.

The provider (mail.isp.example) relays mail its authenticated users submit
and even has a static route for corp.example; none of that may leak to the
SMTP (MX) port, where anyone connects (RFC 5321 3.6.2, 7.1). On submission
the user must be logged in and may only send as themselves (RFC 6409 4.3,
6.1). The probes use smtplib with raw commands and swaks (a relay tester's
usual tool); at the end nothing may be in the queue and the route's target
may never have been contacted.
"""

from __future__ import annotations

import base64
import re
import smtplib
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from mailcheck import make_message, new_token
from mailharness import LOOPBACK, Postroom, submission_client, unverified_tls_context

pytestmark = pytest.mark.interop

SMITH = "smith@isp.example"
SMITH_PASSWORD = "smith-secret"
JONES = "jones@isp.example"
FOREIGN = "victim@other.example"


class Tripwire:
    """A listening socket that counts the connections made to it (the route's target)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((LOOPBACK, 0))
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.port = int(self.sock.getsockname()[1])
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._count, name="tripwire", daemon=True)
        self._thread.start()

    def _count(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


@dataclass
class Provider:
    host: Postroom
    tripwire: Tripwire


@pytest.fixture(scope="module")
def provider(_module_servers: Any) -> Iterator[Provider]:
    tripwire = Tripwire()
    host = _module_servers.postroom(
        hostname="mail.isp.example", domains=["isp.example"],
        users={SMITH: SMITH_PASSWORD, JONES: "jones-secret"}, aliases={},
        listeners=("smtp", "submission"),
        extra_toml=(
            # A route is a way out: it must not turn into a way in.
            f'[routes]\n"corp.example" = "{LOOPBACK}:{tripwire.port}"\n'
            f'"other.example" = "{LOOPBACK}:{tripwire.port}"\n\n'
            # Shorter than the default 2s: one probe logs in with a wrong password.
            '[pop3]\nauth_failure_delay = "0.5"\n'
        ),
    )
    try:
        yield Provider(host, tripwire)
    finally:
        # Nothing the probes sent may have been queued or relayed.
        listing = host.cli("queue", "list").stdout
        tripwire.close()
        assert "the queue is empty" in listing, listing
        assert tripwire.connections == 0, "the provider contacted the route's target"


def mx_rcpt(port: int, sender: str, raw_path: str, *, starttls: bool = False) -> tuple[int, bytes]:
    """On the SMTP port: MAIL FROM:<sender>, then RCPT TO:<raw_path> sent verbatim."""
    with smtplib.SMTP(LOOPBACK, port, timeout=15) as client:
        client.ehlo("probe.example")
        if starttls:
            client.starttls(context=unverified_tls_context())
            client.ehlo("probe.example")
        code, text = client.mail(sender)
        assert code == 250, (code, text)
        return client.docmd("RCPT", f"TO:<{raw_path}>")


@pytest.mark.parametrize("sender", ["spammer@elsewhere.example", SMITH, ""],
                         ids=["foreign-sender", "local-sender", "null-sender"])
@pytest.mark.parametrize("rcpt", [FOREIGN, "boss@corp.example"], ids=["unrouted", "routed"])
def test_mx_port_refuses_foreign_recipients(provider: Provider, sender: str, rcpt: str) -> None:
    code, text = mx_rcpt(provider.host.smtp_port, sender, rcpt)
    assert (code, text[:5]) == (554, b"5.7.1"), (code, text)


def test_mx_port_refuses_relaying_after_starttls(provider: Provider) -> None:
    code, text = mx_rcpt(provider.host.smtp_port, SMITH, FOREIGN, starttls=True)
    assert (code, text[:5]) == (554, b"5.7.1"), (code, text)


def test_mx_port_gives_no_relay_for_a_login(provider: Provider) -> None:
    # The MX port offers no AUTH (RFC 6409 leaves AUTH to submission); even a
    # good password sent there must not open relaying.
    with smtplib.SMTP(LOOPBACK, provider.host.smtp_port, timeout=15) as client:
        client.ehlo("probe.example")
        client.starttls(context=unverified_tls_context())
        client.ehlo("probe.example")
        assert not client.has_extn("auth"), client.esmtp_features
        plain = base64.b64encode(f"\0{SMITH}\0{SMITH_PASSWORD}".encode()).decode()
        code, _ = client.docmd("AUTH", f"PLAIN {plain}")
        assert 500 <= code < 600, code
        assert client.mail(SMITH)[0] == 250
        code, text = client.docmd("RCPT", f"TO:<{FOREIGN}>")
    assert (code, text[:5]) == (554, b"5.7.1"), (code, text)


@pytest.mark.parametrize(
    "raw_path",
    [
        "victim%other.example@isp.example",
        "smith%other.example@isp.example",
        "other.example!victim@isp.example",
        "@isp.example:victim@other.example",
        "@mail.isp.example,@isp.example:victim@other.example",
        '"victim@other.example"@isp.example',
        "victim@other.example@isp.example",
        "victim@other.example.",
        "victim@[192.0.2.1]",
        f"victim@[{LOOPBACK}]",
    ],
)
def test_mx_port_refuses_address_tricks(provider: Provider, raw_path: str) -> None:
    code, text = mx_rcpt(provider.host.smtp_port, "spammer@elsewhere.example", raw_path)
    assert 500 <= code < 600, f"RCPT TO:<{raw_path}> got {code} {text!r}"


@pytest.mark.parametrize(
    "rcpt",
    [FOREIGN, "user%other.example@isp.example", "@isp.example:victim@other.example"],
)
def test_swaks_probe_of_mx_port_is_refused(
    provider: Provider, require_peer: Callable[..., str], rcpt: str
) -> None:
    swaks = require_peer("swaks")
    result = subprocess.run(
        [swaks, "--server", f"{LOOPBACK}:{provider.host.smtp_port}", "--helo", "probe.example",
         "--from", "spammer@elsewhere.example", "--to", rcpt, "--timeout", "15"],
        capture_output=True, timeout=30, check=False,
    )
    out = result.stdout.decode(errors="replace")
    assert result.returncode != 0, out
    # swaks marks an unexpected reply with "<**"; the RCPT must be the one refused.
    refused = [line for line in out.splitlines() if re.match(r"<[*~]\* 5", line)]
    assert refused, out
    assert "-> RCPT TO:" in out and "-> DATA" not in out, out


def test_submission_without_auth_is_refused(provider: Provider) -> None:
    with smtplib.SMTP(LOOPBACK, provider.host.ports["submission"], timeout=15) as client:
        client.starttls(context=unverified_tls_context())
        client.ehlo("laptop.example")
        code, text = client.mail(SMITH)
        if code == 250:  # refusing at RCPT would do as well
            code, text = client.rcpt(FOREIGN)
    assert (code, text[:5]) == (530, b"5.7.0"), (code, text)


def test_submission_with_a_wrong_password_is_refused(provider: Provider) -> None:
    with smtplib.SMTP(LOOPBACK, provider.host.ports["submission"], timeout=15) as client:
        client.starttls(context=unverified_tls_context())
        client.ehlo("laptop.example")
        with pytest.raises(smtplib.SMTPAuthenticationError) as failed:
            client.login(SMITH, "not-the-password")
        assert failed.value.smtp_code == 535
        code, text = client.mail(SMITH)
        if code == 250:
            code, text = client.rcpt(FOREIGN)
    assert code == 530, (code, text)


@pytest.mark.parametrize("sender", [JONES, "boss@corp.example", "smith@other.example"])
def test_submission_refuses_someone_elses_sender(provider: Provider, sender: str) -> None:
    with submission_client(provider.host.ports["submission"], SMITH, SMITH_PASSWORD) as client:
        code, text = client.mail(sender)
    assert (code, text[:5]) == (553, b"5.7.1"), (code, text)


def test_swaks_auth_as_smith_with_jones_as_sender(
    provider: Provider, require_peer: Callable[..., str]
) -> None:
    swaks = require_peer("swaks")
    result = subprocess.run(
        [swaks, "--server", f"{LOOPBACK}:{provider.host.ports['submission']}",
         "--helo", "laptop.example", "-tls", "--auth", "PLAIN", "--auth-user", SMITH,
         "--auth-password", SMITH_PASSWORD, "--from", JONES, "--to", FOREIGN,
         "--timeout", "15"],
        capture_output=True, timeout=30, check=False,
    )
    out = result.stdout.decode(errors="replace")
    assert result.returncode != 0, out
    # swaks marks an unexpected reply "<**", or "<~*" inside TLS.
    assert re.search(r"^<[*~]\* 553 5\.7\.1 ", out, re.MULTILINE), out


def test_submission_refuses_a_forged_from_header(provider: Provider) -> None:
    # The envelope is smith's, the From: header is jones's (RFC 6409 8 lets a
    # submission server check it; postroom's check_from_header is on by default).
    message = make_message(new_token(), sender=JONES, recipient=FOREIGN)
    with submission_client(provider.host.ports["submission"], SMITH, SMITH_PASSWORD) as client:
        assert client.mail(SMITH)[0] == 250
        assert client.rcpt(FOREIGN)[0] == 250
        code, text = client.data(message)
    assert 500 <= code < 600 and text[:5] == b"5.7.1", (code, text)
