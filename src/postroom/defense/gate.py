"""The checks a session passes on its way: limits, postscreen's tests, DNS lists, greylisting.

`Defense` is one per server process and holds what its sessions share: the
counters (defense.anvil), the DNS lists, the resolver, the greylist. An SMTP
session gets a `Screening` that it asks at each step (connect, HELO, MAIL,
RCPT, and every command for pipelining); each answer is None (go on) or the
Reply to send. POP3 and SMTP AUTH ask `login_refused` before a password
check and `login_failed` after a wrong one.

Every refusal is logged as one line a log watcher such as fail2ban can match:
    LISTENER: defense: CHECK from [ADDRESS]: REPLY[; DETAIL]
with CHECK one of the [limits] names, auth_lockout, pregreet, pipelining,
dnsbl, helo_syntax, helo_ours, reverse_dns or greylist (a temporary step of
honest mail, which a ban must not match). `warn` settings log
"defense: warn: CHECK ..." and let the client go on.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import dns.exception

from postroom.config import Config
from postroom.config.defense import DNSBLConfig, GreylistConfig, LimitsConfig, ScreenConfig
from postroom.defense.anvil import Counters, Limits, client_key
from postroom.defense.dnsbl import NOT_LISTED, DNSLists, Verdict
from postroom.defense.greylist import Greylist, greylisted_reply
from postroom.defense.helo import (
    ReverseName,
    bad_helo_reply,
    claims_to_be_us,
    ours_helo_reply,
    reverse_name,
    valid_helo,
)
from postroom.protocol.replies import Reply
from postroom.resolver import Resolver, make_resolver

log = logging.getLogger("postroom.defense")

GREYLIST_FILE = "greylist.sqlite3"  # in the data folder

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# The replies of the limits (RFC 3463 X.7.0 and X.7.1; 421 closes, RFC 5321 3.8).
# RFC 2034 (the core): the greeting, and a refusal in its place, carry no enhanced code.
TOO_MANY_CONNECTIONS = "Too many connections from your address; try again later"
LOGINS_REFUSED = Reply(421, "4.7.0", "Too many failed logins from your address; try again "
                       "later", close=True)
PREGREET = "Protocol error: you talked before my greeting"
PIPELINING = Reply(554, "5.5.1", "Protocol error: commands sent ahead without PIPELINING "
                   "(RFC 2920)", close=True)


@dataclass(frozen=True)
class Settings:
    limits: LimitsConfig
    screen: ScreenConfig
    dnsbl: DNSBLConfig
    greylist: GreylistConfig


class Defense:
    """What every session of this process asks (see the module docstring)."""

    def __init__(self, settings: Settings, counters: Counters, *, hostname: str,
                 domains: Sequence[str], resolver: Resolver | None,
                 greylist: Greylist | None) -> None:
        self.settings = settings
        self.counters = counters
        self.exceptions: tuple[Network, ...] = settings.limits.exceptions
        self.lists = DNSLists(settings.dnsbl.sites, settings.dnsbl.threshold,
                              settings.dnsbl.allowlist_threshold, resolver,
                              settings.dnsbl.timeout)
        self.resolver = resolver
        self.greylist = greylist
        self.hostname = hostname
        self.ours = frozenset(n.lower().rstrip(".") for n in (hostname, *domains))

    def exempt(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.exceptions)

    # -- logins (SMTP AUTH, POP3) ---------------------------------------------

    async def login_refused(self, listener: str, address: str) -> bool:
        """The address has failed too often: no password check, the session ends."""
        if self.exempt(address) or not self.settings.limits.auth_failure_limit:
            return False
        if await self.counters.auth_locked(client_key(address)):
            log.warning("%s: defense: auth_lockout from [%s]: too many failed logins; "
                        "refused unchecked", listener, address)
            return True
        return False

    async def login_failed(self, address: str, user: str) -> float:
        """A wrong password: the delay before the answer (per address and per account)."""
        delay, _locked = await self.counters.auth_failed(client_key(address), user.lower())
        return delay

    def login_succeeded(self, address: str, user: str) -> None:
        self.counters.auth_succeeded(client_key(address), user.lower())

    # -- SMTP -----------------------------------------------------------------

    def screening(self, listener: str, mx: bool, client_ip: str, local_ip: str,
                  ) -> Screening:
        return Screening(self, listener, mx, client_ip, local_ip)


def _log_refusal(listener: str, check: str, address: str, reply: Reply, detail: str = "",
                 ) -> None:
    log.warning("%s: defense: %s from [%s]: %s%s", listener, check, address, reply,
                f"; {detail}" if detail else "")


class Screening:
    """One SMTP session's way through the checks."""

    def __init__(self, defense: Defense, listener: str, mx: bool, client_ip: str,
                 local_ip: str) -> None:
        self.defense = defense
        self.listener = listener
        self.mx = mx
        self.client_ip = client_ip
        self.local_ip = local_ip
        self.exempt = defense.exempt(client_ip)
        self.key = client_key(client_ip)
        self.counted = False
        self._lists: asyncio.Task[Verdict] | None = None
        self._reverse: asyncio.Task[ReverseName] | None = None
        self.verdict = NOT_LISTED
        self.blocked: Reply | None = None

    def _refuse(self, check: str, reply: Reply, detail: str = "") -> Reply:
        _log_refusal(self.listener, check, self.client_ip, reply, detail)
        return reply

    async def connect(self, read: Callable[[float], Awaitable[bytes]]) -> Reply | None:
        """A new connection: the limits, then (MX) the DNS questions begin and the
        greeting waits `greet_wait` for a client that talks first. `read(timeout)`
        reads the client (Stream.read)."""
        defense = self.defense
        if not self.exempt:
            over = await defense.counters.connect(self.key)
            if over:
                name, _, count = over.partition(" ")
                reply = Reply(421, "4.7.0", f"{defense.hostname} {TOO_MANY_CONNECTIONS}",
                              close=True)
                return self._refuse(name, reply, f"count={count}")
            self.counted = True
        # Postfix's postscreen_access_list (permit_mynetworks) and smtpd restrictions
        # that start with permit_mynetworks: no screening for the exceptions.
        self.mx = self.mx and not self.exempt
        if not self.mx:
            return None
        screen = defense.settings.screen
        loop = asyncio.get_running_loop()
        if defense.lists.active:
            self._lists = loop.create_task(defense.lists.check(self.client_ip))
        if screen.reverse_dns != "off" and defense.resolver is not None:
            self._reverse = loop.create_task(reverse_name(defense.resolver, self.client_ip))
        if screen.greet_wait > 0:
            try:
                data = await read(screen.greet_wait)
            except TimeoutError:
                return None
            if not data:
                return Reply(421, "4.4.2", "Connection closed before the greeting", close=True)
            shown = data[:40].decode("ascii", "backslashreplace")
            # RFC 5321 3.1: 554 in place of the 220 (postscreen drops with 521, which
            # RFC 7504 keeps for a host that takes no mail at all).
            reply = Reply(554, "5.5.1", f"{defense.hostname} {PREGREET}", close=True)
            return self._refuse("pregreet", reply, f"sent {len(data)} octets: {shown!r}")
        return None

    def ended(self) -> None:
        if self.counted:
            self.counted = False
            self.defense.counters.disconnect(self.key)
        for task in (self._lists, self._reverse):
            if task is not None and not task.done():
                task.cancel()

    def ahead(self, buffered: int, pipelining: bool) -> Reply | None:
        """A command with more behind it, from a client that may not pipeline."""
        action = self.defense.settings.screen.pipelining
        if not self.mx or pipelining or not buffered or action == "off":
            return None
        if action == "warn":
            log.info("%s: defense: warn: pipelining from [%s]: %d octets sent ahead",
                     self.listener, self.client_ip, buffered)
            return None
        return self._refuse("pipelining", PIPELINING, f"{buffered} octets sent ahead")

    async def hello(self, name: str) -> Reply | None:
        """HELO/EHLO: the DNS lists' verdict, the name, the client's reverse DNS."""
        if not self.mx:
            return None
        if self._lists is not None:
            self.verdict = await self._lists
            self._lists = None
            self._judge_lists()
        if self.blocked is not None:
            return self.blocked
        screen = self.defense.settings.screen
        if screen.helo_syntax != "off" and not valid_helo(name):
            refusal = self._check("helo_syntax", screen.helo_syntax, bad_helo_reply(name))
            if refusal is not None:
                return refusal
        if screen.helo_ours != "off" and claims_to_be_us(name, self.defense.ours,
                                                          self.local_ip, self.client_ip):
            refusal = self._check("helo_ours", screen.helo_ours, ours_helo_reply(name))
            if refusal is not None:
                return refusal
        if self._reverse is not None:
            found = await self._reverse
            self._reverse = None
            if found.name is None:
                return self._check("reverse_dns", screen.reverse_dns,
                                   found.reply(self.client_ip))
        return None

    def _check(self, check: str, action: str, reply: Reply) -> Reply | None:
        if action == "warn":
            log.info("%s: defense: warn: %s from [%s]: %s", self.listener, check,
                     self.client_ip, reply)
            return None
        return self._refuse(check, reply)

    def _judge_lists(self) -> None:
        verdict = self.verdict
        if verdict.blocked:
            zones = ", ".join(verdict.blocking_zones())
            reply = Reply(554, "5.7.1", f"Service unavailable; client [{self.client_ip}] "
                          f"blocked using {zones}")
            self.blocked = self._refuse("dnsbl", reply, verdict.summary())
        elif verdict.listed:
            log.info("%s: dnsbl: [%s] passed: %s%s", self.listener, self.client_ip,
                     verdict.summary(), " (allowlisted)" if verdict.allowed else "")

    async def mail(self, user: str | None) -> Reply | None:
        """MAIL FROM: the DNS lists' verdict again, then the message rates."""
        if self.blocked is not None:
            return self.blocked
        counters = self.defense.counters
        if user is not None:
            over = await counters.rate("user_message_rate", user.lower())
            if over:
                return self._rate_refusal(over, f"Too many messages from {user}")
        if not self.exempt:
            over = await counters.rate("message_rate", self.key)
            if over:
                return self._rate_refusal(over, "Too many messages from your address")
        return None

    async def recipient(self, user: str | None) -> Reply | None:
        """RCPT TO: the recipient rates."""
        counters = self.defense.counters
        if user is not None:
            over = await counters.rate("user_recipient_rate", user.lower())
            if over:
                return self._rate_refusal(over, f"Too many recipients from {user}")
        if not self.exempt:
            over = await counters.rate("recipient_rate", self.key)
            if over:
                return self._rate_refusal(over, "Too many recipients from your address")
        return None

    def _rate_refusal(self, over: str, text: str) -> Reply:
        name, _, count = over.partition(" ")
        return self._refuse(name, Reply(450, "4.7.1", f"{text}; try again later"),
                            f"count={count} in a minute")

    async def greylisted(self, user: str | None, sender: str, recipient: str) -> Reply | None:
        """An accepted recipient on the MX listener: greylisting, unless the client is
        authenticated or allowlisted by the DNS lists."""
        greylist = self.defense.greylist
        if greylist is None or not self.mx or user is not None or self.verdict.allowed:
            return None
        wait = await greylist.check(self.client_ip, sender, recipient)
        if not wait:
            return None
        reply = greylisted_reply(wait)
        log.info("%s: defense: greylist from [%s]: %s; from=<%s> to=<%s>", self.listener,
                 self.client_ip, reply, sender, recipient)
        return reply


def limits_of(limits: LimitsConfig, first_delay: float) -> Limits:
    """The Anvil's numbers from [limits] (and the first login failure delay)."""
    return Limits(
        connection_count=limits.connection_count, connection_rate=limits.connection_rate,
        message_rate=limits.message_rate, recipient_rate=limits.recipient_rate,
        user_message_rate=limits.user_message_rate,
        user_recipient_rate=limits.user_recipient_rate,
        auth_failure_limit=limits.auth_failure_limit, first_delay=first_delay,
    )


def build_defense(config: Config, counters: Counters) -> Defense:
    """This process's Defense: a resolver only when a check needs DNS, the greylist
    only when it is on."""
    settings = Settings(config.limits, config.screen, config.dnsbl, config.greylist)
    resolver = None
    if config.dnsbl.sites or config.screen.reverse_dns != "off":
        try:
            resolver = make_resolver(config.dns.nameservers)
        except dns.exception.DNSException as exc:
            log.warning("no DNS resolver (%s): DNS lists and reverse DNS checks are off", exc)
    greylist = None
    if config.greylist.enabled:
        g = config.greylist
        greylist = Greylist(config.data_dir / GREYLIST_FILE, delay=g.delay,
                            retry_window=g.retry_window, lifetime=g.lifetime,
                            auto_allow_after=g.auto_allow_after)
    return Defense(settings, counters, hostname=config.hostname, domains=config.domains,
                   resolver=resolver, greylist=greylist)
