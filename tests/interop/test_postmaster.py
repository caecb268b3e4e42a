"""Real clients reach postmaster@ every local domain, and quoted local parts, of `postroom serve`.

RFC 5321 4.5.1: postmaster@ each domain a host receives for must be
deliverable, in any letter case; here it is filed in the administrator's
mailbox (`postmaster` in the config). RFC 5321 4.1.2: `"alice"@corp.example`
names the mailbox alice@corp.example.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from mailcheck import new_token
from mailharness import LOOPBACK, Postroom

pytestmark = pytest.mark.interop

SENDER = "sender@client.example"
ADMIN = "boss@corp.example"


@pytest.fixture
def server(postroom_factory: Callable[..., Postroom]) -> Postroom:
    """postroom with the MX and submission listeners, corp.example and other.example added
    with `postroom domain add`, users boss@ and alice@corp.example, and boss the
    administrator."""
    server = postroom_factory(start=False, listeners=("smtp", "submission"),
                              domains=["corp.example", "other.example"])
    server.setup()
    # A top-level key must come before the first table.
    server.config_path.write_text(f'postmaster = "{ADMIN}"\n' + server.config_path.read_text())
    server.start()
    return server


def swaks(program: str, port: int, rcpt: str, token: str, *extra: str) -> str:
    """Send one message with swaks; its transcript (the test fails if swaks does)."""
    result = subprocess.run(
        [program, "--server", f"{LOOPBACK}:{port}", "--helo", "client.example",
         "--to", rcpt, "--header", f"Subject: {token}", "--timeout", "15", *extra],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, f"swaks to {rcpt}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.mark.parametrize("rcpt", ["postmaster@corp.example", "POSTMASTER@Other.Example",
                                  "postmaster"])
def test_swaks_reaches_postmaster(
    server: Postroom, require_peer: Callable[..., str], rcpt: str
) -> None:
    token = new_token()
    transcript = swaks(require_peer("swaks"), server.smtp_port, rcpt, token, "--from", SENDER)
    assert f"RCPT TO:<{rcpt}>" in transcript
    assert server.wait_for_message(ADMIN, token.encode()), server.output()


def test_swaks_reaches_postmaster_on_submission(
    server: Postroom, require_peer: Callable[..., str]
) -> None:
    token = new_token()
    swaks(require_peer("swaks"), server.ports["submission"], "Postmaster@other.example", token,
          "-tls", "--auth", "PLAIN", "--auth-user", "alice@corp.example",
          "--auth-password", "alice-secret", "--from", "alice@corp.example")
    assert server.wait_for_message(ADMIN, token.encode()), server.output()


def test_swaks_quoted_local_part(postroom: Postroom, require_peer: Callable[..., str]) -> None:
    token = new_token()
    transcript = swaks(require_peer("swaks"), postroom.smtp_port, '"alice"@corp.example', token,
                       "--from", SENDER)
    assert 'RCPT TO:<"alice"@corp.example>' in transcript
    assert postroom.wait_for_message("alice@corp.example", token.encode()), postroom.output()


def test_curl_quoted_local_part(
    postroom: Postroom, require_peer: Callable[..., str], tmp_path: Path
) -> None:
    curl = require_peer("curl")
    token = new_token()
    eml = tmp_path / "m.eml"
    eml.write_bytes(f"From: {SENDER}\r\nSubject: {token}\r\n\r\nhello\r\n".encode())
    result = subprocess.run(
        [curl, "--silent", "--show-error", "--max-time", "15", "--verbose",
         f"smtp://{LOOPBACK}:{postroom.smtp_port}/client.example", "--mail-from", SENDER,
         "--mail-rcpt", '"alice"@corp.example', "--upload-file", str(eml)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert 'RCPT TO:<"alice"@corp.example>' in result.stderr
    assert postroom.wait_for_message("alice@corp.example", token.encode()), postroom.output()
