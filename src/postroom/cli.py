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


# -- the parser --------------------------------------------------------------

# One function per subcommand, in the order `postroom --help` lists them.
COMMANDS: list[Callable[[Subparsers, argparse.ArgumentParser], None]] = [
    add_init,
    add_serve,
    add_domain,
    add_user,
    add_alias,
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
