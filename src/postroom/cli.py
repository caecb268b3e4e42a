"""The `postroom` command line: parse arguments, then hand each subcommand its context.

Each subcommand is one `add_*` function that registers its parser and its
handler; `COMMANDS` lists them. A handler takes the parsed arguments and a
`Context` (data dir, config, user directory, all made on first use) and
returns the exit status. Errors the user can fix are raised as `ConfigError`,
`DirectoryError`, `ValueError` or `OSError` and become one line on stderr,
`postroom: error: ...`, with exit status 2.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sqlite3
import sys
from collections.abc import Callable, Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from postroom import __version__
from postroom.addresses import canonical_domain
from postroom.config import (
    CONFIG_NAME,
    DEFAULT_DATA_DIR,
    Config,
    ConfigError,
    load_config,
    render_default_config,
)
from postroom.store.atomic import atomic_write
from postroom.store.users import (
    DirectoryError,
    SQLiteUserDirectory,
    local_address,
    open_user_directory,
)

PROG = "postroom"
EXIT_USAGE = 2  # argparse's status for usage errors; used for every user-fixable error
DATA_ENV = "POSTROOM_DATA"

Handler = Callable[[argparse.Namespace, "Context"], int]
if TYPE_CHECKING:
    from postroom.queue.envelope import Envelope
    from postroom.queue.store import QueueStore

    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]


class Context:
    """What a handler may need, each part made on first use (so `init` needs no config)."""

    def __init__(self, args: argparse.Namespace) -> None:
        data = getattr(args, "data", None) or os.environ.get(DATA_ENV) or str(DEFAULT_DATA_DIR)
        config = getattr(args, "config", None)
        self.data_dir = Path(data)
        self.config_file = Path(config) if config else None
        self.stdin: TextIO = sys.stdin
        self.stdout: TextIO = sys.stdout

    @cached_property
    def config(self) -> Config:
        return load_config(self.data_dir, self.config_file)

    @cached_property
    def directory(self) -> SQLiteUserDirectory:
        return open_user_directory(self.config)

    def say(self, text: str) -> None:
        print(text, file=self.stdout)


def _common_options(defaults: bool) -> argparse.ArgumentParser:
    """--data and --config, accepted before and after the subcommand.

    The copy attached to subcommands has SUPPRESS defaults, so a value given
    before the subcommand is not overwritten by the subparser's default.
    """
    parent = argparse.ArgumentParser(add_help=False)
    default = None if defaults else argparse.SUPPRESS
    parent.add_argument(
        "--data",
        metavar="DIR",
        default=default,
        help=f"data folder: config, users, queue, mail (env {DATA_ENV}, default ./var)",
    )
    parent.add_argument(
        "--config",
        metavar="FILE",
        default=default,
        help=f"config file to read instead of DIR/{CONFIG_NAME}",
    )
    return parent


def _subparsers(parser: argparse.ArgumentParser, title: str) -> Subparsers:
    return parser.add_subparsers(title=title, metavar="COMMAND")


def _help_of(parser: argparse.ArgumentParser) -> Handler:
    """Handler for a command group run without its action: print the group's help."""

    def show(args: argparse.Namespace, ctx: Context) -> int:
        parser.print_help(ctx.stdout)
        return 0

    return show


def _read_password(args: argparse.Namespace, ctx: Context, address: str) -> str:
    if args.password_stdin:
        line = ctx.stdin.readline()
        if not line:
            raise ValueError("no password on standard input")
        return line.rstrip("\r\n") if line.endswith("\n") else line
    first = getpass.getpass(f"Password for {address}: ")
    second = getpass.getpass("Again: ")
    if first != second:
        raise ValueError("the passwords do not match")
    return first


# -- init --------------------------------------------------------------------


def add_init(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "init",
        parents=[common],
        help="write a commented config file and create the data folders",
        description=f"Write DIR/{CONFIG_NAME} (or --config FILE) with every setting at its "
        "default, each explained, and create the data folders.",
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing config file")
    p.add_argument("--hostname", help="the host name to write (default: this machine's)")
    p.add_argument(
        "--domain", action="append", metavar="DOMAIN", dest="domains",
        help="a mail domain to list (repeat for more; default: localhost)",
    )
    p.set_defaults(func=_init)


def _init(args: argparse.Namespace, ctx: Context) -> int:
    path = ctx.config_file or ctx.data_dir / CONFIG_NAME
    if path.exists() and not args.force:
        raise ConfigError(f"{path}: already exists (use --force to overwrite it)")
    text = render_default_config(hostname=args.hostname, domains=args.domains)
    ctx.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    atomic_write(path, text.encode("utf-8"), mode=0o644)
    config = ctx.config  # proves the file loads, and names the folders
    for folder in (config.mail_dir, config.spool_dir, config.queue_dir, config.tls.cert.parent):
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    ctx.directory.list_domains()  # creates the user database
    ctx.say(f"wrote {path}")
    ctx.say(f"next: {PROG} domain add DOMAIN; {PROG} user add USER@DOMAIN; {PROG} serve")
    return 0


# -- serve -------------------------------------------------------------------


def add_serve(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "serve",
        parents=[common],
        help="run the SMTP and POP3 servers",
        description="Run every listener the config turns on, until interrupted. With no "
        "config file, listens on loopback with the embedded default.",
    )
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace, ctx: Context) -> int:
    from postroom.tlscert import ensure_certificate

    config = ctx.config
    for folder in (config.data_dir, config.mail_dir, config.spool_dir, config.queue_dir):
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    if config.tls.generate and ensure_certificate(
        config.tls.cert, config.tls.key, config.hostname
    ):
        print(f"{PROG}: made a self-signed certificate: {config.tls.cert}", file=sys.stderr)
    try:
        from postroom.server.main import run
    except ImportError as e:
        raise ConfigError(f"the server cannot start: {e}") from None
    return run(config)


# -- domain ------------------------------------------------------------------


def add_domain(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "domain", parents=[common], help="manage local mail domains",
        description="Local domains are the ones this host accepts mail for.",
    )
    p.set_defaults(func=_help_of(p))
    actions = _subparsers(p, "actions")
    a = actions.add_parser("add", parents=[common], help="add a local domain")
    a.add_argument("name", metavar="NAME")
    a.set_defaults(func=_domain_add)
    a = actions.add_parser("list", parents=[common], help="list local domains")
    a.set_defaults(func=_domain_list)
    a = actions.add_parser(
        "del", parents=[common],
        help="remove a local domain (it must have no users or aliases left)",
    )
    a.add_argument("name", metavar="NAME")
    a.set_defaults(func=_domain_del)


def _domain_add(args: argparse.Namespace, ctx: Context) -> int:
    ctx.directory.add_domain(args.name)
    ctx.say(f"added domain {canonical_domain(args.name)}")
    return 0


def _domain_list(args: argparse.Namespace, ctx: Context) -> int:
    for name in ctx.directory.list_domains():
        ctx.say(name)
    return 0


def _domain_del(args: argparse.Namespace, ctx: Context) -> int:
    ctx.directory.remove_domain(args.name)
    ctx.say(f"removed domain {canonical_domain(args.name)}")
    return 0


# -- user --------------------------------------------------------------------


def add_user(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "user", parents=[common], help="manage users (mailboxes with a password)",
        description="Users own a mailbox and log in to submission and POP3 with their "
        "address and password.",
    )
    p.set_defaults(func=_help_of(p))
    actions = _subparsers(p, "actions")
    stdin_help = "read the password from standard input (one line) instead of asking"
    a = actions.add_parser("add", parents=[common], help="add a user (asks for the password)")
    a.add_argument("address", metavar="ADDRESS")
    a.add_argument("--password-stdin", action="store_true", help=stdin_help)
    a.set_defaults(func=_user_add)
    a = actions.add_parser("list", parents=[common], help="list users")
    a.add_argument("domain", metavar="DOMAIN", nargs="?", help="only this domain's users")
    a.set_defaults(func=_user_list)
    a = actions.add_parser("passwd", parents=[common], help="change a user's password")
    a.add_argument("address", metavar="ADDRESS")
    a.add_argument("--password-stdin", action="store_true", help=stdin_help)
    a.set_defaults(func=_user_passwd)
    a = actions.add_parser(
        "del", parents=[common],
        help="remove a user (the mailbox folder is kept)",
    )
    a.add_argument("address", metavar="ADDRESS")
    a.set_defaults(func=_user_del)
    a = actions.add_parser(
        "apop", parents=[common],
        help="turn POP3 APOP on (with its own secret) or off for a user",
        description="APOP (RFC 1939 7) logs in without sending a password, but the server "
        "must keep the APOP secret readable. So it is a second secret, separate from the "
        "login password, stored as given; only users who ask for APOP get one. The server "
        "offers APOP only with [pop3] apop = true.",
    )
    a.add_argument("address", metavar="ADDRESS")
    a.add_argument("state", choices=("on", "off"))
    a.add_argument("--password-stdin", action="store_true",
                   help="read the APOP secret from standard input instead of asking")
    a.set_defaults(func=_user_apop)


def _user_add(args: argparse.Namespace, ctx: Context) -> int:
    directory = ctx.directory
    # Check the domain before asking for a password that would be thrown away.
    if "@" in args.address:
        domain = args.address.rpartition("@")[2]
        if not directory.has_domain(domain):
            raise DirectoryError(
                f"{domain} is not a local domain; add the domain first: "
                f"{PROG} domain add {domain}"
            )
    directory.add_user(args.address, _read_password(args, ctx, args.address))
    ctx.say(f"added user {local_address(args.address)}")
    return 0


def _user_list(args: argparse.Namespace, ctx: Context) -> int:
    for address in ctx.directory.list_users(args.domain):
        ctx.say(address)
    return 0


def _user_passwd(args: argparse.Namespace, ctx: Context) -> int:
    directory = ctx.directory
    if not directory.has_user(args.address):
        raise DirectoryError(f"no such user: {args.address}")
    directory.set_password(args.address, _read_password(args, ctx, args.address))
    ctx.say(f"changed the password of {args.address}")
    return 0


def _user_apop(args: argparse.Namespace, ctx: Context) -> int:
    directory = ctx.directory
    if not directory.has_user(args.address):
        raise DirectoryError(f"no such user: {args.address}")
    if args.state == "off":
        directory.set_apop_secret(args.address, None)
        ctx.say(f"APOP is off for {args.address}")
        return 0
    directory.set_apop_secret(args.address, _read_password(args, ctx, args.address))
    ctx.say(f"APOP is on for {args.address} (its secret is stored readable: see --help)")
    return 0


def _user_del(args: argparse.Namespace, ctx: Context) -> int:
    ctx.directory.remove_user(args.address)
    ctx.say(f"removed user {args.address}")
    return 0


# -- alias -------------------------------------------------------------------


def add_alias(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "alias", parents=[common], help="manage aliases (addresses that forward)",
        description="An alias is a local address whose mail goes to other addresses, "
        "local users or anywhere else.",
    )
    p.set_defaults(func=_help_of(p))
    actions = _subparsers(p, "actions")
    a = actions.add_parser(
        "add", parents=[common], help="make SOURCE forward to TARGETs (adds to existing ones)"
    )
    a.add_argument("source", metavar="SOURCE")
    a.add_argument("targets", metavar="TARGET", nargs="+")
    a.set_defaults(func=_alias_add)
    a = actions.add_parser("list", parents=[common], help="list aliases and their targets")
    a.set_defaults(func=_alias_list)
    a = actions.add_parser(
        "del", parents=[common],
        help="remove an alias, or only the TARGETs given",
    )
    a.add_argument("source", metavar="SOURCE")
    a.add_argument("targets", metavar="TARGET", nargs="*")
    a.set_defaults(func=_alias_del)


def _alias_add(args: argparse.Namespace, ctx: Context) -> int:
    directory = ctx.directory
    directory.add_alias(args.source, args.targets)
    source = local_address(args.source)
    ctx.say(f"{source} -> {', '.join(directory.list_aliases()[source])}")
    return 0


def _alias_list(args: argparse.Namespace, ctx: Context) -> int:
    for source, targets in ctx.directory.list_aliases().items():
        ctx.say(f"{source} -> {', '.join(targets)}")
    return 0


def _alias_del(args: argparse.Namespace, ctx: Context) -> int:
    ctx.directory.remove_alias(args.source, args.targets or None)
    ctx.say(f"removed alias {args.source}" + (f" -> {', '.join(args.targets)}"
                                              if args.targets else ""))
    return 0


# -- queue -------------------------------------------------------------------


def add_queue(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "queue", parents=[common], help="inspect and manage the outgoing mail queue",
        description="Messages waiting for delivery to other hosts: why each waits and when "
        "it is tried next. Changes reach a running server at once (SIGUSR1).",
    )
    p.set_defaults(func=_help_of(p))
    actions = _subparsers(p, "actions")
    a = actions.add_parser("list", parents=[common], help="one line per queued message")
    a.set_defaults(func=_queue_list)
    a = actions.add_parser("show", parents=[common], help="a message's envelope and recipients")
    a.add_argument("queue_id", metavar="ID")
    a.set_defaults(func=_queue_show)
    a = actions.add_parser(
        "flush", parents=[common], help="try a message (or every message) now"
    )
    a.add_argument("queue_id", metavar="ID", nargs="?")
    a.set_defaults(func=_queue_flush)
    for name, help_text in (("delete", "remove a message without sending it or a bounce"),
                            ("hold", "keep a message from being tried until released"),
                            ("release", "let a held message be tried again")):
        a = actions.add_parser(name, parents=[common], help=help_text)
        a.add_argument("queue_id", metavar="ID")
        a.set_defaults(func=_queue_change, action=name)


def _queue_store(ctx: Context) -> QueueStore:
    from postroom.queue.store import QueueStore

    return QueueStore(ctx.config.queue_dir, create=False)


def _human_age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size, smaller, smaller_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60),
                                              ("m", 60, "s", 1)):
        if seconds >= size:
            rest = (seconds % size) // smaller_size
            return f"{seconds // size}{unit}" + (f" {rest}{smaller}" if rest else "")
    return f"{seconds}s"


def _human_size(octets: int) -> str:
    for unit, size in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if octets >= size:
            return f"{octets / size:.1f}{unit}"
    return str(octets)


def _next_try(envelope: Envelope, now: float) -> str:
    if envelope.held:
        return "HELD"
    if envelope.next_attempt <= now:
        return "next try now"
    return f"next try in {_human_age(envelope.next_attempt - now)}"


def _queue_list(args: argparse.Namespace, ctx: Context) -> int:
    import time

    envelopes = _queue_store(ctx).list()
    if not envelopes:
        ctx.say("the queue is empty")
        return 0
    now = time.time()
    for env in envelopes:
        errors = [r.last_error for r in env.pending() if r.last_error]
        error = " ".join(errors[0].split()) if errors else ""
        if len(error) > 60:
            error = error[:57] + "..."
        pending = len(env.pending())
        ctx.say(
            f"{env.queue_id}  {_human_age(now - env.created):>6}  {_human_size(env.size):>6}  "
            f"<{env.sender}>  {pending}/{len(env.recipients)} pending  "
            f"{_next_try(env, now)}"
            + (f"  ({error})" if error else "")
        )
    return 0


def _queue_show(args: argparse.Namespace, ctx: Context) -> int:
    import email.utils
    import time

    env = _queue_store(ctx).load(args.queue_id)
    now = time.time()
    give_up = env.created + ctx.config.queue.give_up_after

    def when(t: float) -> str:
        return email.utils.formatdate(t, localtime=True)

    ctx.say(f"message {env.queue_id}")
    submitted = ", ".join(
        x for x in (f"by {env.auth_user}" if env.auth_user else "",
                    f"from {env.client}" if env.client else "") if x
    )
    ctx.say(f"  sender:    <{env.sender}>" + (f" ({submitted})" if submitted else ""))
    ctx.say(f"  arrived:   {when(env.created)} ({_human_age(now - env.created)} ago)")
    ctx.say(f"  size:      {env.size} octets")
    for label, value in (("envid", env.envid), ("ret", env.ret), ("body", env.body)):
        if value:
            ctx.say(f"  {label + ':':<10} {value}")
    if env.done:
        ctx.say("  status:    finished; removed at the server's next pass")
    elif env.held:
        ctx.say(f"  status:    HELD: not tried until `{PROG} queue release {env.queue_id}`")
    elif env.next_attempt <= now:
        ctx.say("  status:    due: tried as soon as the server gets to it")
    else:
        ctx.say(f"  status:    waiting: next try at {when(env.next_attempt)} "
                f"(in {_human_age(env.next_attempt - now)})")
    if not env.done:
        left = f"in {_human_age(give_up - now)}" if give_up > now else "after the next failure"
        then = "returns it to the sender" if env.sender else "drops it (it is a bounce)"
        ctx.say(f"  gives up:  {when(give_up)} ({left}), then {then}")
    ctx.say("  recipients:")
    for r in env.recipients:
        tries = f"{r.attempts} attempt{'s' if r.attempts != 1 else ''}"
        ctx.say(f"    <{r.address}>  {r.state}, {tries}"
                + (f", dsn={r.dsn_status}" if r.dsn_status else ""))
        if r.last_error:
            relay = f"{r.remote_mta}: " if r.remote_mta else ""
            ctx.say(f"        last answer: {relay}{' '.join(r.last_error.split())}")
    return 0


def _poke_server(ctx: Context) -> str:
    from postroom.queue.scheduler import signal_server

    pid = signal_server(ctx.config.data_dir)
    return f"; told the server (pid {pid})" if pid else "; the server is not running"


def _queue_flush(args: argparse.Namespace, ctx: Context) -> int:
    from postroom.queue.store import NotQueued

    store = _queue_store(ctx)

    def now_please(env: Envelope) -> None:
        env.next_attempt = 0.0

    if args.queue_id:
        store.update(args.queue_id, now_please)
        what = args.queue_id
    else:
        count = 0
        for env in store.list():  # skips (and logs) unreadable envelopes
            try:
                store.update(env.queue_id, now_please)
                count += 1
            except NotQueued:
                continue  # delivered meanwhile
        what = f"{count} message{'s' if count != 1 else ''}"
    ctx.say(f"flushed {what}{_poke_server(ctx)}")
    return 0


def _queue_change(args: argparse.Namespace, ctx: Context) -> int:
    store = _queue_store(ctx)
    if args.action == "delete":
        store.remove(args.queue_id)
        ctx.say(f"deleted {args.queue_id}{_poke_server(ctx)}")
        return 0
    held = args.action == "hold"

    def set_held(env: Envelope) -> None:
        env.held = held

    store.update(args.queue_id, set_held)
    ctx.say(f"{'held' if held else 'released'} {args.queue_id}{_poke_server(ctx)}")
    return 0


# -- sendmail ----------------------------------------------------------------


def add_sendmail(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    # Sendmail's own options (-t, -f, -oi ...) are not argparse's: everything after
    # the word "sendmail" goes to postroom.client.sendmail unparsed ("+" matches none).
    p = sub.add_parser(
        "sendmail", prefix_chars="+", add_help=False,
        help="queue a message from standard input, like /usr/sbin/sendmail (-t, -f, -i)",
    )
    p.add_argument("argv", nargs=argparse.REMAINDER)
    p.set_defaults(func=_sendmail)


def _sendmail(args: argparse.Namespace, ctx: Context) -> int:
    from postroom.client import sendmail

    return sendmail.main(
        list(args.argv), data_dir=ctx.data_dir, config_file=ctx.config_file,
        stdin=ctx.stdin.buffer if hasattr(ctx.stdin, "buffer") else None,
        stdout=ctx.stdout,
    )


# -- send and fetch ----------------------------------------------------------
# Their options are here, their work in postroom.client.send/fetch (imported
# only when run: they pull in asyncio, ssl and the protocol cores).

_CLIENT_PASSWORD_HELP = (
    "read the password from FILE's first line (otherwise from $POSTROOM_PASSWORD, "
    "otherwise it is asked for on the terminal)"
)


def _client_options(p: argparse.ArgumentParser) -> None:
    """Connection options `send` and `fetch` share."""
    p.add_argument("--password-file", metavar="FILE", help=_CLIENT_PASSWORD_HELP)
    p.add_argument("--insecure", action="store_true",
                   help="accept any server certificate (self-signed test servers only)")
    p.add_argument("--cafile", metavar="FILE",
                   help="also trust the CA certificate(s) in FILE, e.g. a server's "
                   "self-signed certificate")
    p.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS",
                   help="for the connection and each reply (default 120)")
    p.add_argument("--verbose", "-v", action="store_true",
                   help="show the conversation with the server on standard error "
                   "(passwords hidden)")


def add_send(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "send", parents=[common],
        help="write a message and submit it to an SMTP server (TLS + AUTH)",
        description="Build a message (non-ASCII subjects and names, attachments, Bcc kept "
        "out of the headers) and submit it to a submission server with STARTTLS or "
        "implicit TLS and a login. The text comes from --body, --body-file or standard "
        "input. Exit status: 0 every recipient accepted, 1 some refused, 2 usage, "
        "69 unavailable (connection, TLS, login, refusal), 75 temporary failure.",
    )
    p.add_argument("--from", dest="sender", required=True, metavar="ADDRESS",
                   help='the sender, "user@host" or "Name <user@host>"')
    p.add_argument("--name", metavar="NAME", help="the sender's display name")
    p.add_argument("--to", action="append", metavar="ADDRESS", help="a recipient (repeatable)")
    p.add_argument("--cc", action="append", metavar="ADDRESS", help="a copy (repeatable)")
    p.add_argument("--bcc", action="append", metavar="ADDRESS",
                   help="a blind copy: in the envelope, never in the headers (repeatable)")
    p.add_argument("--subject", "-s", metavar="TEXT", default="", help="the subject")
    body = p.add_mutually_exclusive_group()
    body.add_argument("--body", metavar="TEXT", help="the message text")
    body.add_argument("--body-file", metavar="FILE",
                      help="read the message text (UTF-8) from FILE ('-': standard input)")
    p.add_argument("--attach", "-a", action="append", metavar="FILE",
                   help="attach a file (repeatable; its type is guessed from its name)")
    p.add_argument("--server", required=True, metavar="HOST[:PORT]",
                   help="the submission server, e.g. smtp.isp.example:587")
    p.add_argument("--security", choices=("starttls", "tls"),
                   help="starttls (port 587 style) or tls (implicit, port 465 style); "
                   "default: tls on ports 465 and 2465, starttls elsewhere")
    p.add_argument("--user", metavar="NAME", help="the login name (default: the --from address)")
    _client_options(p)
    p.set_defaults(func=_send)


def _send(args: argparse.Namespace, ctx: Context) -> int:
    from postroom.client import send

    return send.command(args, stdin=ctx.stdin, stdout=ctx.stdout, stderr=sys.stderr)


def add_fetch(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "fetch", parents=[common],
        help="download mail from a POP3 server into a Maildir or an mbox file",
        description="Log on to a POP3 server (STLS or implicit TLS) and download every "
        "message into the Maildir DEST (or the mbox file DEST with --mbox), each one "
        "durable on disk before it is deleted on the server. With --keep, messages stay "
        "on the server and their UIDLs are remembered, so the next run fetches only new "
        "ones. A fetch that was interrupted, run again, loses and duplicates nothing. "
        "Exit status: 0 done, 2 usage, 69 unavailable (connection, TLS, login), "
        "75 temporary failure.",
    )
    p.add_argument("dest", metavar="DEST", help="the Maildir folder (made if missing), "
                   "or with --mbox the mbox file")
    p.add_argument("--server", required=True, metavar="HOST[:PORT]",
                   help="the POP3 server, e.g. pop.isp.example:995")
    p.add_argument("--security", choices=("stls", "tls"),
                   help="stls (port 110 style) or tls (implicit, port 995 style); "
                   "default: tls on ports 995 and 2995, stls elsewhere")
    p.add_argument("--user", required=True, metavar="NAME", help="the login name")
    p.add_argument("--auth", choices=("auto", "plain", "user", "apop"), default="auto",
                   help="how to log on: auto (SASL PLAIN when offered, else USER/PASS), "
                   "plain, user (USER/PASS) or apop (the greeting must offer it)")
    p.add_argument("--keep", action="store_true",
                   help="leave the messages on the server; fetch only new ones next time")
    p.add_argument("--mbox", action="store_true", help="DEST is an mbox file (mboxrd)")
    p.add_argument("--crlf", action="store_true",
                   help="store messages with CRLF line ends as sent (default: LF)")
    p.add_argument("--state-file", metavar="FILE",
                   help="where the UIDLs of downloaded messages are kept "
                   "(default: DEST/.postroom-fetch-uidls)")
    p.add_argument("--progress", action="store_true",
                   help="show progress even when standard error is not a terminal")
    _client_options(p)
    p.set_defaults(func=_fetch)


def _fetch(args: argparse.Namespace, ctx: Context) -> int:
    from postroom.client import fetch

    return fetch.command(args, stdout=ctx.stdout, stderr=sys.stderr)


# -- trace -------------------------------------------------------------------


def add_trace(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "trace", parents=[common],
        help="show a message's path hop by hop, from its Received headers",
        description="Read the Received headers of a message (a file, or the message "
        "whose Received headers carry the queue ID, looked up in DIR/queue and the "
        "Maildirs under DIR/mail) and print each hop, oldest first: the sending and "
        "receiving host, the protocol (ESMTPSA = TLS + AUTH, RFC 3848), TLS version and "
        "cipher, queue ID, time, and the delay since the hop before.",
    )
    p.add_argument("target", metavar="FILE|QUEUE-ID")
    p.set_defaults(func=_trace)


def _trace(args: argparse.Namespace, ctx: Context) -> int:
    from postroom.client.trace import trace

    return trace(args.target, lambda: ctx.config, ctx.stdout)


# -- demo --------------------------------------------------------------------


def add_demo(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "demo", parents=[common],
        help="the whole path of one message on loopback, step by step",
        description="Start, in a temporary folder on free loopback ports, a provider "
        "host (mail.isp.example), a receiving host (mx.corp.example) and a small DNS "
        "server; then send one message from smith@isp.example to boss@corp.example and "
        "show every step: submission with STARTTLS and AUTH, the queue, the MX lookup "
        "and relay, delivery into the Maildir, and the POP3 download. Everything it "
        "started is stopped at the end. Exit status 0 when the message arrived intact. "
        "Ignores --data and --config.",
    )
    p.add_argument("--keep-data", action="store_true",
                   help="keep the temporary folder (configs, queue, mailboxes, the "
                   "servers' log in postroom.log) and print its path")
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace, ctx: Context) -> int:
    from postroom.client.demo import run_demo

    return run_demo(keep_data=args.keep_data, out=ctx.stdout)


# -- the parser --------------------------------------------------------------

# One function per subcommand, in the order `postroom --help` lists them.
COMMANDS: list[Callable[[Subparsers, argparse.ArgumentParser], None]] = [
    add_init,
    add_serve,
    add_domain,
    add_user,
    add_alias,
    add_queue,
    add_sendmail,
    add_send,
    add_fetch,
    add_trace,
    add_demo,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        parents=[_common_options(defaults=True)],
        description="postroom: SMTP submission and relay, Maildir delivery and POP3 "
        "in one program.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.set_defaults(func=_help_of(parser))
    sub = _subparsers(parser, "commands")
    common = _common_options(defaults=False)
    for add in COMMANDS:
        add(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for any user-fixable error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version and usage errors
        return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_USAGE)
    handler: Handler = args.func
    try:
        return handler(args, Context(args))
    except (ConfigError, DirectoryError, ValueError, sqlite3.Error) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:
        where = f": {e.filename}" if e.filename else ""
        print(f"{PROG}: error: {e.strerror or e}{where}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
