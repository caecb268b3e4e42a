"""The private Postfix of the interop tests is built from the package's master.cf, not the owner's.

A machine whose owner configured Postfix has an /etc/postfix/master.cf with
services of their own: a submission listener, a content filter's re-injection
port. A private instance copied from it would try to bind those ports too
(and fail where the system's Postfix holds them). Here the owner's master.cf
is replaced, in a mount namespace of the test's own, by one with an extra
listener on a port this test holds: the private Postfix must start anyway.
Needs root (mount namespace, Postfix); skipped without it, a failure in CI.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from mailharness import LOOPBACK, MASTER_CF_TEMPLATE, PrivatePostfix

pytestmark = pytest.mark.interop

HERE = Path(__file__).resolve().parent
OWNERS_MASTER_CF = Path("/etc/postfix/master.cf")


def test_master_cf_is_the_templates_with_the_test_port(
    tmp_path: Path, peer_missing: Callable[[str], None]
) -> None:
    if not MASTER_CF_TEMPLATE.is_file():
        peer_missing(f"{MASTER_CF_TEMPLATE} is missing (postfix is not installed)")
    postfix = PrivatePostfix(tmp_path)
    written = postfix._master_cf().splitlines()
    template = MASTER_CF_TEMPLATE.read_text().splitlines()
    changed = [(a, b) for a, b in zip(template, written, strict=True) if a != b]
    assert len(changed) == 1 and changed[0][0].startswith("smtp ")
    assert changed[0][1] == f"{LOOPBACK}:{postfix.port} inet n - n - - smtpd"


def test_a_missing_template_is_named(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, peer_missing: Callable[[str], None]
) -> None:
    import mailharness

    missing = tmp_path / "master.cf.dist"
    monkeypatch.setattr(mailharness, "MASTER_CF_TEMPLATE", missing)
    reason = PrivatePostfix.unavailable_reason()
    if reason is not None and "postfix is not installed" in reason:
        peer_missing(reason)
    assert reason is not None and str(missing) in reason and "postfix package" in reason


def test_an_owner_configured_master_cf_does_not_reach_the_private_postfix(
    tmp_path: Path, peer_missing: Callable[[str], None]
) -> None:
    reason = PrivatePostfix.unavailable_reason()
    if reason is not None:
        peer_missing(reason)
    if shutil.which("unshare") is None or not OWNERS_MASTER_CF.is_file():
        peer_missing("needs unshare(1) and an /etc/postfix/master.cf to stand in for")
    held = socket.socket()
    held.bind((LOOPBACK, 0))
    held.listen()
    port = held.getsockname()[1]
    owners = tmp_path / "owners-master.cf"
    owners.write_text(MASTER_CF_TEMPLATE.read_text() + textwrap.dedent(f"""\
        # The owner's own services:
        submission inet n - y - - smtpd
        {LOOPBACK}:{port} inet n - n - - smtpd
        """))
    # Not under pytest's temp folder, which another pytest run may make 0700 again
    # meanwhile, locking out the postfix user.
    root = Path(tempfile.mkdtemp(prefix="postroom-postfix-")) / "postfix"
    script = tmp_path / "start.py"
    script.write_text(textwrap.dedent(f"""\
        import sys
        sys.path.insert(0, {str(HERE)!r})
        from pathlib import Path
        from mailharness import PrivatePostfix
        postfix = PrivatePostfix(Path({str(root)!r}))
        try:
            postfix.start()
        finally:
            postfix.stop()
        """))
    try:
        command = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
                   'mount --bind "$1" /etc/postfix/master.cf && exec "$2" "$3"', "sh",
                   str(owners), sys.executable, str(script)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120,
                                check=False, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    finally:
        held.close()
        shutil.rmtree(root.parent, ignore_errors=True)
    if result.returncode != 0 and "mount:" in result.stderr and "postfix" not in result.stderr:
        peer_missing(f"cannot bind-mount in a mount namespace: {result.stderr.strip()}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert OWNERS_MASTER_CF.read_text() != owners.read_text()  # the namespace is gone
