"""`postroom fetch` against Dovecot's POP3 server: STLS, SASL PLAIN or USER/PASS, UIDL.

A private Dovecot serves a Maildir this test fills directly (LF line ends, as
Dovecot keeps them); fetch downloads into a local Maildir, and each local copy
must be the server's file byte for byte. Keep mode takes only new mail on the
second run; delete mode empties Dovecot's Maildir; a run cut off after the
first message, run again, ends with every message exactly once.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from mailcheck import CRLF, make_message, new_token
from mailharness import HarnessError, PrivateDovecot, maildir_files

from postroom.client.fetch import FetchError, FetchOptions, FetchResult, fetch
from postroom.net.channel import Channel
from postroom.tlscert import make_self_signed

pytestmark = pytest.mark.interop

USER = "boss@corp.example"
PASSWORD = "boss-secret"


@pytest.fixture
def outside_tmp() -> Iterator[Path]:
    """A folder outside pytest's 0700 temp root, which Dovecot's processes cannot enter."""
    folder = Path(tempfile.mkdtemp(prefix="postroom-fetch-dovecot-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class Server:
    """Dovecot with STLS over a Maildir of its own; `put` adds a message to it."""

    def __init__(self, root: Path) -> None:
        self.maildir = root / "vmail" / "Maildir"
        for sub in ("new", "cur", "tmp"):
            (self.maildir / sub).mkdir(parents=True)
        cert, key = make_self_signed("pop.test.example")
        self.cert = root / "cert.pem"
        self.cert.write_bytes(cert)
        (root / "key.pem").write_bytes(key)
        (root / "key.pem").chmod(0o600)
        self.dovecot = PrivateDovecot(root / "dovecot", maildir=self.maildir, user=USER,
                                      password=PASSWORD, cert=self.cert, key=root / "key.pem")
        self.count = 0

    def put(self, data: bytes) -> bytes:
        """Store `data` (LF line ends) in new/, owned by Dovecot's mail user; return it."""
        self.count += 1
        path = self.maildir / "new" / f"1700000000.M{self.count}P1.test"
        path.write_bytes(data)
        account = pwd.getpwnam(self.dovecot.mail_user)
        os.chown(path, account.pw_uid, account.pw_gid)
        return data

    def stored(self) -> list[bytes]:
        return sorted(p.read_bytes() for p in maildir_files(self.maildir))

    def options(self, **extra: Any) -> dict[str, Any]:
        return dict(host="127.0.0.1", port=self.dovecot.port, security="stls", user=USER,
                    password=PASSWORD, cafile=str(self.cert), **extra)


@pytest.fixture
def server(outside_tmp: Path, peer_missing: Callable[[str], None]) -> Iterator[Server]:
    reason = PrivateDovecot.unavailable_reason()
    if reason is not None:
        peer_missing(reason)
    server = Server(outside_tmp)
    try:
        try:
            server.dovecot.start()
        except HarnessError as exc:
            pytest.fail(f"dovecot did not start: {exc}", pytrace=False)
        yield server
    finally:
        server.dovecot.stop()


def messages(count: int) -> list[bytes]:
    """Tricky bodies (dot lines, From_ lines), one of ~200 KiB; LF line ends, as on disk."""
    out = []
    for n in range(count):
        token = new_token()
        body = None
        if n == 1:
            body = CRLF.join(f"{i:06d} {'.' * (i % 3)}{token}".encode() for i in range(6000))
            body += CRLF
        data = make_message(token, sender="smith@isp.example", recipient=USER, body=body)
        out.append(data.replace(CRLF, b"\n"))
    return out


def local(dest: Path) -> list[bytes]:
    return sorted(p.read_bytes() for p in maildir_files(dest))


def run(coro: Any) -> Any:
    return asyncio.run(coro)


@pytest.mark.parametrize("auth", ["auto", "user"])
def test_keep_then_only_new_mail(server: Server, tmp_path: Path, auth: str) -> None:
    dest = tmp_path / "Maildir"
    first_batch = [server.put(m) for m in messages(3)]
    lines: list[str] = []
    first: FetchResult = run(fetch(FetchOptions(dest=dest, keep=True, auth=auth,
                                                trace=lines.append, **server.options())))
    assert (first.downloaded, first.deleted) == (3, 0)
    assert local(dest) == sorted(first_batch), server.dovecot.log()
    if auth == "auto":  # Dovecot offers SASL PLAIN once TLS is on
        assert "C: AUTH PLAIN (credentials hidden)" in lines
    else:
        assert "C: PASS (hidden)" in lines
    assert PASSWORD not in "\n".join(lines)
    late = server.put(messages(1)[0])
    second: FetchResult = run(fetch(FetchOptions(dest=dest, keep=True, auth=auth,
                                                 **server.options())))
    assert (second.downloaded, second.skipped) == (1, 3)
    assert second.paths[0].read_bytes() == late
    assert local(dest) == sorted([*first_batch, late])
    assert len(server.stored()) == 4  # all still on the server


def test_delete_mode_empties_the_server(server: Server, tmp_path: Path) -> None:
    dest = tmp_path / "Maildir"
    originals = [server.put(m) for m in messages(4)]
    result: FetchResult = run(fetch(FetchOptions(dest=dest, **server.options())))
    assert (result.downloaded, result.deleted) == (4, 4)
    assert local(dest) == sorted(originals)
    assert server.stored() == []
    again: FetchResult = run(fetch(FetchOptions(dest=dest, **server.options())))
    assert (again.downloaded, again.deleted) == (0, 0)


def test_interrupted_run_resumes(server: Server, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    dest = tmp_path / "Maildir"
    originals = [server.put(m) for m in messages(3)]
    real_write = Channel.write
    cut: list[bool] = []

    def write(self: Channel, data: bytes) -> None:
        if b"RETR 2" in data and not cut:
            cut.append(True)
            self.abort()  # no QUIT: Dovecot deletes nothing
            raise ConnectionResetError("cut by the test")
        real_write(self, data)

    monkeypatch.setattr(Channel, "write", write)
    with pytest.raises(FetchError) as caught:
        run(fetch(FetchOptions(dest=dest, **server.options())))
    assert caught.value.temporary and caught.value.result is not None
    assert caught.value.result.downloaded == 1
    assert len(server.stored()) == 3
    result: FetchResult = run(fetch(FetchOptions(dest=dest, **server.options())))
    assert (result.downloaded, result.skipped, result.deleted) == (2, 1, 3)
    assert local(dest) == sorted(originals)
    assert server.stored() == []


def test_wrong_password_is_an_auth_failure(server: Server, tmp_path: Path) -> None:
    with pytest.raises(FetchError) as caught:
        run(fetch(FetchOptions(dest=tmp_path / "Maildir",
                               **{**server.options(), "password": "wrong"})))
    assert caught.value.kind == "auth" and caught.value.exit_code == 69
    assert "authentication failed for boss@corp.example" in caught.value.text
