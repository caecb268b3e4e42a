"""`postroom domain`, `user` and `alias`: the local domains, users and aliases."""

from __future__ import annotations

import argparse
import getpass
from typing import TYPE_CHECKING

from postroom.addresses import canonical_domain
from postroom.cli.common import PROG, Context, help_of, subparsers
from postroom.store.users import DirectoryError, local_address

if TYPE_CHECKING:
    from postroom.cli.common import Subparsers


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


# -- domain ------------------------------------------------------------------


def add_domain(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "domain", parents=[common], help="manage local mail domains",
        description="Local domains are the ones this host accepts mail for.",
    )
    p.set_defaults(func=help_of(p))
    actions = subparsers(p, "actions")
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
    p.set_defaults(func=help_of(p))
    actions = subparsers(p, "actions")
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
    p.set_defaults(func=help_of(p))
    actions = subparsers(p, "actions")
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
