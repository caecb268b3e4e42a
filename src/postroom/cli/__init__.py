"""The `postroom` command line: parse arguments, then hand each subcommand its context.

Each subcommand is one `add_*` function that registers its parser and its
handler; `COMMANDS` lists them. A handler takes the parsed arguments and a
`Context` (data dir, config, user directory, all made on first use) and
returns the exit status. Errors the user can fix are raised as `ConfigError`,
`DirectoryError`, `ValueError` or `OSError` and become one line on stderr,
`postroom: error: ...`, with exit status 2.

The subcommands live in one module per group: `serve` (init, serve), `users`
(domain, user, alias), `queue` and `mail` (sendmail, send, fetch, trace, demo);
`common` holds the Context and the parser helpers they share.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from postroom import __version__
from postroom.cli.common import (
    DATA_ENV,
    EXIT_USAGE,
    PROG,
    Context,
    Handler,
    help_of,
    subparsers,
)
from postroom.cli.dkim import add_dkim, add_dns
from postroom.cli.dovecot import add_checkpassword, add_dovecot_config
from postroom.cli.mail import add_demo, add_fetch, add_send, add_sendmail, add_trace
from postroom.cli.queue import add_queue
from postroom.cli.serve import add_init, add_serve
from postroom.cli.store import add_store
from postroom.cli.system import add_reload, add_systemd_unit
from postroom.cli.users import add_alias, add_domain, add_user
from postroom.config import CONFIG_NAME, ConfigError
from postroom.server.privileges import become_data_owner
from postroom.store.api import DirectoryError

if TYPE_CHECKING:
    from postroom.cli.common import Subparsers

__all__ = ["COMMANDS", "DATA_ENV", "EXIT_USAGE", "PROG", "Context", "build_parser", "main"]


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


# -- the parser --------------------------------------------------------------

# One function per subcommand, in the order `postroom --help` lists them.
COMMANDS: list[Callable[[Subparsers, argparse.ArgumentParser], None]] = [
    add_init,
    add_serve,
    add_reload,
    add_systemd_unit,
    add_domain,
    add_user,
    add_alias,
    add_queue,
    add_dkim,
    add_dns,
    add_sendmail,
    add_send,
    add_fetch,
    add_trace,
    add_demo,
    add_dovecot_config,
    add_checkpassword,
    add_store,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        parents=[_common_options(defaults=True)],
        description="postroom: SMTP submission and relay, Maildir delivery and POP3 "
        "in one program.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.set_defaults(func=help_of(parser))
    sub = subparsers(parser, "commands")
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
        context = Context(args)
        if not getattr(args, "stay_root", False):  # hook: run as the data folder's owner
            become_data_owner(context.data_dir)
        return handler(args, context)
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
