"""The config sections of the server's defences: [limits], [screen], [dnsbl] and [greylist]."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from functools import partial
from typing import Literal

from postroom.config.model import setting
from postroom.config.values import parse_bool, parse_choice, parse_duration, parse_int, show


def parse_networks(value: object) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """A list of IP networks ("127.0.0.0/8", "::1"); a bare address is a /32 or /128."""
    if not isinstance(value, list):
        raise ValueError(f'expected a list of networks such as ["127.0.0.0/8"], got {show(value)}')
    networks = []
    for item in value:
        if not isinstance(item, str):
            raise ValueError(f"expected a network string, got {show(item)}")
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"{show(item)} is not an IP network") from None
    return tuple(networks)


def parse_sites(value: object) -> tuple[str, ...]:
    """DNSBL/DNSWL sites as postscreen_dnsbl_sites writes them (checked by defense.dnsbl)."""
    from postroom.defense.dnsbl import parse_site  # the syntax lives with its reader

    if not isinstance(value, list):
        raise ValueError(f'expected a list such as ["zen.example*2"], got {show(value)}')
    for item in value:
        if not isinstance(item, str):
            raise ValueError(f"expected a site string, got {show(item)}")
        parse_site(item)
    return tuple(value)


RATE_DOC = " per client address (an IPv6 client: its /64) per minute, across all server " \
           "processes (as Postfix's anvil, whose time unit is a minute); 0 turns it off. "

Action = Literal["reject", "warn", "off"]
parse_action = parse_choice("reject", "warn", "off")


@dataclass(frozen=True)
class LimitsConfig:
    """Counted by the primary process for all of them (defense.anvil)."""

    connection_count: int = setting(
        50, parse_int(0),
        "Simultaneous SMTP connections from one client address (an IPv6 client: its /64), "
        "all listeners and processes together (Postfix's smtpd_client_connection_count_"
        "limit); one more gets 421 4.7.0. 0 turns it off.",
    )
    connection_rate: int = setting(
        60, parse_int(0),
        "New SMTP connections" + RATE_DOC + "Over it: 421 4.7.0.",
    )
    message_rate: int = setting(
        100, parse_int(0), "MAIL FROM commands" + RATE_DOC + "Over it: 450 4.7.1.",
    )
    recipient_rate: int = setting(
        500, parse_int(0), "RCPT TO commands" + RATE_DOC + "Over it: 450 4.7.1.",
    )
    user_message_rate: int = setting(
        100, parse_int(0),
        "Submission: messages per authenticated user per minute, from any address; 0 "
        "turns it off. Over it: 450 4.7.1.",
    )
    user_recipient_rate: int = setting(
        500, parse_int(0),
        "Submission: recipients per authenticated user per minute; 0 turns it off. Over "
        "it: 450 4.7.1.",
    )
    auth_failure_limit: int = setting(
        10, parse_int(0),
        "Failed logins (SMTP AUTH, POP3 PASS, AUTH and APOP) from one client address in "
        "15 minutes after which that address may not try again until 15 minutes after its "
        "last failure (421 4.7.0, -ERR [SYS/TEMP]). Each failure is answered later than the "
        "one before (pop3.auth_failure_delay), per address and per account; a right "
        "password from another address is never held up. 0 turns the refusal off.",
    )
    exceptions: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = setting(
        ["127.0.0.0/8", "::1"], parse_networks,
        "Client networks that no limit of this section and no check of [screen], [dnsbl] "
        "and [greylist] applies to, as Postfix's smtpd_client_event_limit_exceptions and "
        "postscreen_access_list (by default this host itself). Failed logins from them are "
        "still answered late.",
    )


@dataclass(frozen=True)
class ScreenConfig:
    """postscreen's protocol checks and HELO/client name checks, on the smtp (MX) listener."""

    greet_wait: float = setting(
        "0s", partial(parse_duration, zero=True),
        "MX listener: wait this long before the 220 greeting; a client that talks first "
        "(pregreet, RFC 5321 3.1) gets 554 5.5.1 and is dropped (Postfix: postscreen_"
        "greet_wait, 6s). 0 greets at once.",
    )
    pipelining: Action = setting(
        "reject", parse_action,
        "MX listener: a client that sends commands ahead without having negotiated "
        "PIPELINING with EHLO (RFC 2920 3.1) gets 554 5.5.1 and is dropped (reject), is "
        "logged (warn), or nothing (off).",
    )
    helo_syntax: Action = setting(
        "reject", parse_action,
        "MX listener: a HELO/EHLO name that is neither a domain name nor an address "
        "literal (RFC 5321 4.1.1.1) gets 501 5.5.2 (reject), is logged (warn) or passes (off).",
    )
    helo_ours: Action = setting(
        "reject", parse_action,
        "MX listener: a HELO/EHLO that claims to be this host (its hostname, a local "
        "domain, or our address literal given by another address) gets 550 5.7.1 "
        "(reject), is logged (warn) or passes (off).",
    )
    reverse_dns: Action = setting(
        "off", parse_action,
        "MX listener: a client whose address has no name that leads back to it "
        "(PTR, then A/AAAA) gets 450 4.7.25 at HELO (reject, RFC 7372), is logged "
        "(warn), or is not looked up (off).",
    )


@dataclass(frozen=True)
class DNSBLConfig:
    """postscreen_dnsbl_sites for the MX listener, asked through [dns] nameservers."""

    sites: tuple[str, ...] = setting(
        [], parse_sites,
        'DNS lists of client addresses, as "ZONE", "ZONE=FILTER" and "ZONE*WEIGHT" (Postfix '
        'postscreen_dnsbl_sites): "zen.example=127.0.0.[2..11]*3". A filter keeps only the '
        "matching answers, each octet a number, [N..M] or [N;M]. A negative weight makes "
        "an allowlist (DNSWL). Empty: no lookups.",
    )
    threshold: int = setting(
        1, parse_int(1),
        "A client whose weights add up to this or more gets 554 5.7.1 naming the lists "
        "after the greeting, to its HELO/EHLO and MAIL commands.",
    )
    allowlist_threshold: int = setting(
        -1, parse_int(-1_000_000, 0),
        "A client whose weights add up to this or less is allowlisted: no greylisting "
        "(Postfix's postscreen_dnswl_threshold).",
    )
    timeout: float = setting(
        "5s", parse_duration,
        "How long to wait for the lists; one that has not answered by then counts as "
        "not listing the client.",
    )


@dataclass(frozen=True)
class GreylistConfig:
    """Greylisting of MX mail by triplet (client network, sender, recipient), kept in SQLite."""

    enabled: bool = setting(
        False, parse_bool,
        "Answer 450 4.7.1 to the first try of an unknown (client /24 or /64, sender, "
        "recipient) on the MX listener; a retry after `delay` passes. Never for "
        "authenticated users or allowlisted (DNSWL) clients.",
    )
    delay: float = setting(
        "5m", parse_duration, "How long a new triplet must wait before a retry passes "
        "(postgrey: 300 s).",
    )
    retry_window: float = setting(
        "2d", parse_duration, "A retry later than this after the first try starts over.",
    )
    lifetime: float = setting(
        "35d", parse_duration, "A triplet that passed is remembered this long after its "
        "last message (postgrey's max-age).",
    )
    auto_allow_after: int = setting(
        5, parse_int(0),
        "A client network that passed this many triplets skips greylisting (postgrey's "
        "auto-whitelist-clients); 0 turns that off.",
    )
