"""`postroom dkim` (the domains' signing keys) and `postroom dns` (the records a domain needs)."""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import TYPE_CHECKING

from postroom.canonical import canonical_domain
from postroom.cli.common import PROG, Context, group
from postroom.config import Config
from postroom.mailauth import dnsrecords
from postroom.mailauth.keys import ALGORITHMS, RSA_BITS, DKIMKey, KeyStore
from postroom.resolver import make_resolver

if TYPE_CHECKING:
    from postroom.cli.common import Subparsers

EXIT_NOT_READY = 1  # `dns check`: some record is missing or wrong


def _local_domain(ctx: Context, name: str) -> str:
    domain = canonical_domain(name)
    if domain not in ctx.config.domains and not ctx.directory.has_domain(domain):
        raise ValueError(f"{domain} is not a local domain; add it first with "
                         f"`{PROG} domain add {domain}`")
    return domain


# -- dkim ------------------------------------------------------------------------


def add_dkim(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    action = group(
        sub, common, "dkim", "manage the DKIM signing keys of local domains",
        "Mail your users submit, and the reports this host sends, are DKIM-signed with "
        "every active key of the From domain. To rotate a key without a gap: add a key "
        "with a new selector, publish its record, then retire the old key.")
    a = action("add", _dkim_add, "make a key and print the TXT record to publish")
    a.add_argument("domain", metavar="DOMAIN")
    a.add_argument("--selector", metavar="S",
                   help="the selector (default: year, month and r or e, e.g. 202612r)")
    a.add_argument("--algorithm", choices=ALGORITHMS, default="rsa",
                   help=f"rsa ({RSA_BITS} bits, default) or ed25519 (RFC 8463); add one of "
                        "each to sign with both")
    a = action("list", _dkim_list, "list the keys, active and retired")
    a.add_argument("domain", metavar="DOMAIN", nargs="?")
    a = action("retire", _dkim_retire, "stop signing with a key (its file is kept)")
    a.add_argument("domain", metavar="DOMAIN")
    a.add_argument("selector", metavar="SELECTOR")
    a = action("del", _dkim_del, "delete a retired key for good")
    a.add_argument("domain", metavar="DOMAIN")
    a.add_argument("selector", metavar="SELECTOR")


def _keys(ctx: Context) -> KeyStore:
    return KeyStore(ctx.config.data_dir)


def _describe(key: DKIMKey) -> str:
    kind = f"rsa-{RSA_BITS}" if key.algorithm == "rsa" else key.algorithm
    when = time.strftime("%Y-%m-%d", time.gmtime(key.created))
    return f"{key.domain}\t{key.selector}\t{kind}\t{'retired' if key.retired else 'active'}" \
           f"\t{when}"


def _dkim_add(args: argparse.Namespace, ctx: Context) -> int:
    domain = _local_domain(ctx, args.domain)
    key = _keys(ctx).add(domain, args.selector, args.algorithm)
    record = dnsrecords.Record(key.record_name, "TXT", key.txt())
    ctx.say(f"made {key.algorithm} key {key.selector} for {domain}: {key.path}")
    ctx.say(f"; publish this record, then check with `{PROG} dns check {domain}`:")
    ctx.say(record.zone_line())
    return 0


def _dkim_list(args: argparse.Namespace, ctx: Context) -> int:
    domain = canonical_domain(args.domain) if args.domain else None
    for key in _keys(ctx).all(domain):
        ctx.say(_describe(key))
    return 0


def _dkim_retire(args: argparse.Namespace, ctx: Context) -> int:
    store = _keys(ctx)
    for key in store.retire(args.domain, args.selector):
        ctx.say(f"retired {key.algorithm} key {key.selector} of {key.domain}: mail is no "
                "longer signed with it; leave its DNS record for a few days, then "
                f"`{PROG} dkim del {key.domain} {key.selector}`")
    if not store.active(args.domain):
        ctx.say(f"warning: {canonical_domain(args.domain)} has no active key left: its mail "
                "goes unsigned")
    return 0


def _dkim_del(args: argparse.Namespace, ctx: Context) -> int:
    for key in _keys(ctx).delete(args.domain, args.selector):
        ctx.say(f"deleted {key.algorithm} key {key.selector} of {key.domain}")
    return 0


# -- dns -------------------------------------------------------------------------


def add_dns(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    action = group(sub, common, "dns", "the DNS records a local domain needs",
                   "Print the records to publish for a domain, or check what DNS holds.")
    a = action("records", _dns_records, "print every record the domain needs (zone file)")
    a.add_argument("domain", metavar="DOMAIN")
    a.add_argument("--address", action="append", default=[], metavar="IP",
                   help="this host's public address (repeatable; default: the SMTP "
                        "listener's address when it names one)")
    a = action("check", _dns_check,
               "ask DNS for each record; exit 0 only when the domain is ready")
    a.add_argument("domain", metavar="DOMAIN")
    a.add_argument("--address", action="append", default=[], metavar="IP",
                   help="this host's public address (as for `records`)")


def _addresses(config: Config, given: list[str]) -> list[str]:
    if given:
        return dnsrecords.public_addresses(given) or []
    smtp = config.listen.smtp
    return dnsrecords.public_addresses([smtp.host] if smtp is not None else [])


def _needed(args: argparse.Namespace, ctx: Context) -> tuple[list[dnsrecords.Record], list[str],
                                                            list[DKIMKey]]:
    domain = _local_domain(ctx, args.domain)
    config = ctx.config
    addresses = _addresses(config, args.address)
    keys = _keys(ctx).all(domain)
    # RFC 5321 4.5.1: postmaster@ every local domain reaches the administrator.
    records = dnsrecords.needed(domain, config.hostname, addresses, keys, f"postmaster@{domain}")
    return records, addresses, [k for k in keys if k.retired]


def _dns_records(args: argparse.Namespace, ctx: Context) -> int:
    records, _addresses_, retired = _needed(args, ctx)
    ctx.stdout.write(dnsrecords.zone_snippet(canonical_domain(args.domain), records, retired))
    if not any(r.name.endswith("._domainkey." + canonical_domain(args.domain))
               for r in records):
        ctx.say(f"; no DKIM key: make one with `{PROG} dkim add {canonical_domain(args.domain)}`")
    return 0


def _dns_check(args: argparse.Namespace, ctx: Context) -> int:
    records, addresses, _retired = _needed(args, ctx)
    resolver = make_resolver(ctx.config.dns.nameservers)
    findings = asyncio.run(dnsrecords.check(resolver, records, addresses))
    for finding in findings:
        ctx.say(finding.line())
    if not any(r.name.endswith("._domainkey." + canonical_domain(args.domain))
               for r in records):
        ctx.say(f"MISSING  DKIM key: make one with `{PROG} dkim add "
                f"{canonical_domain(args.domain)}` and publish its record")
        return EXIT_NOT_READY
    if dnsrecords.ready(findings):
        ctx.say(f"{canonical_domain(args.domain)} is ready to send and receive mail")
        return 0
    return EXIT_NOT_READY
