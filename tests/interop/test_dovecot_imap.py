"""Dovecot serving IMAP beside postroom, set up with `postroom dovecot-config`.

postroom delivers mail (SMTP) and serves it with POP3; Dovecot, configured by
what `postroom dovecot-config` prints, serves the same Maildirs over IMAP and
checks passwords with `postroom checkpassword` against postroom's own user
directory. Python's imaplib and s-nail (a real IMAP client from Debian) log in
with the password `postroom user add` set; what one side deletes or flags the
other sees; a message in the Maildir++ folder .Junk shows in IMAP's \\Junk folder.
"""

from __future__ import annotations

import imaplib
import mailbox
import os
import poplib
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from mailcheck import make_message, new_token
from mailharness import (
    LOOPBACK,
    REPO,
    HarnessError,
    Postroom,
    _let_others_traverse,
    _tail,
    find_program,
    free_ports,
    pop3_listing,
    pop3_message,
    pop3_session,
    smtp_send,
    wait_for_pop3,
)

pytestmark = pytest.mark.interop

USER = "boss@corp.example"
PASSWORD = "boss-secret"
SENDER = "sender@client.example"
MAIL_USER = "nobody"  # Dovecot reads mail as no root; postroom's data folder is given to it
START_SECONDS = 20.0


class DovecotIMAP:
    """A private Dovecot for IMAP only: its own folders and listener, then the settings
    `postroom dovecot-config` printed, included as they are."""

    def __init__(self, root: Path, settings: str) -> None:
        self.root = root
        self.port = free_ports(1)[0]
        self.config = root / "dovecot.conf"
        self.log = root / "dovecot.log"
        for folder in ("run", "state"):
            (root / folder).mkdir(parents=True, exist_ok=True)
        (root / "postroom.conf").write_text(settings)
        self.config.write_text("\n".join([
            "protocols = imap", f"listen = {LOOPBACK}", f"base_dir = {root / 'run'}",
            f"state_dir = {root / 'state'}", f"log_path = {self.log}", "ssl = no",
            "disable_plaintext_auth = no", "auth_mechanisms = plain login",
            "service imap-login {", "  inet_listener imap {", f"    address = {LOOPBACK}",
            f"    port = {self.port}", "  }", "  inet_listener imaps {", "    port = 0", "  }",
            "}", "service anvil {", "  chroot =", "}",
            f"!include {root / 'postroom.conf'}", ""]))
        self.started = False

    def start(self) -> None:
        # The master daemonizes with the standard streams inherited: a pipe would stay
        # open as long as it runs, so what it says at start goes to a file.
        output = self.root / "start.out"
        with output.open("wb") as out:
            result = subprocess.run(["dovecot", "-c", str(self.config)], stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=out, timeout=60, check=False)
        self.started = True
        if result.returncode != 0:
            raise HarnessError(f"dovecot: {_tail(output)}{_tail(self.log)}")
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            try:
                imaplib.IMAP4(LOOPBACK, self.port, timeout=2).logout()
                return
            except OSError:
                time.sleep(0.05)
        raise HarnessError(f"no IMAP greeting\n{_tail(self.log)}")

    def stop(self) -> None:
        if not self.started:
            return
        try:
            pid = int((self.root / "run" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return
        subprocess.run(["doveadm", "-c", str(self.config), "stop"], capture_output=True,
                       timeout=60, check=False)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        os.kill(pid, 9)

    def login(self) -> imaplib.IMAP4:
        client = imaplib.IMAP4(LOOPBACK, self.port, timeout=30)
        client.login(USER, PASSWORD)
        return client


def give_to(folder: Path, user: str) -> None:
    """chown -R: Dovecot reads and renames the mail as `user` (never root)."""
    account = pwd.getpwnam(user)
    for path in (folder, *folder.rglob("*")):
        os.chown(path, account.pw_uid, account.pw_gid)


@pytest.fixture
def outside_tmp() -> Iterator[Path]:
    """A folder Dovecot's unprivileged processes can reach (pytest's temp root is 0700)."""
    folder = Path(tempfile.mkdtemp(prefix="postroom-imap-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def setup(outside_tmp: Path, peer_missing: Callable[[str], None],
          ) -> Iterator[tuple[Postroom, DovecotIMAP, dict[str, str]]]:
    if find_program("dovecot") is None or find_program("doveadm") is None:
        peer_missing("dovecot (dovecot-core) is not installed")
    if not any(Path(d, "imap").is_file() for d in ("/usr/lib/dovecot", "/usr/libexec/dovecot")):
        peer_missing("dovecot's imap service (dovecot-imapd) is not installed")
    if os.geteuid() != 0:
        peer_missing("a private Dovecot instance needs root")
    server = Postroom(outside_tmp / "postroom", users={USER: PASSWORD}, aliases={},
                      listeners=("smtp", "pop3"),
                      extra_toml="[pop3]\nallow_plaintext_auth = true\n")
    dovecot: DovecotIMAP | None = None
    try:
        server.start()
        wait_for_pop3(server.ports["pop3"])
        tokens = {name: new_token() for name in ("first", "second", "third")}
        smtp_send(server.smtp_port, SENDER, USER, [
            make_message(token, sender=SENDER, recipient=USER, subject=name)
            for name, token in tokens.items()])
        # Quarantined mail goes to the Maildir++ folder .Junk.
        tokens["junk"] = new_token()
        junk = mailbox.Maildir(server.maildir(USER), create=False).add_folder("Junk")
        junk.add(make_message(tokens["junk"], sender=SENDER, recipient=USER,
                              subject="junk"))
        # Dovecot reads and renames the mail as MAIL_USER; the rest of the data folder
        # stays root's, as the checkpassword program Dovecot runs here (as root) would
        # otherwise become the folder's owner (cli: become_data_owner) and lose this
        # Python, which may sit where only root can read.
        give_to(server.data / "mail", MAIL_USER)
        _let_others_traverse(server.data)
        # Dovecot runs the check as root here: this Python may sit where others cannot reach.
        wrapper = outside_tmp / "checkpassword"
        wrapper.write_text(f"#!/bin/sh\nexec env PYTHONPATH={REPO / 'src'} {sys.executable} "
                           '-m postroom checkpassword "$@"\n')
        wrapper.chmod(0o755)
        settings = server.cli("dovecot-config", "--checkpassword", str(wrapper),
                              "--auth-user", "root", "--mail-user", MAIL_USER).stdout
        dovecot = DovecotIMAP(outside_tmp / "dovecot", settings)
        dovecot.start()
        yield server, dovecot, tokens
    finally:
        if dovecot is not None:
            dovecot.stop()
        server.stop()


def imap_subjects(client: imaplib.IMAP4, folder: str = "INBOX") -> dict[int, str]:
    """{sequence number: Subject} of every message in `folder`."""
    client.select(folder)
    _, data = client.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    subjects = {}
    for item in data:
        if isinstance(item, tuple):
            number = int(item[0].split()[0])
            subjects[number] = item[1].decode().partition(":")[2].strip()
    return subjects


def pop3_tokens(client: poplib.POP3) -> dict[int, str]:
    """{POP3 message number: the token it carries}, through postroom's POP3."""
    return {n: pop3_message(client, n).split(b"Subject: ")[1].split(b"\r\n")[0]
            .decode().split()[1] for n in pop3_listing(client)}


def pop3_login(server: Postroom) -> poplib.POP3:
    return pop3_session(server.ports["pop3"], user=USER, password=PASSWORD)


def test_imap_sees_postroom_mail_with_postroom_passwords(
        setup: tuple[Postroom, DovecotIMAP, dict[str, str]]) -> None:
    _server, dovecot, tokens = setup
    client = dovecot.login()
    try:
        inbox = imap_subjects(client)
        assert sorted(inbox.values()) == sorted(
            f"{n} {tokens[n]}" for n in ("first", "second", "third"))
        _, folders = client.list()
        junk = [f for f in folders if isinstance(f, bytes) and f.endswith(b" Junk")]
        assert len(junk) == 1 and b"\\Junk" in junk[0]
        assert list(imap_subjects(client, "Junk").values()) == [f"junk {tokens['junk']}"]
    finally:
        client.logout()
    wrong = imaplib.IMAP4(LOOPBACK, dovecot.port, timeout=30)
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        wrong.login(USER, "not-the-password")
    unknown = imaplib.IMAP4(LOOPBACK, dovecot.port, timeout=30)
    with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
        unknown.login("nobody@corp.example", PASSWORD)


def test_a_user_added_later_logs_in_at_once(
        setup: tuple[Postroom, DovecotIMAP, dict[str, str]]) -> None:
    server, dovecot, _tokens = setup
    server.add_user("alice@corp.example", "alice-secret")
    give_to(server.data / "mail", MAIL_USER)  # the CLI ran as root here
    client = imaplib.IMAP4(LOOPBACK, dovecot.port, timeout=30)
    assert client.login("alice@corp.example", "alice-secret")[0] == "OK"
    client.select("INBOX")
    client.logout()


def test_imap_deletions_and_flags_reach_pop3_and_back(
        setup: tuple[Postroom, DovecotIMAP, dict[str, str]]) -> None:
    server, dovecot, tokens = setup
    client = dovecot.login()
    try:
        numbers = {subject.split()[0]: n for n, subject in imap_subjects(client).items()}
        client.store(str(numbers["first"]), "+FLAGS", "\\Deleted")
        client.expunge()
        numbers = {subject.split()[0]: n for n, subject in imap_subjects(client).items()}
        client.store(str(numbers["second"]), "+FLAGS", "\\Seen \\Flagged")
    finally:
        client.logout()
    # postroom's POP3 no longer lists what IMAP expunged; the flagged one (renamed into
    # cur/ with its flags by Dovecot) is still there, byte for byte.
    pop = pop3_login(server)
    listed = pop3_tokens(pop)
    assert sorted(listed.values()) == sorted([tokens["second"], tokens["third"]])
    pop.dele(next(n for n, token in listed.items() if token == tokens["third"]))
    pop.quit()
    client = dovecot.login()
    try:
        left = imap_subjects(client)
        assert list(left.values()) == [f"second {tokens['second']}"]
        _, flags = client.fetch("1", "(FLAGS)")
        assert b"\\Flagged" in flags[0] and b"\\Seen" in flags[0]
    finally:
        client.logout()


def test_s_nail_reads_inbox_and_junk_and_deletes(
        setup: tuple[Postroom, DovecotIMAP, dict[str, str]],
        require_peer: Callable[[str], str], outside_tmp: Path) -> None:
    server, dovecot, tokens = setup
    s_nail = require_peer("s-nail")
    user = USER.replace("@", "%40")

    def run(folder: str, commands: str) -> str:
        result = subprocess.run(
            [s_nail, "-#", "-N", "-S", "v15-compat", "-S", f"password={PASSWORD}",
             "-S", "imap-auth=login", "-f", f"imap://{user}@{LOOPBACK}:{dovecot.port}/{folder}"],
            input=commands, capture_output=True, text=True, timeout=60, check=False,
            env={**os.environ, "HOME": str(outside_tmp)})
        assert result.returncode == 0, result.stderr + _tail(dovecot.log)
        return result.stdout

    listing = run("INBOX", "headers\n")
    for name in ("first", "second", "third"):
        assert tokens[name][:8] in listing
    assert tokens["junk"][:8] in run("Junk", "headers\n")
    # Delete the first message from s-nail; postroom's POP3 no longer has it.
    run("INBOX", "delete 1\nquit\n")
    pop = pop3_login(server)
    assert len(pop3_tokens(pop)) == 2
    pop.quit()
