"""`postroom domain`, `user` and `alias`: the local domains, users and aliases."""

from __future__ import annotations

import argparse
import getpass
import warnings
from typing import TYPE_CHECKING

from postroom.canonical import canonical_domain, split
from postroom.cli.common import PROG, Context, group
from postroom.store.api import DirectoryError, local_address

if TYPE_CHECKING:
    from postroom.cli.common import Subparsers


def _ask(prompt: str, what: str) -> str:
    """A line typed at the terminal, not echoed; ValueError when there is no terminal.

    Without one, getpass would read standard input with a warning (or fail on
    its end): a secret is then expected there on purpose, with --password-stdin.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", getpass.GetPassWarning)
        try:
            return getpass.getpass(prompt)
        except getpass.GetPassWarning:
            raise ValueError(f"no terminal to ask for the {what} on; give it on standard "
                             "input with --password-stdin") from None
        except EOFError:
            raise ValueError(f"no {what} given (end of input at the prompt)") from None


def _read_password(
    args: argparse.Namespace, ctx: Context, address: str, what: str = "password"
) -> str:
    if args.password_stdin:
        line = ctx.stdin.readline()
        if not line:
            raise ValueError(f"no {what} on standard input")
        return line.rstrip("\r\n") if line.endswith("\n") else line
    first = _ask(f"{what[0].upper()}{what[1:]} for {address}: ", what)
    second = _ask("Again: ", what)
    if first != second:
        raise ValueError(f"the {what}s do not match")
    return first


# -- domain ------------------------------------------------------------------


def add_domain(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    action = group(sub, common, "domain", "manage local mail domains",
                   "Local domains are the ones this host accepts mail for.")
    action("add", _domain_add, "add a local domain").add_argument("name", metavar="NAME")
    action("list", _domain_list, "list local domains")
    action("del", _domain_del, "remove a local domain (it must have no users or aliases left)"
           ).add_argument("name", metavar="NAME")


def _domain_add(args: argparse.Namespace, ctx: Context) -> int:
    ctx.directory.add_domain(args.name)
    name = canonical_domain(args.name)
    ctx.say(f"added domain {name}")
    _say_postmaster(ctx, name)
    return 0


def _say_postmaster(ctx: Context, domain: str) -> None:
    """Where postmaster@domain's mail goes (RFC 5321 4.5.1), and what to do about it."""
    directory = ctx.directory
    admin = ctx.config.postmaster
    own = f"postmaster@{domain}"
    aliases = directory.list_aliases()
    if own in aliases or directory.has_user(own):
        return  # a user or alias of its own receives it
    ctx.say(f"mail to {own} goes to the administrator's mailbox, {admin} "
            f"(postmaster in {ctx.config.source})")
    if not directory.has_user(admin) and admin not in aliases:
        local, admin_domain = split(admin)
        ctx.say(f"  {admin} is no user yet: its mail waits in "
                f"{ctx.config.mail_dir / admin_domain / local}; to read it with POP3: "
                f"{PROG} user add {admin}")


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
    action = group(sub, common, "user", "manage users (mailboxes with a password)",
                   "Users own a mailbox and log in to submission and POP3 with their "
                   "address and password.")
    stdin_help = "read the password from standard input (one line) instead of asking"
    a = action("add", _user_add, "add a user (asks for the password)")
    a.add_argument("address", metavar="ADDRESS")
    a.add_argument("--password-stdin", action="store_true", help=stdin_help)
    action("list", _user_list, "list users").add_argument(
        "domain", metavar="DOMAIN", nargs="?", help="only this domain's users")
    a = action("passwd", _user_passwd, "change a user's password")
    a.add_argument("address", metavar="ADDRESS")
    a.add_argument("--password-stdin", action="store_true", help=stdin_help)
    action("del", _user_del, "remove a user (the mailbox folder is kept)").add_argument(
        "address", metavar="ADDRESS")
    a = action(
        "apop", _user_apop, "turn POP3 APOP on (with its own secret) or off for a user",
        description="APOP (RFC 1939 7) logs in without sending a password, but the server "
        "must keep the APOP secret readable. So it is a second secret, separate from the "
        "login password, stored as given; only users who ask for APOP get one. The server "
        "offers APOP only with [pop3] apop = true.",
    )
    a.add_argument("address", metavar="ADDRESS")
    a.add_argument("state", choices=("on", "off"))
    a.add_argument("--password-stdin", action="store_true",
                   help="read the APOP secret from standard input instead of asking")


def _user_add(args: argparse.Namespace, ctx: Context) -> int:
    directory = ctx.directory
    # Check the address before asking for a password that would be thrown away.
    key = directory.check_new_user(args.address)
    directory.add_user(args.address, _read_password(args, ctx, key))
    ctx.say(f"added user {key}")
    targets = directory.list_aliases().get(key)
    if targets is not None:
        ctx.say(f"note: {key} is also an alias (-> {', '.join(targets)}): its mail goes "
                f"there while the alias exists ({PROG} alias del {key} removes it)")
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
    directory.set_apop_secret(args.address,
                              _read_password(args, ctx, args.address, "APOP secret"))
    ctx.say(f"APOP is on for {args.address} (its secret is stored readable: see --help)")
    return 0


def _user_del(args: argparse.Namespace, ctx: Context) -> int:
    directory = ctx.directory
    directory.remove_user(args.address)
    key = local_address(args.address)
    ctx.say(f"removed user {key}")
    orphans = [source for source, targets in directory.list_aliases().items()
               if key in targets and (expansion := directory.expand(source)) is not None
               and expansion.broken]
    if orphans:
        ctx.say(f"note: alias {', '.join(orphans)} now leads to no mailbox, so mail to it is "
                f"deferred (451 4.3.5) until it is mended: {PROG} alias del {orphans[0]} "
                f"{key}, or add a target")
    if key == ctx.config.postmaster:
        ctx.say(f"note: {key} is the administrator (postmaster in {ctx.config.source}): "
                "postmaster's mail still goes to its mailbox folder")
    return 0


# -- alias -------------------------------------------------------------------


def add_alias(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    action = group(sub, common, "alias", "manage aliases (addresses that forward)",
                   "An alias is a local address whose mail goes to other local addresses: "
                   "users, other aliases or postmaster. Forwarding to other hosts is not "
                   "supported.")
    a = action("add", _alias_add, "make SOURCE forward to TARGETs (adds to existing ones)")
    a.add_argument("source", metavar="SOURCE")
    a.add_argument("targets", metavar="TARGET", nargs="+")
    a.add_argument(
        "--force", action="store_true",
        help="allow SOURCE to be a user: the alias then takes all of the user's mail "
        "(name SOURCE among the TARGETs to keep a copy in its mailbox)",
    )
    action("list", _alias_list, "list aliases and their targets")
    a = action("del", _alias_del, "remove an alias, or only the TARGETs given")
    a.add_argument("source", metavar="SOURCE")
    a.add_argument("targets", metavar="TARGET", nargs="*")


def _alias_add(args: argparse.Namespace, ctx: Context) -> int:
    directory = ctx.directory
    directory.add_alias(args.source, args.targets, replace_user=args.force)
    source = local_address(args.source)
    targets = directory.list_aliases()[source]
    ctx.say(f"{source} -> {', '.join(targets)}")
    if directory.has_user(source) and source not in targets:
        ctx.say(f"note: {source} is a user; its mail now goes to the alias's targets, not "
                "to its mailbox")
    remote = [t for t in targets if not directory.has_domain(split(t)[1])]
    if remote:
        ctx.say(f"note: mail for {', '.join(remote)} is forwarded to another host with an "
                f"SRS sender in {split(source)[1]} and an ARC seal made with its RSA DKIM key "
                f"(`{PROG} dkim add {split(source)[1]}` if it has none)")
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
