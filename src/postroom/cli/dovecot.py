"""Dovecot beside postroom: `postroom dovecot-config` prints the Dovecot settings that serve
IMAP from postroom's Maildirs, and `postroom checkpassword` checks Dovecot's logins against
postroom's own user directory (the checkpassword interface), so one `postroom user add`
gives a user SMTP, POP3 and IMAP.

Dovecot runs the checkpassword program with the program to run on success as its
first argument and writes `login NUL password NUL ...` to its file descriptor 3
(qmail's checkpassword interface, which Dovecot's checkpassword passdb speaks).
On success the program sets USER to the user's canonical address, which names
the Maildir (DATA/mail/DOMAIN/LOCAL), and runs that program; it exits 1 for a
wrong login and 111 when the check could not be made.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pwd
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from postroom.cli.common import DATA_ENV, PROG, Context
from postroom.config import ConfigError
from postroom.store.api import user_key
from postroom.store.factory import open_store
from postroom.store.passwords import MAX_PASSWORD

if TYPE_CHECKING:
    from postroom.cli.common import Subparsers

CHECKPASSWORD_FD = 3  # where Dovecot writes the login and the password
# What fd 3 may carry: login, password and a timestamp, each NUL-terminated (the
# checkpassword interface allows 512 octets; Dovecot's passwords may be longer).
CHECKPASSWORD_INPUT = 2 * MAX_PASSWORD + 1024
EXIT_REFUSED = 1  # checkpassword: the login or the password is wrong
EXIT_TROUBLE = 111  # checkpassword: a temporary problem, the check was not made
# Dovecot refuses mail access for uids and gids below these unless told otherwise.
DOVECOT_FIRST_VALID_UID = 500
DOVECOT_FIRST_VALID_GID = 1
# The special-use folders (RFC 6154) an IMAP client looks for, in Maildir++ on disk
# as DATA/mail/DOMAIN/LOCAL/.Junk and so on.
SPECIAL_FOLDERS = (("Junk", "\\Junk"), ("Sent", "\\Sent"), ("Drafts", "\\Drafts"),
                   ("Trash", "\\Trash"))
# Dovecot's default import_environment, kept, with the data folder added.
DOVECOT_ENVIRONMENT = "TZ CORE_OUTOFMEM CORE_ERROR LISTEN_PID LISTEN_FDS"


def add_dovecot_config(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "dovecot-config", parents=[common],
        help="print the Dovecot settings for IMAP from this data folder's Maildirs",
        description="Print Dovecot settings (for /etc/dovecot/conf.d/99-postroom.conf) that "
        "serve IMAP from the Maildirs postroom delivers to, checking passwords against "
        "postroom's user directory with `postroom checkpassword`.",
    )
    p.add_argument("--mail-user", metavar="USER",
                   help="the account that owns the mail and reads it (default: the owner "
                        "of the data folder; never root)")
    p.add_argument("--auth-user", metavar="USER",
                   help="the account Dovecot's auth process (which runs the password check) "
                        "runs as: one that can read the data folder (default: --mail-user)")
    p.add_argument("--checkpassword", metavar="PATH",
                   help="the program Dovecot runs to check a password (default: "
                        "postroom-checkpassword from PATH)")
    p.set_defaults(func=_dovecot_config)


def add_checkpassword(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "checkpassword", parents=[common],
        help="check a login read from descriptor 3, for Dovecot (checkpassword interface)",
        description="Read `login NUL password NUL` from file descriptor 3; if the password is "
        "the user's, run PROGRAM with USER set to the user's address, else exit 1 (111 "
        "when the check cannot be made). Dovecot's checkpassword passdb runs this.",
    )
    p.add_argument("program", nargs=argparse.REMAINDER,
                   help="what to run on success, with its arguments (Dovecot's "
                        "checkpassword-reply)")
    p.set_defaults(func=_checkpassword)


def render_dovecot_config(data_dir: Path, mail_user: str, checkpassword: str,
                          auth_user: str | None = None) -> str:
    """The settings `postroom dovecot-config` prints, for the data folder `data_dir`."""
    account = pwd.getpwnam(mail_user)
    mail = data_dir / "mail"
    lines = [
        "# Dovecot IMAP beside postroom (written by `postroom dovecot-config`): Dovecot reads",
        f"# the Maildirs postroom delivers to ({mail}/DOMAIN/USER) and checks passwords",
        "# against postroom's user directory, so `postroom user add` is all a user needs.",
        "# Save as /etc/dovecot/conf.d/99-postroom.conf; add `protocols = imap` (not pop3:",
        "# postroom serves POP3) and Dovecot's TLS settings if they are not there yet.",
        "",
        "# Maildir++: subfolders are .NAME beside new/ cur/ tmp/ (.Junk, .Sent, ...).",
        f"mail_location = maildir:{mail}/%d/%n",
        f"mail_uid = {account.pw_uid}",
        f"mail_gid = {account.pw_gid}",
    ]
    if account.pw_uid < DOVECOT_FIRST_VALID_UID:
        lines.append(f"first_valid_uid = {account.pw_uid}  # {mail_user} is a system user")
    if account.pw_gid < DOVECOT_FIRST_VALID_GID:
        lines.append(f"first_valid_gid = {account.pw_gid}")
    lines += [
        f"import_environment = {DOVECOT_ENVIRONMENT} {DATA_ENV}={data_dir}",
        "",
        "namespace inbox {",
        "  inbox = yes",
    ]
    for name, use in SPECIAL_FOLDERS:
        lines += [f"  mailbox {name} {{", f"    special_use = {use}",
                  "    auto = subscribe", "  }"]
    lines += [
        "}",
        "",
        "# Logins are checked by postroom (argon2id hashes in its user directory).",
        "passdb {",
        "  driver = checkpassword",
        f"  args = {checkpassword}",
        "}",
        "userdb {",
        "  driver = static",
        f"  args = uid={account.pw_uid} gid={account.pw_gid} home={mail}/%d/%n "
        "allow_all_users=yes",
        "}",
        "# Dovecot's auth process runs the check, which reads postroom's data folder.",
        "service auth {",
        f"  user = {auth_user or mail_user}",
        "}",
        "",
    ]
    return "\n".join(lines)


def _dovecot_config(args: argparse.Namespace, ctx: Context) -> int:
    data_dir = ctx.config.data_dir
    mail_user = args.mail_user
    if mail_user is None:
        try:
            mail_user = pwd.getpwuid(data_dir.stat().st_uid).pw_name
        except (OSError, KeyError) as e:
            raise ConfigError(f"{data_dir}: cannot tell who owns it ({e}); give --mail-user"
                              ) from e
    try:
        uid = pwd.getpwnam(mail_user).pw_uid
    except KeyError:
        raise ConfigError(f"--mail-user: no such user: {mail_user}") from None
    if uid == 0:
        raise ConfigError(f"{data_dir} belongs to root, and Dovecot never reads mail as root: "
                          "give --mail-user, the account postroom runs as")
    checkpassword = args.checkpassword or shutil.which(f"{PROG}-checkpassword")
    if checkpassword is None:
        raise ConfigError(f"{PROG}-checkpassword is not on PATH; give --checkpassword PATH")
    ctx.stdout.write(render_dovecot_config(data_dir, mail_user, checkpassword, args.auth_user))
    return 0


def _read_request(fd: int = CHECKPASSWORD_FD) -> tuple[str, str] | None:
    """(login, password) from `fd`, or None when it holds no such request."""
    data = b""
    while len(data) < CHECKPASSWORD_INPUT:
        chunk = os.read(fd, CHECKPASSWORD_INPUT - len(data))
        if not chunk:
            break
        data += chunk
    fields = data.split(b"\0")
    if len(fields) < 3:  # login NUL password NUL, at least
        return None
    try:
        return fields[0].decode("utf-8"), fields[1].decode("utf-8")
    except UnicodeDecodeError:
        return None


def _checkpassword(args: argparse.Namespace, ctx: Context) -> int:
    program = [a for a in args.program if a != "--"] if args.program else []
    try:
        request = _read_request()
    except OSError as e:
        print(f"{PROG} checkpassword: cannot read descriptor {CHECKPASSWORD_FD}: {e.strerror}",
              file=sys.stderr)
        return EXIT_TROUBLE
    if request is None:  # Dovecot logs what we say here
        print(f"{PROG} checkpassword: no `login NUL password NUL` on descriptor "
              f"{CHECKPASSWORD_FD}", file=sys.stderr)
        return EXIT_REFUSED
    login, password = request
    key = user_key(login)
    try:
        store = open_store(ctx.config.store)
        try:
            good = key is not None and asyncio.run(store.directory.verify_password(key, password))
        finally:
            store.close()
    except Exception as e:  # noqa: BLE001 - any failure to check is Dovecot's "try later"
        print(f"{PROG} checkpassword: cannot check the password: {e}", file=sys.stderr)
        return EXIT_TROUBLE
    if not good or key is None:
        return EXIT_REFUSED
    if not program:
        return 0
    os.environ["USER"] = key  # Dovecot takes the user's name from here (%u, %d, %n)
    os.execvp(program[0], program)
    return EXIT_TROUBLE  # pragma: no cover - execvp does not return


def checkpassword_main() -> int:
    """The `postroom-checkpassword` program Dovecot runs: `postroom checkpassword` with the
    data folder from POSTROOM_DATA (Dovecot's import_environment sets it)."""
    from postroom.cli import main

    return main(["checkpassword", "--", *sys.argv[1:]])
