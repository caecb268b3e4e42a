"""The log lines README documents: the fail2ban filter it gives finds postroom's failed
logins (run through fail2ban-regex), and the delivery summary reads as documented."""

from __future__ import annotations

import poplib
import re
import smtplib
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from mailharness import LOOPBACK, REPO, Postroom, unverified_tls_context

pytestmark = pytest.mark.interop

USER, PASSWORD = "boss@corp.example", "boss-secret"


def readme_filter() -> str:
    """The fail2ban filter as README.md prints it."""
    text = (REPO / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```ini\n(.*?)```", text, re.S) if "failregex" in b]
    return block


def test_the_fail2ban_filter_finds_every_failed_login(
        tmp_path: Path, require_peer: Callable[[str], str]) -> None:
    fail2ban_regex = require_peer("fail2ban-regex")
    server = Postroom(tmp_path / "postroom", users={USER: PASSWORD}, aliases={},
                      listeners=("smtp", "submission", "pop3"), workers=1,
                      extra_toml='[pop3]\nallow_plaintext_auth = true\nauth_failure_delay = "0"\n')
    server.start()
    try:
        with smtplib.SMTP(LOOPBACK, server.ports["submission"], timeout=30) as client:
            client.starttls(context=unverified_tls_context())
            client.ehlo()
            client.user, client.password = USER, "wrong"
            with pytest.raises(smtplib.SMTPAuthenticationError):
                client.auth("PLAIN", client.auth_plain)
        pop = poplib.POP3(LOOPBACK, server.ports["pop3"], timeout=30)
        pop.user(USER)
        with pytest.raises(poplib.error_proto):
            pop.pass_("wrong")
        pop.quit()
        with smtplib.SMTP(LOOPBACK, server.ports["smtp"], timeout=30) as client:
            client.sendmail("a@example.org", [USER], b"Subject: x\r\n\r\nhi\r\n")
    finally:
        server.stop()
    log = tmp_path / "postroom.log"
    log.write_text(server.output())
    conf = tmp_path / "postroom-filter.conf"
    conf.write_text(readme_filter())
    result = subprocess.run([fail2ban_regex, "--print-all-matched", str(log), str(conf)],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"Failregex: 2 total", result.stdout), result.stdout
    assert "submission: authentication failed" in result.stdout
    assert "pop3: authentication failed" in result.stdout
    # The delivery summary as documented: QUEUEID: to=<...>, relay=, delay=, dsn=, status=
    summary = re.compile(r"postroom\.smtpd\[\d+\]: smtp: ([0-9A-Z]+): to=<boss@corp\.example>, "
                         r"relay=local, delay=[0-9.]+, dsn=2\.0\.0, status=sent \(")
    found = summary.search(log.read_text())
    assert found is not None
    assert f"{found[1]}: from=<a@example.org>" in log.read_text()
