"""The checks of one incoming message, from MAIL FROM to the end of DATA, and their verdict.

`MailChecks` (one per MX listener) starts a `MessageChecks` per transaction:
SPF (of MAIL FROM, or of the HELO name for a null sender, RFC 7208 2.4) and
iprev start at MAIL FROM and run while the client sends RCPT and DATA; DKIM
and ARC follow the content as it streams (mailauth.dkimverify); at the end of
DATA, DMARC joins them up, the policy decides, and the verdict carries the
Authentication-Results field to put on top of the message. A check that
raises is logged and recorded as temperror: a bug in a check never costs a
message or a session.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import ipaddress
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from postroom import resolver as dns_resolver
from postroom.canonical import canonical_domain
from postroom.mailauth import dmarc, results
from postroom.mailauth.dkimverify import ARCResult, DKIMResult, MessageVerifier
from postroom.mailauth.iprev import IPRevMemo, IPRevResult
from postroom.mailauth.policy import DELIVER, Action, CheckPolicy, decide
from postroom.mailauth.spf import SPFResult, check_host, ip_of

log = logging.getLogger("postroom.mailauth")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Verdict:
    """What the checks found and what to do: the AR field, and the action."""

    header: bytes  # the Authentication-Results field (and a marker), CRLF-terminated
    action: Action
    dmarc: tuple[dmarc.DMARCResult, ...] = ()
    summary: str = ""

    @property
    def dmarc_failed(self) -> bool:
        """The message failed DMARC here (forwarding must not pass it on)."""
        return any(v.failed for v in self.dmarc)


@dataclass
class MailChecks:
    """What every message's checks share: the resolver, our name, the policy."""

    resolver: dns_resolver.Resolver
    authserv_id: str  # this host's name (RFC 8601 2.5)
    policy: CheckPolicy = field(default_factory=CheckPolicy)
    ignore: tuple[Network, ...] = ()  # clients not checked (as OpenDMARC's IgnoreHosts)
    sample: random.Random = field(default_factory=random.Random)  # DMARC pct
    iprev: IPRevMemo = field(init=False)

    def __post_init__(self) -> None:
        self.iprev = IPRevMemo(self.resolver)

    def start(self, client_ip: str, helo: str, sender: str) -> MessageChecks | None:
        """The checks of a new transaction; None for a client that is not checked."""
        try:
            address = ip_of(client_ip)
        except ValueError:
            return None  # not an IP connection (a test's pipe): nothing to check
        if any(address in net for net in self.ignore):
            return None
        return MessageChecks(self, address, helo, sender)


class MessageChecks:
    """One transaction's checks (see the module docstring)."""

    def __init__(self, shared: MailChecks, client: IPAddress, helo: str, sender: str) -> None:
        self.shared = shared
        self.client = client
        self.client_ip = str(client)
        self.helo = helo
        self.sender = sender
        loop = asyncio.get_running_loop()
        self._envelope = loop.create_task(self._envelope_checks())
        self._content = MessageVerifier(shared.resolver)

    async def _envelope_checks(self) -> tuple[SPFResult | None, IPRevResult]:
        # One after the other: answers mostly come from the resolver's cache, and
        # the client is still sending RCPT and DATA meanwhile.
        spf = await self._spf()
        return spf, await self.shared.iprev.check(self.client)

    async def _spf(self) -> SPFResult | None:
        if self.sender:
            domain = self.sender.rpartition("@")[2]
            sender = self.sender
        else:  # RFC 7208 2.4: a null sender is checked as postmaster@HELO
            domain, sender = self.helo, f"postmaster@{self.helo}"
        if not domain or domain.startswith("["):
            return None
        try:
            domain = canonical_domain(domain)
        except ValueError:
            return SPFResult("none", domain, "not a domain name")
        return await check_host(self.shared.resolver, self.client_ip, domain, sender, self.helo)

    def feed(self, data: bytes) -> None:
        """A piece of the message as the client sent it (dot-unstuffed)."""
        self._content.feed(data)

    def cancel(self) -> None:
        """The transaction ended without a message."""
        self._envelope.cancel()
        self._content.cancel()

    async def finish(self, recipient_domains: Sequence[str], queue_id: str = "") -> Verdict:
        """The verdict on the whole message (never raises)."""
        try:
            return await self._finish(recipient_domains)
        except Exception as e:  # a bug in a check must not lose the message
            log.exception("%s: mail checks failed: %s", queue_id, e)
            header = results.authentication_results(
                self.shared.authserv_id, [f"dmarc=temperror {results.comment('internal error')}"])
            return Verdict(header, DELIVER, summary="checks failed (internal error)")

    async def _finish(self, recipient_domains: Sequence[str]) -> Verdict:
        shared = self.shared
        spf, iprev = await self._envelope
        signatures, arc = await self._content.finish()
        from_domains, from_problem = self._from_domains()
        verdicts: list[dmarc.DMARCResult] = []
        for domain in from_domains:
            verdicts.append(await dmarc.evaluate(shared.resolver, domain,
                                                 spf if spf is not None else None, signatures,
                                                 sample=shared.sample))
        action = decide(shared.policy, verdicts, arc, recipient_domains)
        methods = [_iprev_method(iprev), _spf_method(spf, self.sender, self.helo)]
        methods += [_dkim_method(s) for s in signatures] or ["dkim=none"]
        if arc.result != "none":
            methods.append(f"arc={arc.result} {results.comment(arc.reason)}".rstrip())
        methods += [_dmarc_method(v) for v in verdicts]
        if not verdicts:
            methods.append(f"dmarc=permerror {results.comment(from_problem)}".rstrip()
                           if from_problem else "dmarc=none")
        header = results.authentication_results(shared.authserv_id, methods)
        summary = "; ".join(m.split(" (", 1)[0] for m in methods) + f"; action={action.summary}"
        return Verdict(header + action.marker, action, tuple(verdicts), summary)

    def _from_domains(self) -> tuple[list[str], str]:
        """The distinct domains of the From field(s) (RFC 7489 6.6.1), or why none."""
        fields = self._content.fields
        if fields is None:
            return [], "header section unreadable"
        values = tuple(v for n, v in fields if n.lower() == b"from")
        if not values:
            return [], "no From field"
        domains = _from_domains(values)
        if not domains:
            return [], "no usable From domain"
        return list(domains), ""


@functools.lru_cache(maxsize=1024)  # bulk mail repeats its From field
def _from_domains(values: tuple[bytes, ...]) -> tuple[str, ...]:
    """The distinct domains of the addresses in From field values."""
    domains: list[str] = []
    text = [v.decode("utf-8", "replace").replace("\r\n", "") for v in values]
    for _name, address in email.utils.getaddresses(text):
        domain = address.rpartition("@")[2].strip().rstrip(">")
        try:
            domain = canonical_domain(domain)
        except ValueError:
            continue
        if domain not in domains:
            domains.append(domain)
    return tuple(domains)


def _iprev_method(r: IPRevResult) -> str:
    name = f" ({r.name})" if r.name else f" {results.comment(r.reason)}"
    return f"iprev={r.result} policy.iprev={r.ip}{name}"


def _spf_method(r: SPFResult | None, sender: str, helo: str) -> str:
    if r is None:
        return "spf=none " + (f"smtp.mailfrom={results.value(sender)}" if sender
                              else f"smtp.helo={results.value(helo or 'unknown')}")
    prop = (f"smtp.mailfrom={results.value(sender)}" if sender
            else f"smtp.helo={results.value(helo)}")
    return f"spf={r.result} {results.comment(r.reason)} {prop}"


def _dkim_method(r: DKIMResult) -> str:
    parts = [f"dkim={r.result}", results.comment(r.reason)]
    if r.domain:
        parts.append(f"header.d={results.value(r.domain)}")
    if r.selector:
        parts.append(f"header.s={results.value(r.selector)}")
    if r.algorithm:
        parts.append(f"header.a={results.value(r.algorithm)}")
    if r.b:
        parts.append(f"header.b={results.value(r.b)}")
    return " ".join(p for p in parts if p)


def _dmarc_method(v: dmarc.DMARCResult) -> str:
    detail = f"p={v.published} dis={v.policy}" if v.published else v.reason
    return f"dmarc={v.result} {results.comment(detail)} header.from={results.value(v.from_domain)}"


__all__ = ["ARCResult", "MailChecks", "MessageChecks", "Verdict"]
