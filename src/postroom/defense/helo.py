"""Who the client says it is and who DNS says it is: HELO/EHLO name checks and reverse DNS.

- Syntax: RFC 5321 4.1.1.1 asks for the client's domain name (sub-domains of
  letters, digits and hyphens) or an address literal ([192.0.2.1],
  [IPv6:2001:db8::1], RFC 5321 4.1.3).
- Claims to be us: our hostname, one of our mail domains, or the literal of
  the address the client reached us on when it connects from another one. No
  mail host gives those names but this one.
- Reverse DNS (forward-confirmed, as Postfix's reject_unknown_client_hostname):
  a PTR name of the client's address whose A/AAAA records include that address.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from postroom.protocol.replies import Reply
from postroom.resolver import NXDOMAIN, DNSTrouble, Resolver, lookup

_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
MAX_DOMAIN = 255  # RFC 5321 4.5.3.1.2
MAX_PTR_NAMES = 4  # PTR names followed to their addresses (Postfix asks a few as well)


def literal_address(name: str) -> str | None:
    """The address in an address literal (RFC 5321 4.1.3), or None if `name` is none."""
    if not (name.startswith("[") and name.endswith("]")):
        return None
    inner = name[1:-1]
    if inner[:5].lower() == "ipv6:":
        try:
            return str(ipaddress.IPv6Address(inner[5:]))
        except ValueError:
            return None
    try:
        return str(ipaddress.IPv4Address(inner))
    except ValueError:
        return None


def valid_helo(name: str) -> bool:
    """RFC 5321 4.1.1.1: a Domain or an address-literal."""
    if name.startswith("["):
        return literal_address(name) is not None
    if len(name) > MAX_DOMAIN or not name:
        return False
    labels = name[:-1].split(".") if name.endswith(".") else name.split(".")
    return all(_LABEL.fullmatch(label) for label in labels) and not labels[-1].isdigit()


def claims_to_be_us(name: str, ours: frozenset[str], local_ip: str, client_ip: str) -> bool:
    """The HELO name is ours (`ours`: hostname and domains, lower case), or our address
    literal sent from another address."""
    literal = literal_address(name)
    if literal is not None:
        return _same_ip(literal, local_ip) and not _same_ip(literal, client_ip)
    return name.lower().rstrip(".") in ours


def _same_ip(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return False


def bad_helo_reply(name: str) -> Reply:
    return Reply(501, "5.5.2", f"<{name}>: Helo command rejected: invalid name (RFC 5321 "
                 "4.1.1.1 asks for your domain name or address literal)")


def ours_helo_reply(name: str) -> Reply:
    return Reply(550, "5.7.1", f"<{name}>: Helo command rejected: that is my name, not yours")


@dataclass(frozen=True)
class ReverseName:
    """The outcome of the reverse DNS check: the confirmed name, or why there is none."""

    name: str | None
    problem: str = ""
    temporary: bool = False

    def reply(self, client_ip: str) -> Reply:
        return Reply(450, "4.7.25", f"Client host rejected: cannot find your hostname, "
                     f"[{client_ip}] ({self.problem})")


async def reverse_name(resolver: Resolver, client_ip: str) -> ReverseName:
    """The client's name when a PTR record names it and that name leads back (FCrDNS)."""
    ip = ipaddress.ip_address(client_ip)
    try:
        names = await lookup(resolver, ip.reverse_pointer + ".", "PTR")
    except NXDOMAIN:
        return ReverseName(None, "no PTR record")
    except DNSTrouble as exc:
        return ReverseName(None, str(exc), temporary=True)
    if not names:
        return ReverseName(None, "no PTR record")
    trouble = ""
    for record in names[:MAX_PTR_NAMES]:
        name = str(record.target)
        rdtype = "A" if ip.version == 4 else "AAAA"
        try:
            addresses = await lookup(resolver, name, rdtype)
        except NXDOMAIN:
            continue
        except DNSTrouble as exc:
            trouble = str(exc)
            continue
        if any(ipaddress.ip_address(str(a)) == ip for a in addresses):
            return ReverseName(name.rstrip("."))
    if trouble:
        return ReverseName(None, trouble, temporary=True)
    return ReverseName(None, "its PTR name does not lead back to it")
