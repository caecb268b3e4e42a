"""postroom's relay and Postfix, each as the other's neighbour on the sending path.

postroom -> Postfix: the provider host relays pf.example through a static
route to a private Postfix that files the message in a Maildir (virtual(8));
Postfix's own log must say the message was delivered (status=sent), and
postroom's log must carry its Postfix-style delivery summary. Once in plain
text (Postfix offers no STARTTLS) and once with Postfix offering STARTTLS,
which postroom's client takes (opportunistic TLS, RFC 3207).

Postfix -> postroom's submission port: Postfix as a smarthost client
(relayhost, TLS required, SASL PLAIN with smith's password), the way a
small office's Postfix forwards through its provider. postroom must insist on
TLS and AUTH and file the message for the local recipient.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from mailcheck import make_message, new_token, received_headers, split_message
from mailharness import (
    LOOPBACK,
    Postroom,
    PrivatePostfix,
    send_and_get_queue_id,
    submission_client,
    wait_until_unqueued,
)

pytestmark = pytest.mark.interop

SMITH = "smith@isp.example"
SMITH_PASSWORD = "smith-secret"
JONES = "jones@isp.example"
ISP_HOSTNAME = "mail.isp.example"
PF_USER = "user"
PF_RCPT = f"{PF_USER}@pf.example"


def provider(make_postroom: Callable[..., Postroom], extra_toml: str = "") -> Postroom:
    return make_postroom(
        hostname=ISP_HOSTNAME, domains=["isp.example"],
        users={SMITH: SMITH_PASSWORD, JONES: "jones-secret"}, aliases={},
        listeners=("smtp", "submission"), extra_toml=extra_toml,
    )


def self_signed(openssl: str, folder: Path, name: str) -> tuple[Path, Path]:
    """A throwaway certificate and key for `name` (Postfix's smtpd needs files)."""
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(cert)],
        capture_output=True, check=True, timeout=60,
    )
    return cert, key


def postfix_lines_for(log: str, message_id: str) -> list[str]:
    """The Postfix log lines about the queue file that holds Message-ID `message_id`."""
    found = re.search(r" ([0-9A-F]{6,}): message-id=<" + re.escape(message_id) + ">", log)
    assert found, f"no message-id={message_id} in the Postfix log:\n{log}"
    queue_id = found.group(1)
    return [line for line in log.splitlines() if f" {queue_id}: " in line]


def wait_for_log(read: Callable[[], str], pattern: str, timeout: float = 20.0) -> str:
    """Poll a log until `pattern` (a regex) matches; return the log."""
    deadline = time.monotonic() + timeout
    while True:
        text = read()
        if re.search(pattern, text) or time.monotonic() > deadline:
            return text
        time.sleep(0.1)


@pytest.mark.parametrize("postfix_tls", [False, True], ids=["plain", "starttls"])
@pytest.mark.parametrize("chunking", [True, False], ids=["bdat", "data"])
def test_postroom_relays_into_postfix(
    postroom_factory: Callable[..., Postroom],
    private_postfix: Callable[..., PrivatePostfix],
    require_peer: Callable[..., str],
    tmp_path: Path,
    postfix_tls: bool,
    chunking: bool,
) -> None:
    # Postfix offers CHUNKING, so postroom sends with BDAT (RFC 3030); with the
    # keyword discarded it falls back to DATA. Postfix's per-peer debug log
    # shows which command carried the message (decrypted, also under TLS).
    settings: dict[str, str] = {"debug_peer_list": LOOPBACK, "debug_peer_level": "1"}
    if not chunking:
        settings["smtpd_discard_ehlo_keywords"] = "chunking"
    if postfix_tls:
        cert, key = self_signed(require_peer("openssl"), tmp_path / "pf-tls", "mx.pf.example")
        settings |= {
            "smtpd_tls_security_level": "may",
            "smtpd_tls_cert_file": str(cert),
            "smtpd_tls_key_file": str(key),
            "smtpd_tls_loglevel": "1",
            "smtpd_tls_received_header": "yes",
        }
    postfix = private_postfix(myhostname="mx.pf.example", mailbox_domain="pf.example",
                              mailbox_users=[PF_USER], extra_main_cf=settings)
    isp = provider(postroom_factory,
                   f'[routes]\n"pf.example" = "{LOOPBACK}:{postfix.port}"\n\n'
                   '[queue]\nretry_after = ["1s"]\ngive_up_after = "1h"\n')
    token = new_token()
    message = make_message(token, sender=SMITH, recipient=PF_RCPT, subject="to postfix")
    with submission_client(isp.ports["submission"], SMITH, SMITH_PASSWORD) as client:
        queue_id = send_and_get_queue_id(client, SMITH, [PF_RCPT], message)

    wait_for_log(postfix.log, r"status=sent \(delivered to maildir\)")
    log = postfix.log_path.read_text(errors="replace")  # whole: the debug lines are many
    lines = postfix_lines_for(log, f"{token}@client.example")
    delivered = [x for x in lines if "status=sent" in x]
    assert len(delivered) == 1, "\n".join(lines)
    assert f"to=<{PF_RCPT}>" in delivered[0], delivered[0]
    assert "delivered to maildir" in delivered[0], delivered[0]
    client_line = [x for x in lines if "client=" in x]
    assert client_line and "[127.0.0.1]" in client_line[0], "\n".join(lines)
    if postfix_tls:
        assert re.search(r"TLS connection established from \S+\[127\.0\.0\.1\]", log), log
    bdat = re.search(r"< \S+\[127\.0\.0\.1\]: BDAT \d+ LAST", log)
    data = re.search(r"< \S+\[127\.0\.0\.1\]: DATA", log)
    assert (bdat is not None, data is not None) == (chunking, not chunking), log[-6000:]

    files = [p for p in (postfix.mailbox_path(PF_USER) / "new").iterdir()]
    stored = [p.read_bytes() for p in files if token.encode() in p.read_bytes()]
    assert len(stored) == 1, f"{len(stored)} copies in Postfix's Maildir"
    received = [" ".join(r.split()) for r in received_headers(stored[0])]
    assert f"from {ISP_HOSTNAME}" in received[0] and "by mx.pf.example (Postfix)" in received[0]
    # Postfix writes "with ESMTPS" when the hop was encrypted.
    assert ("with ESMTPS" in received[0]) is postfix_tls, received[0]
    assert f"by {ISP_HOSTNAME}" in received[1], received
    # Postfix's Maildir files end lines in LF alone (its local convention).
    body = split_message(message)[1].replace(b"\r\n", b"\n")
    assert stored[0].partition(b"\n\n")[2] == body

    # postroom's own delivery summary names the queue ID, the relay and the outcome.
    output = wait_for_log(isp.output, rf"{queue_id}.*to=<{re.escape(PF_RCPT)}>.*status=sent")
    summary = [x for x in output.splitlines()
               if queue_id in x and f"to=<{PF_RCPT}>" in x and "status=sent" in x]
    assert summary, output
    assert f"{postfix.port}" in summary[0] and "dsn=2.0.0" in summary[0], summary[0]
    assert queue_id not in wait_until_unqueued(isp, queue_id)


def test_postfix_submits_to_postroom_with_starttls_and_auth(
    postroom_factory: Callable[..., Postroom],
    private_postfix: Callable[..., PrivatePostfix],
) -> None:
    isp = provider(postroom_factory)
    port = isp.ports["submission"]
    # Postfix's SMTP client looks up "[host]:port" of the relayhost in the map.
    postfix = private_postfix(
        relayhost=(LOOPBACK, port),
        tls_level="encrypt",
        extra_main_cf={
            "smtp_sasl_auth_enable": "yes",
            "smtp_sasl_password_maps": (
                f"inline:{{ {{[{LOOPBACK}]:{port} = {SMITH}:{SMITH_PASSWORD}}} }}"
            ),
            # The default forbids plaintext mechanisms even inside TLS.
            "smtp_sasl_security_options": "noanonymous",
            "smtp_sasl_tls_security_options": "noanonymous",
        },
    )
    token = new_token()
    message = make_message(token, sender=SMITH, recipient=JONES, subject="via postfix")
    postfix.send(SMITH, [JONES], message)
    found = isp.wait_for_message(JONES, token.encode(), timeout=30)
    assert len(found) == 1, (
        f"found {len(found)} copies\npostfix log:\n{postfix.log()}\npostroom:\n{isp.output()}"
    )
    received = [" ".join(r.split()) for r in received_headers(found[0])]
    # postroom's header on top: Postfix authenticated inside TLS (RFC 3848 ESMTPSA).
    assert f"by {ISP_HOSTNAME}" in received[0] and "with ESMTPSA" in received[0], received
    assert "relay.test" in received[0], received
    assert split_message(found[0])[1] == split_message(message)[1]
    # The file is in the Maildir just before postroom's 250 goes out, and Postfix
    # logs the delivery a moment after reading that 250: wait for the line.
    log = wait_for_log(postfix.log, r"status=sent")
    assert re.search(r"status=sent", log), log
