"""`postroom init` and `postroom serve`: write a commented config, run the servers."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from postroom.canonical import domain_of
from postroom.cli.common import PROG, Context
from postroom.cli.system import add_system_options, init_system
from postroom.config import CONFIG_NAME, ConfigError, render_default_config
from postroom.store.atomic import atomic_write

if TYPE_CHECKING:
    from postroom.cli.common import Subparsers


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
    p.add_argument(
        "--postmaster", metavar="ADDRESS",
        help="the administrator's address, whose mailbox receives the mail to postmaster@ "
        "every local domain (default: postmaster@ the first domain)",
    )
    add_system_options(p)  # hook: --system (cli/system.py)
    p.set_defaults(func=_init, stay_root=True)


def _init(args: argparse.Namespace, ctx: Context) -> int:
    if args.system:
        return init_system(args, ctx)
    path = ctx.config_file or ctx.data_dir / CONFIG_NAME
    if path.exists() and not args.force:
        raise ConfigError(f"{path}: already exists (use --force to overwrite it)")
    text = render_default_config(hostname=args.hostname, domains=args.domains,
                                 postmaster=args.postmaster)
    ctx.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    atomic_write(path, text.encode("utf-8"), mode=0o644)
    config = ctx.config  # proves the file loads, and names the folders
    for folder in (config.mail_dir, config.spool_dir, config.queue_dir, config.tls.cert.parent):
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory = ctx.directory  # opening it creates the user database
    admin = config.postmaster
    admin_domain = domain_of(admin)
    ctx.say(f"wrote {path}")
    ctx.say(f"mail to postmaster@ every local domain (RFC 5321 4.5.1) goes to the mailbox of "
            f"{admin} (postmaster in that file)")
    steps = [] if directory.has_domain(admin_domain) else [f"{PROG} domain add {admin_domain}"]
    if not directory.has_user(admin):
        steps.append(f"{PROG} user add {admin}")
    steps += [f"{PROG} user add USER@DOMAIN for each user", f"{PROG} serve"]
    ctx.say(f"next: {'; '.join(steps)}")
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
    p.add_argument(
        "--user", metavar="USER",
        help="started as root: the user to run as once the listeners are bound (env "
        "POSTROOM_RUN_USER; default: run.user of the config, postroom); root stays root",
    )
    p.set_defaults(func=_serve, stay_root=True)  # binds first (server.privileges)


def _serve(args: argparse.Namespace, ctx: Context) -> int:
    from postroom.server import privileges
    from postroom.tlscert import TLSFileError, ensure_certificate

    config = ctx.config
    account = privileges.resolve(config, args.user)
    # Made for the account the server runs as (server.privileges), if it switches.
    privileges.make_folders((config.data_dir, config.mail_dir, config.spool_dir,
                             config.queue_dir), account)
    with privileges.acting_as(account):  # what is made here belongs to the account
        if account is not None:
            privileges.check(config, account)
        admin_domain = domain_of(config.postmaster)
        if not ctx.directory.has_domain(admin_domain):
            # Its mail would be filed where no user can ever log in to read it.
            raise ConfigError(
                f"{config.source}: postmaster: {config.postmaster} is not in a local domain; "
                f"add the domain ({PROG} domain add {admin_domain}) or list it in `domains`"
            )
        try:
            made = config.tls.generate and ensure_certificate(
                config.tls.cert, config.tls.key, config.hostname
            )
        except TLSFileError as e:
            raise ConfigError(f"{config.source}: tls.{e.setting}: {e}") from None
    if made:
        print(f"{PROG}: made a self-signed certificate: {config.tls.cert}", file=sys.stderr)
    try:
        from postroom.server.main import run
    except ImportError as e:
        raise ConfigError(f"the server cannot start: {e}") from None
    return run(config) if args.user is None else run(config, args.user)
