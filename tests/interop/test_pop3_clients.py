"""Real POP3 clients download, through postroom's POP3 listeners, exactly the mail SMTP delivered.

Every test owns a mailbox of one module-wide postroom (SMTP, POP3 with STLS,
POP3S; USER/PASS allowed before TLS). Its messages go in through postroom's
SMTP listener with smtplib, never by writing files; the stored Maildir files
are then the reference: each client must hand back every message byte for byte.
Clients that deliver into a Maildir or an MDA (mpop, fetchmail, getmail)
convert CRLF line ends to LF; for them the comparison is on both sides
normalised to LF (lossless here: the stored files hold no bare LF). Their own
trace headers are switched off (mpop --received-header=off, fetchmail
`set invisible`); getmail keeps the Return-Path postroom filed and adds none.
"""

from __future__ import annotations

import base64
import os
import poplib
import pwd
import shutil
import smtplib
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from mailcheck import CRLF, make_message, new_token, split_message
from mailharness import (
    LOOPBACK,
    Postroom,
    maildir_files,
    pop3_listing,
    pop3_message,
    pop3_session,
    pop3_uidls,
    smtp_send,
    stored_by_token,
    unverified_tls_context,
    wait_for_pop3,
)

pytestmark = pytest.mark.interop

DOMAIN = "corp.example"
SENDER = "sender@client.example"
# One mailbox per test, so tests that delete mail cannot disturb each other.
MAILBOXES = (
    "poplib-plain", "poplib-stls", "poplib-pop3s", "wrong-password",
    "curl-plain", "curl-stls", "curl-pop3s",
    "mpop-user", "mpop-plain",
    "fetchmail-keep", "fetchmail-delete",
    "getmail-plain", "getmail-pop3s",
    "jörg-poplib", "jörg-curl",
)
CAPABILITIES = {"TOP", "UIDL", "USER", "SASL", "STLS", "RESP-CODES", "AUTH-RESP-CODE",
                "PIPELINING", "IMPLEMENTATION"}
CLIENT_TIMEOUT = 60


def address(local: str) -> str:
    return f"{local}@{DOMAIN}"


def password(local: str) -> str:
    return f"{local}-secret"


@pytest.fixture(scope="module")
def server(_module_servers: Any) -> Postroom:
    """postroom with SMTP, POP3 (STLS offered, plaintext login allowed) and POP3S listeners."""
    started = _module_servers.postroom(
        listeners=("smtp", "pop3", "pop3s"),
        users={address(local): password(local) for local in MAILBOXES},
        aliases={},
        extra_toml="[pop3]\nallow_plaintext_auth = true\n",
    )
    wait_for_pop3(started.ports["pop3"])
    wait_for_pop3(started.ports["pop3s"], implicit_tls=True)
    return started


def big_body(token: str) -> bytes:
    """About 300 KiB: more than any one socket read, with dot lines spread through it."""
    lines = [f"token {token}".encode()]
    for i in range(4000):
        lines.append(b"." * (i % 3) + f"line {i:05d} of a long message {token}".encode())
    return CRLF.join(lines) + CRLF


def deliver(server: Postroom, local: str) -> dict[str, bytes]:
    """Send three messages (tricky lines, a large one, a one-liner) through SMTP to
    `local`; return {token: stored file bytes} once all are in the Maildir."""
    rcpt = address(local)
    tokens = [new_token() for _ in range(3)]
    messages = [
        make_message(tokens[0], sender=SENDER, recipient=rcpt),
        make_message(tokens[1], sender=SENDER, recipient=rcpt, body=big_body(tokens[1])),
        make_message(tokens[2], sender=SENDER, recipient=rcpt, body=b"short\r\n"),
    ]
    before = len(maildir_files(server.maildir(rcpt)))
    smtp_send(server.smtp_port, SENDER, rcpt, messages)
    got = server.wait_for_messages(rcpt, before + len(messages))
    assert len(got) == before + len(messages), server.output()
    stored = stored_by_token(server.maildir(rcpt), tokens)
    for data in stored.values():
        # The LF-normalised comparisons below are only fair when this holds.
        assert b"\n" not in data.replace(CRLF, b""), "stored message holds a bare LF"
    return stored


def lf(data: bytes) -> bytes:
    return data.replace(CRLF, b"\n")


def by_token(downloads: list[bytes], tokens: list[str]) -> dict[str, bytes]:
    """Match downloaded messages to tokens; each token in exactly one download."""
    found: dict[str, bytes] = {}
    for token in tokens:
        holders = [d for d in downloads if token.encode() in d]
        assert len(holders) == 1, f"{len(holders)} downloads hold token {token}"
        found[token] = holders[0]
    assert len(downloads) == len(tokens), f"{len(downloads)} downloads for {len(tokens)} tokens"
    return found


def assert_same(downloaded: dict[str, bytes], stored: dict[str, bytes], *, normalise: bool) -> None:
    for token, data in stored.items():
        want = lf(data) if normalise else data
        got = downloaded[token]
        assert got == want, (
            f"message {token} differs ({len(got)} octets downloaded, {len(want)} expected)\n"
            f"downloaded head: {got[:300]!r}\nstored head:     {want[:300]!r}"
        )


def remaining(server: Postroom, local: str) -> list[Path]:
    return maildir_files(server.maildir(address(local)))


def run(command: list[str], *, env: dict[str, str] | None = None,
        ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess[bytes]:
    result = subprocess.run(command, capture_output=True, timeout=CLIENT_TIMEOUT, env=env,
                            check=False)
    assert result.returncode in ok, (
        f"{' '.join(command)} exited {result.returncode}\n"
        f"stdout: {result.stdout[-3000:]!r}\nstderr: {result.stderr[-3000:]!r}"
    )
    return result


def read_folder(folder: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()]


# -- Python poplib ------------------------------------------------------------


def test_poplib_user_pass_plaintext(server: Postroom) -> None:
    local = "poplib-plain"
    stored = deliver(server, local)
    port = server.ports["pop3"]
    client = pop3_session(port)
    try:
        capa = client.capa()
        assert set(capa) >= CAPABILITIES, capa
        assert {"PLAIN", "LOGIN"} <= set(capa["SASL"])
        assert capa["IMPLEMENTATION"], capa
        client.user(address(local))
        client.pass_(password(local))
        count, total = client.stat()
        assert count == 3
        assert total == sum(len(d) for d in stored.values())
        sizes = pop3_listing(client)
        uids = pop3_uidls(client)
        assert len(set(uids.values())) == 3
        downloads = {n: pop3_message(client, n) for n in sizes}
        for number, data in downloads.items():
            assert len(data) == sizes[number]  # LIST counts the octets RETR sends
        got = by_token(list(downloads.values()), list(stored))
        assert_same(got, stored, normalise=False)

        # TOP n 0 is the header block and the empty line; TOP n 2 adds two body lines.
        for number, data in downloads.items():
            head, body = split_message(data)
            _, lines, _ = client.top(number, 0)
            assert b"".join(line + CRLF for line in lines) == head + CRLF
            _, lines, _ = client.top(number, 2)
            body_lines = body.split(CRLF)[:-1]  # the body ends with CRLF
            first_two = b"".join(line + CRLF for line in body_lines[:2])
            assert b"".join(line + CRLF for line in lines) == head + CRLF + first_two

        # RSET undoes DELE; then DELE the first message for real and QUIT.
        client.dele(2)
        client.rset()
        client.dele(1)
        deleted_token = next(t for t in stored if t.encode() in downloads[1])
        client.quit()
    finally:
        client.close()

    files = remaining(server, local)
    assert len(files) == 2
    assert all(deleted_token.encode() not in p.read_bytes() for p in files)
    # Retrieved but kept: moved to cur/ and flagged Seen (Maildir "2,S" info).
    for path in files:
        assert path.parent.name == "cur", path
        assert path.name.endswith(":2,S"), path

    # A second session lists what is left, with the same UIDs and the same bytes.
    client = pop3_session(port, user=address(local), password=password(local))
    try:
        after = pop3_uidls(client)
        assert sorted(after.values()) == sorted(u for n, u in uids.items() if n != 1)
        again = [pop3_message(client, n) for n in after]
        assert_same(by_token(again, [t for t in stored if t != deleted_token]),
                    {t: d for t, d in stored.items() if t != deleted_token}, normalise=False)
        client.quit()
    finally:
        client.close()


def test_poplib_stls_auth_plain(server: Postroom) -> None:
    local = "poplib-stls"
    stored = deliver(server, local)
    client = pop3_session(server.ports["pop3"], security="stls")
    try:
        # STLS is no longer offered once TLS is on (RFC 2595 4).
        assert "STLS" not in client.capa()
        credentials = f"\0{address(local)}\0{password(local)}".encode()
        # RFC 5034 4: AUTH with an initial response.
        reply = client._shortcmd("AUTH PLAIN " + base64.b64encode(credentials).decode())
        assert reply.startswith(b"+OK"), reply
        downloads = [pop3_message(client, n) for n in pop3_listing(client)]
        assert_same(by_token(downloads, list(stored)), stored, normalise=False)
        for number in range(1, 4):
            client.dele(number)
        client.quit()
    finally:
        client.close()
    assert remaining(server, local) == []


def test_poplib_pop3s(server: Postroom) -> None:
    local = "poplib-pop3s"
    stored = deliver(server, local)
    port = server.ports["pop3s"]
    client = pop3_session(port, security="pop3s", user=address(local),
                          password=password(local))
    try:
        assert "STLS" not in client.capa()
        uids = pop3_uidls(client)
        downloads = [pop3_message(client, n) for n in pop3_listing(client)]
        assert_same(by_token(downloads, list(stored)), stored, normalise=False)
        client.quit()
    finally:
        client.close()
    # UIDL is stable across sessions, also after the messages moved to cur/.
    client = pop3_session(port, security="pop3s", user=address(local),
                          password=password(local))
    try:
        assert pop3_uidls(client) == uids
        client.quit()
    finally:
        client.close()
    assert len(remaining(server, local)) == 3


def test_wrong_password_is_refused_with_auth_code(server: Postroom) -> None:
    local = "wrong-password"
    client = pop3_session(server.ports["pop3"])
    try:
        client.user(address(local))
        with pytest.raises(poplib.error_proto) as refused:
            client.pass_("not-the-password")
        assert refused.value.args[0].startswith(b"-ERR [AUTH]"), refused.value.args
    finally:
        client.close()
    client = pop3_session(server.ports["pop3"], user=address(local), password=password(local))
    try:
        assert client.stat() == (0, 0)
        client.quit()
    finally:
        client.close()


def test_plaintext_login_needs_stls_by_default(
    postroom_factory: Callable[..., Postroom],
) -> None:
    """Without allow_plaintext_auth, USER and AUTH PLAIN get [AUTH] until STLS (RFC 2595 2.3)."""
    strict = postroom_factory(listeners=("smtp", "pop3"), aliases={})
    port = strict.ports["pop3"]
    wait_for_pop3(port)
    user, secret = "boss@corp.example", strict.users["boss@corp.example"]
    client = pop3_session(port)
    try:
        capa = client.capa()
        assert "STLS" in capa and "USER" not in capa, capa
        with pytest.raises(poplib.error_proto) as refused:
            client.user(user)
        assert refused.value.args[0].startswith(b"-ERR [AUTH]"), refused.value.args
        token = base64.b64encode(f"\0{user}\0{secret}".encode()).decode()
        with pytest.raises(poplib.error_proto) as refused:
            client._shortcmd("AUTH PLAIN " + token)
        assert refused.value.args[0].startswith(b"-ERR [AUTH]"), refused.value.args
        client.stls(unverified_tls_context())
        assert "USER" in client.capa()
        client.user(user)
        client.pass_(secret)
        assert client.stat() == (0, 0)
        client.quit()
    finally:
        client.close()


# -- curl -----------------------------------------------------------------------


def curl_fetch(server: Postroom, curl: str, local: str, security: str) -> None:
    stored = deliver(server, local)
    if security == "pop3s":
        base = f"pop3s://{LOOPBACK}:{server.ports['pop3s']}/"
        tls = ["-k"]
    else:
        base = f"pop3://{LOOPBACK}:{server.ports['pop3']}/"
        tls = ["--ssl-reqd", "-k"] if security == "stls" else []
    common = [curl, "-sS", "--max-time", "30", *tls, "-u", f"{address(local)}:{password(local)}"]

    listing = run([*common, base]).stdout
    lines = [line.split() for line in listing.split(CRLF) if line]
    sizes = {int(n): int(s) for n, s in lines}
    assert sorted(sizes.values()) == sorted(len(d) for d in stored.values())

    downloads = {n: run([*common, f"{base}{n}"]).stdout for n in sizes}
    for number, data in downloads.items():
        assert len(data) == sizes[number]
    assert_same(by_token(list(downloads.values()), list(stored)), stored, normalise=False)

    uidl = run([*common, "-X", "UIDL", base]).stdout
    curl_uids = dict(line.split() for line in uidl.split(CRLF) if line)
    client = pop3_session(server.ports["pop3"], user=address(local), password=password(local))
    try:
        assert {int(n): u.decode() for n, u in curl_uids.items()} == pop3_uidls(client)
        client.quit()
    finally:
        client.close()
    assert len(remaining(server, local)) == 3  # curl's RETR deletes nothing


def test_curl_plaintext(server: Postroom, require_peer: Callable[..., str]) -> None:
    curl_fetch(server, require_peer("curl"), "curl-plain", "plain")


def test_curl_stls(server: Postroom, require_peer: Callable[..., str]) -> None:
    curl_fetch(server, require_peer("curl"), "curl-stls", "stls")


def test_curl_pop3s(server: Postroom, require_peer: Callable[..., str]) -> None:
    curl_fetch(server, require_peer("curl"), "curl-pop3s", "pop3s")


# -- mpop ---------------------------------------------------------------------------


@pytest.mark.parametrize("auth", ["user", "plain"])
def test_mpop_stls_downloads_and_deletes(
    server: Postroom, tmp_path: Path, auth: str, require_peer: Callable[..., str]
) -> None:
    mpop = require_peer("mpop")
    local = f"mpop-{auth}"
    stored = deliver(server, local)
    target = tmp_path / "Maildir"
    for sub in ("tmp", "new", "cur"):
        (target / sub).mkdir(parents=True)
    env = {**os.environ, "HOME": str(tmp_path)}
    run([mpop, "--quiet", f"--host={LOOPBACK}", f"--port={server.ports['pop3']}",
         "--tls=on", "--tls-starttls=on", "--tls-certcheck=off", f"--auth={auth}",
         "--received-header=off",
         f"--user={address(local)}", f"--passwordeval=echo {password(local)}",
         f"--delivery=maildir,{target}", "--keep=off", "--only-new=off",
         f"--uidls-file={tmp_path / 'uidls'}"], env=env)
    downloads = read_folder(target / "new") + read_folder(target / "cur")
    assert_same(by_token(downloads, list(stored)), stored, normalise=True)
    assert remaining(server, local) == []


# -- fetchmail ------------------------------------------------------------------------


def fetchmail_rc(tmp_path: Path, server: Postroom, local: str, *, keep: bool,
                 pop3s: bool) -> tuple[Path, Path]:
    """An rcfile (mode 0600, as fetchmail demands) whose MDA writes each message to a file."""
    out = tmp_path / "delivered"
    out.mkdir()
    mda = tmp_path / "mda.sh"
    # One file per message; mktemp keeps the names apart.
    mda.write_text(f'#!/bin/sh\nexec /bin/cat >"$(mktemp {out}/msg.XXXXXX)"\n')
    mda.chmod(0o755)
    port = server.ports["pop3s" if pop3s else "pop3"]
    tls = "ssl" if pop3s else "sslproto 'tls1.2+'"
    rc = tmp_path / "fetchmailrc"
    rc.write_text(
        "set no syslog\n"
        # invisible: no Received header of fetchmail's own, so the bytes compare whole.
        "set invisible\n"
        f"poll {LOOPBACK} service {port} protocol pop3 auth password timeout 30\n"
        f'  user "{address(local)}" password "{password(local)}"\n'
        f"  {'keep' if keep else 'nokeep'} fetchall {tls} no sslcertck\n"
        f'  mda "{mda}"\n'
    )
    rc.chmod(0o600)
    return rc, out


@pytest.mark.parametrize("mode", ["keep", "delete"])
def test_fetchmail(
    server: Postroom, tmp_path: Path, mode: str, require_peer: Callable[..., str]
) -> None:
    fetchmail = require_peer("fetchmail")
    local = f"fetchmail-{mode}"
    stored = deliver(server, local)
    keep = mode == "keep"
    # Keep mode over STLS, delete mode over POP3S: both TLS paths get a real client.
    rc, out = fetchmail_rc(tmp_path, server, local, keep=keep, pop3s=not keep)
    env = {**os.environ, "HOME": str(tmp_path)}
    run([fetchmail, "-f", str(rc), "--nodetach", "--idfile", str(tmp_path / "fetchids"),
         "--pidfile", str(tmp_path / "fetchmail.pid")], env=env)
    downloads = read_folder(out)
    assert_same(by_token(downloads, list(stored)), stored, normalise=True)
    left = remaining(server, local)
    if keep:
        assert len(left) == 3
    else:
        assert left == []


# -- getmail (getmail6) ------------------------------------------------------------------


@pytest.fixture
def nobody_dir(peer_missing: Callable[[str], None]) -> Iterator[Path]:
    """A work folder owned by nobody, outside pytest's 0700 temp root (getmail runs as nobody)."""
    if os.geteuid() != 0:
        peer_missing("getmail refuses Maildir delivery as root; running it as nobody needs root")
    folder = Path(tempfile.mkdtemp(prefix="postroom-getmail-"))
    account = pwd.getpwnam("nobody")
    os.chown(folder, account.pw_uid, account.pw_gid)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("security", ["plain", "pop3s"])
def test_getmail_as_unprivileged_user(
    server: Postroom, nobody_dir: Path, security: str, require_peer: Callable[..., str]
) -> None:
    getmail = require_peer("getmail")
    runuser = require_peer("runuser")
    local = f"getmail-{security}"
    stored = deliver(server, local)
    account = pwd.getpwnam("nobody")
    target = nobody_dir / "Maildir"
    for folder in (target, target / "tmp", target / "new", target / "cur"):
        folder.mkdir()
        os.chown(folder, account.pw_uid, account.pw_gid)
    kind = "SimplePOP3SSLRetriever" if security == "pop3s" else "SimplePOP3Retriever"
    port = server.ports["pop3s" if security == "pop3s" else "pop3"]
    rc = nobody_dir / "getmailrc"
    rc.write_text(
        "[retriever]\n"
        f"type = {kind}\n"
        f"server = {LOOPBACK}\n"
        f"port = {port}\n"
        f"username = {address(local)}\n"
        f"password = {password(local)}\n"
        "\n[destination]\n"
        "type = Maildir\n"
        f"path = {target}/\n"
        "\n[options]\n"
        "verbose = 0\n"
        "read_all = true\n"
        "delete = true\n"
        "delivered_to = false\n"
        "received = false\n"
        "message_log_syslog = false\n"
    )
    os.chown(rc, account.pw_uid, account.pw_gid)
    env = {**os.environ, "HOME": str(nobody_dir)}
    run([runuser, "-u", "nobody", "--", getmail, f"--getmaildir={nobody_dir}",
         f"--rcfile={rc}"], env=env)
    downloads = read_folder(target / "new") + read_folder(target / "cur")
    # POP3 carries no envelope sender: getmail takes it from the Return-Path postroom
    # filed (RFC 5321 4.4) and so writes no "Return-Path: <unknown>" of its own.
    for data in downloads:
        assert data.startswith(b"Return-Path: <sender@client.example>\nReceived: "), data[:200]
    assert_same(by_token(downloads, list(stored)), stored, normalise=True)
    assert remaining(server, local) == []


# -- UTF-8 users and headers, without RFC 6856 ----------------------------------


def deliver_utf8(server: Postroom, local: str) -> bytes:
    """One message with UTF-8 header fields, sent with SMTPUTF8 to a UTF-8 mailbox."""
    rcpt, sender, token = address(local), "jörg@absender.example", new_token()
    message = (f"From: Jörg <{sender}>\r\nTo: <{rcpt}>\r\nSubject: Grüße {token}\r\n"
               "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
               f"token {token}\r\nÄpfel und Birnen\r\n").encode()
    with smtplib.SMTP(LOOPBACK, server.smtp_port, timeout=30) as client:
        client.sendmail(sender, [rcpt], message, mail_options=["SMTPUTF8", "BODY=8BITMIME"])
    assert len(server.wait_for_messages(rcpt, 1)) == 1, server.output()
    return stored_by_token(server.maildir(rcpt), [token])[token]


def test_poplib_utf8_user_without_the_utf8_extension(server: Postroom) -> None:
    # UTF8 is not offered (see protocol/pop3_server.py): poplib's utf8() is refused,
    # the UTF-8 name still logs in with USER/PASS, and RETR sends the message as filed.
    local = "jörg-poplib"
    stored = deliver_utf8(server, local)
    client = pop3_session(server.ports["pop3"])
    try:
        assert "UTF8" not in client.capa()
        with pytest.raises(poplib.error_proto, match="unknown command UTF8"):
            client.utf8()
        client.user(address(local))
        client.pass_(password(local))
        assert pop3_message(client, 1) == stored
        client.quit()
    finally:
        client.close()


def test_curl_utf8_user_without_the_utf8_extension(
    server: Postroom, require_peer: Callable[..., str]
) -> None:
    local = "jörg-curl"
    stored = deliver_utf8(server, local)
    curl = require_peer("curl")
    auth = ["-u", f"{address(local)}:{password(local)}"]  # AUTH PLAIN: UTF-8 (RFC 4616 2)
    got = run([curl, "-sS", "--max-time", "30", *auth,
               f"pop3://{LOOPBACK}:{server.ports['pop3']}/1"]).stdout
    assert got == stored
