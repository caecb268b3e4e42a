"""Opportunistic TLS against a real Postfix whose STARTTLS handshake always fails.

The private Postfix offers STARTTLS and answers it with 220, but it speaks
only TLS 1.0 and 1.1, which postroom's client (Python's default context,
TLS 1.2 at least) refuses: every handshake fails. RFC 3207 4.1 leaves it to
the client what to do then. Where TLS was only opportunistic (a plain static
route, or an MX host) postroom connects again and delivers in plaintext, as
Postfix does at security level "may" and Exim with tls_tempfail_tryclear;
a route with tls = "required" never does: the message waits (4.7.5).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
from mailcheck import make_message, new_token
from mailharness import (
    LOOPBACK,
    Postroom,
    PrivatePostfix,
    send_and_get_queue_id,
    submission_client,
    wait_until_unqueued,
)
from test_relay_postfix import self_signed, wait_for_log

pytestmark = pytest.mark.interop

SMITH = "smith@isp.example"
SMITH_PASSWORD = "smith-secret"
PF_USER = "user"


def test_failed_handshake_goes_plaintext_only_where_tls_is_opportunistic(
    postroom_factory: Callable[..., Postroom],
    private_postfix: Callable[..., PrivatePostfix],
    require_peer: Callable[..., str],
    tmp_path: Path,
) -> None:
    cert, key = self_signed(require_peer("openssl"), tmp_path / "pf-tls", "mx.pf.example")
    postfix = private_postfix(
        myhostname="mx.pf.example", mailbox_domain="pf.example", mailbox_users=[PF_USER],
        extra_main_cf={
            "smtpd_tls_security_level": "may",
            "smtpd_tls_cert_file": str(cert),
            "smtpd_tls_key_file": str(key),
            "smtpd_tls_protocols": "<=TLSv1.1",
            "smtpd_tls_loglevel": "1",
        },
    )
    isp = postroom_factory(
        hostname="mail.isp.example", domains=["isp.example"],
        users={SMITH: SMITH_PASSWORD}, aliases={}, listeners=("smtp", "submission"),
        extra_toml=(
            "[routes]\n"
            f'"pf.example" = "{LOOPBACK}:{postfix.port}"\n'
            f'"strict.example" = {{ host = "{LOOPBACK}:{postfix.port}", tls = "required" }}\n\n'
            '[queue]\nretry_after = ["1h"]\ngive_up_after = "5d"\n'
        ),
    )
    token = new_token()
    opportunistic = make_message(token, sender=SMITH, recipient="user@pf.example")
    strict = make_message(f"s{token}", sender=SMITH, recipient="user@strict.example")
    with submission_client(isp.ports["submission"], SMITH, SMITH_PASSWORD) as client:
        plain_id = send_and_get_queue_id(client, SMITH, ["user@pf.example"], opportunistic)
        strict_id = send_and_get_queue_id(client, SMITH, ["user@strict.example"], strict)

    # The opportunistic route: the handshake failed, then the message went in plaintext.
    log = wait_for_log(isp.output, rf"{plain_id}: to=<user@pf\.example>.*status=sent")
    sent = [x for x in log.splitlines() if plain_id in x and "status=sent" in x]
    assert sent and "dsn=2.0.0" in sent[0], log
    assert re.search(r"cannot start TLS with .*; trying again without TLS", log), log
    wait_for_log(postfix.log, r"status=sent \(delivered to maildir\)")
    stored = [f.read_bytes() for f in (postfix.mailbox_path(PF_USER) / "new").iterdir()]
    assert [token.encode() in data for data in stored] == [True], postfix.log()
    # Postfix's Received header says "with ESMTP", not ESMTPS: no TLS on that hop.
    received = stored[0].split(b"\n\n", 1)[0].decode()
    assert "with ESMTP id" in " ".join(received.split()), received

    # The route that requires TLS: never in plaintext; the message waits, 4.7.5.
    log = wait_for_log(isp.output, rf"{strict_id}: to=<user@strict\.example>.*status=deferred")
    deferred = [x for x in log.splitlines() if strict_id in x and "status=deferred" in x]
    assert deferred and "dsn=4.7.5" in deferred[0], log
    assert "cannot start TLS" in deferred[0], deferred[0]
    listing = wait_until_unqueued(isp, plain_id)
    assert strict_id in listing and plain_id not in listing, listing
    assert not any(f"s{token}".encode() in data for data in stored)
    # Postfix accepted STARTTLS and saw the handshake fail, once for each route.
    pf_log = wait_for_log(postfix.log, r"SSL_accept error from(.|\n)*SSL_accept error from")
    assert len(re.findall(r"SSL_accept error from", pf_log)) == 2, pf_log
