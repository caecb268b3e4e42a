"""SPF (RFC 7208): check_host() of a sender's domain against the client's IP address.

An asynchronous evaluator of our own rather than pyspf: pyspf asks DNS
synchronously, and the lookups an SPF check makes cannot be fetched ahead of
it (each include, redirect, MX target and macro expansion depends on the
answer before it), so pyspf would have to run in a thread per check, blocked
on DNS. This evaluator awaits every lookup through postroom.resolver (cached,
timed out, never blocking the event loop) and is small: a record is parsed
whole first (a syntax error anywhere is a permerror, RFC 7208 4.6), then its
terms are evaluated in order under the RFC's limits (4.6.4): 10 terms that ask
DNS, 2 void lookups, 10 MX and PTR names, and a bound on the whole check. The
"exp" modifier is parsed but never fetched: postroom does not refuse mail on
SPF alone (DMARC decides), so no explanation is ever shown.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import re
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from postroom import resolver as dns_resolver

MAX_DNS_TERMS = 10  # RFC 7208 4.6.4: include, a, mx, ptr, exists and redirect
MAX_VOID_LOOKUPS = 2  # RFC 7208 4.6.4: answers with no records, or NXDOMAIN
MAX_MX_NAMES = 10  # RFC 7208 4.6.4: MX records looked at by one "mx"
MAX_PTR_NAMES = 10  # RFC 7208 4.6.4: PTR names looked at by "ptr" or %{p}
CHECK_TIME_LIMIT = 20.0  # seconds; RFC 7208 4.6.4: a limit must allow at least 20
MAX_DOMAIN = 253  # RFC 7208 7.3: longer expansions lose labels on the left
MAX_LABEL = 63  # RFC 1035 2.3.4

RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")
QUALIFIERS = {"+": "pass", "-": "fail", "~": "softfail", "?": "neutral"}
MECHANISMS = ("all", "include", "a", "mx", "ptr", "ip4", "ip6", "exists")
DNS_MECHANISMS = ("include", "a", "mx", "ptr", "exists")
_MODIFIER = re.compile(r"([A-Za-z][A-Za-z0-9_.-]*)=(.*)", re.DOTALL)
_MECHANISM = re.compile(r"([+?~-]?)([A-Za-z][A-Za-z0-9_.-]*)(.*)", re.DOTALL)
_MACRO = re.compile(r"%(?:\{([A-Za-z])([0-9]*)(r?)([.+,/_=-]*)\}|(%)|(_)|(-))", re.IGNORECASE)
_TOPLABEL = re.compile(r"\.([A-Za-z0-9]*[A-Za-z][A-Za-z0-9]*|[A-Za-z0-9]+-[A-Za-z0-9-]*"
                       r"[A-Za-z0-9])\.?\Z")
_DUAL_CIDR = re.compile(r"(?:/([0-9]+))?(?://([0-9]+))?\Z")
EXP_ONLY_LETTERS = "crt"  # RFC 7208 7.2: only in explanation text
MACRO_LETTERS = "slodiphvcrt"


@dataclass(frozen=True)
class SPFResult:
    """One check_host() outcome: a result of RESULTS, the domain checked, and why."""

    result: str
    domain: str
    reason: str


class _PermError(Exception):
    """The record cannot be evaluated (RFC 7208 2.6.7)."""


class _TempError(Exception):
    """DNS trouble (RFC 7208 2.6.6)."""


@dataclass(frozen=True)
class _Term:
    qualifier: str  # a result of QUALIFIERS' values
    name: str  # a mechanism of MECHANISMS
    domain: str | None = None  # a domain-spec, macros unexpanded
    cidr4: int = 32
    cidr6: int = 128
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None  # ip4, ip6


@dataclass(frozen=True)
class _Record:
    terms: tuple[_Term, ...]
    redirect: str | None = None


@dataclass
class _Check:
    """What one check_host() evaluation shares across includes and redirects."""

    resolver: dns_resolver.Resolver
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    sender: str  # local@domain (postmaster@ for a null local part)
    helo: str
    dns_terms: int = 0
    voids: int = 0
    validated: list[str] | None = field(default=None)  # %{p}'s names, looked up once

    def count_dns_term(self) -> None:
        self.dns_terms += 1
        if self.dns_terms > MAX_DNS_TERMS:
            raise _PermError(f"more than {MAX_DNS_TERMS} DNS-querying terms (RFC 7208 4.6.4)")

    def count_void(self) -> None:
        self.voids += 1
        if self.voids > MAX_VOID_LOOKUPS:
            raise _PermError(f"more than {MAX_VOID_LOOKUPS} void lookups (RFC 7208 4.6.4)")


@functools.lru_cache(maxsize=4096)
def ip_of(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address record's address, parsed once."""
    return ipaddress.ip_address(text)


def valid_domain(domain: str) -> bool:
    """RFC 7208 4.3: a multi-label name whose labels are 1-63 octets (a final dot aside)."""
    name = domain[:-1] if domain.endswith(".") else domain
    labels = name.split(".")
    return (len(labels) > 1 and len(name) <= MAX_DOMAIN
            and all(0 < len(label) <= MAX_LABEL for label in labels))


async def check_host(resolver: dns_resolver.Resolver, ip: str, domain: str, sender: str,
                     helo: str = "") -> SPFResult:
    """RFC 7208 4: the SPF result for `domain` (the MAIL FROM domain, or the HELO name)
    and client `ip`; `sender` is the MAIL FROM address (postmaster@HELO for <>).
    Never raises for anything DNS or the record holds."""
    address = ip_of(ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # RFC 7208 5: an IPv4 client on an IPv6 socket
    local, _at, sender_domain = sender.rpartition("@")
    check = _Check(resolver, address, f"{local or 'postmaster'}@{sender_domain or domain}", helo)
    if not valid_domain(domain):
        return SPFResult("none", domain, "not a multi-label domain name (RFC 7208 4.3)")
    try:
        async with asyncio.timeout(CHECK_TIME_LIMIT):
            result, reason = await _evaluate(check, domain.rstrip(".").lower())
    except _PermError as e:
        return SPFResult("permerror", domain, str(e))
    except _TempError as e:
        return SPFResult("temperror", domain, str(e))
    except TimeoutError:
        return SPFResult("temperror", domain,
                         f"the check took longer than {CHECK_TIME_LIMIT:.0f} seconds")
    return SPFResult(result, domain, reason)


async def _records(check: _Check, domain: str, rdtype: str) -> list[Any] | None:
    """The records, or None for a void answer (NXDOMAIN or none); _TempError on trouble."""
    try:
        records = await dns_resolver.lookup(check.resolver, domain + ".", rdtype)
    except dns_resolver.NXDOMAIN:
        return None
    except dns_resolver.DNSTrouble as e:
        raise _TempError(str(e)) from None
    return records or None


async def _spf_record(check: _Check, domain: str) -> str | None:
    """RFC 7208 4.5: the one "v=spf1" TXT record of `domain`; None when it has none."""
    try:
        records = await dns_resolver.lookup(check.resolver, domain + ".", "TXT")
    except dns_resolver.NXDOMAIN:
        return None
    except dns_resolver.DNSTrouble as e:
        raise _TempError(str(e)) from None
    found = []
    for rdata in records:
        text = b"".join(rdata.strings).decode("utf-8", "replace")
        if text.lower() == "v=spf1" or text[:7].lower() == "v=spf1 ":
            found.append(text)
    if len(found) > 1:
        raise _PermError(f"{domain} has {len(found)} SPF records (RFC 7208 4.5)")
    return found[0] if found else None


@functools.lru_cache(maxsize=1024)  # the same few records, message after message
def parse_record(text: str) -> _Record:
    """RFC 7208 4.6, 12: the terms of a record; _PermError for any syntax error."""
    terms: list[_Term] = []
    redirect: str | None = None
    exp_seen = False
    for token in text.split(" ")[1:]:
        if not token:
            continue
        mechanism = _MECHANISM.match(token)
        name = mechanism.group(2).lower() if mechanism else ""
        rest = mechanism.group(3) if mechanism else ""
        if mechanism and name in MECHANISMS and (not rest or rest[0] in ":/"):
            terms.append(_parse_mechanism(QUALIFIERS[mechanism.group(1) or "+"], name, rest,
                                          token))
            continue
        modifier = _MODIFIER.fullmatch(token)
        if modifier is None:
            raise _PermError(f"unknown mechanism or bad syntax: {token!r}")
        key, value = modifier.group(1).lower(), modifier.group(2)
        if key == "redirect":
            if redirect is not None:
                raise _PermError("two redirect modifiers (RFC 7208 6)")
            _check_domain_spec(value, token)
            redirect = value
        elif key == "exp":
            if exp_seen:
                raise _PermError("two exp modifiers (RFC 7208 6)")
            exp_seen = True
            _check_domain_spec(value, token)
        else:
            _check_macro_string(value, token, exp=True)  # unknown modifiers: ignored
    return _Record(tuple(terms), redirect)


def _parse_mechanism(qualifier: str, name: str, rest: str, token: str) -> _Term:
    if name == "all":
        if rest:
            raise _PermError(f"bad syntax: {token!r}")
        return _Term(qualifier, name)
    if name in ("ip4", "ip6"):
        if not rest.startswith(":"):
            raise _PermError(f"{name} needs an address: {token!r}")
        address, slash, length = rest[1:].partition("/")
        maximum = 32 if name == "ip4" else 128
        if slash and not length.isdigit():
            raise _PermError(f"bad prefix length: {token!r}")
        prefix = _prefix(length if slash else None, maximum, token, maximum)
        try:
            if name == "ip4":
                network: Any = ipaddress.IPv4Network(f"{address}/{prefix}", strict=False)
            else:
                network = ipaddress.IPv6Network(f"{address}/{prefix}", strict=False)
        except ValueError:
            raise _PermError(f"bad address: {token!r}") from None
        return _Term(qualifier, name, network=network)
    domain: str | None = None
    cidr4, cidr6 = 32, 128
    if name in ("a", "mx"):
        body, cidr = rest, _DUAL_CIDR.search(rest)
        if cidr is not None and cidr.group(0):
            body = rest[: cidr.start()]
            cidr4 = _prefix(cidr.group(1), 32, token, 32)
            cidr6 = _prefix(cidr.group(2), 128, token, 128)
        rest = body
    elif "/" in rest and name != "ptr" and not rest.startswith(":"):
        raise _PermError(f"bad syntax: {token!r}")
    if rest:
        if not rest.startswith(":") or len(rest) == 1:
            raise _PermError(f"bad syntax: {token!r}")
        domain = rest[1:]
        _check_domain_spec(domain, token)
    elif name in ("include", "exists"):
        raise _PermError(f"{name} needs a domain: {token!r}")
    return _Term(qualifier, name, domain, cidr4, cidr6)


def _prefix(text: str | None, maximum: int, token: str, default: int) -> int:
    if text is None:
        return default
    if (text.startswith("0") and text != "0") or int(text) > maximum:
        raise _PermError(f"bad prefix length: {token!r}")
    return int(text)


def _check_macro_string(value: str, token: str, *, exp: bool) -> None:
    """RFC 7208 7.1: every "%" starts a macro; "crt" only in explanation text."""
    pos = 0
    while (percent := value.find("%", pos)) >= 0:
        macro = _MACRO.match(value, percent)
        if macro is None:
            raise _PermError(f"bad macro in {token!r}")
        letter = macro.group(1)
        if letter is not None:
            if letter.lower() not in MACRO_LETTERS or (
                    not exp and letter.lower() in EXP_ONLY_LETTERS):
                raise _PermError(f"macro letter {letter!r} not allowed here: {token!r}")
            if macro.group(2) and int(macro.group(2)) == 0:
                raise _PermError(f"macro keeps zero labels: {token!r}")
        pos = macro.end()
    if any(not 0x21 <= ord(c) <= 0x7E for c in value):
        raise _PermError(f"bad character in {token!r}")


def _check_domain_spec(value: str, token: str) -> None:
    """RFC 7208 7.1: a macro-string ending in a top label (or in a macro)."""
    if not value:
        raise _PermError(f"empty domain in {token!r}")
    _check_macro_string(value, token, exp=False)
    if value.endswith("}") or re.search(r"%[%_-]\Z", value):
        return
    if not _TOPLABEL.search(value):
        raise _PermError(f"not a domain name: {token!r}")


async def _evaluate(check: _Check, domain: str) -> tuple[str, str]:
    """check_host() of one domain (includes and redirect recurse here)."""
    text = await _spf_record(check, domain)
    if text is None:
        return "none", f"{domain} has no SPF record"
    record = parse_record(text)
    for term in record.terms:
        if await _matches(check, term, domain):
            return term.qualifier, f"{domain}: matched {_show(term)}"
    if record.redirect is not None:
        check.count_dns_term()
        target = await _expand_domain(check, record.redirect, domain)
        result, reason = await _evaluate(check, target)
        if result == "none":
            raise _PermError(f"redirect to {target}, which has no SPF record (RFC 7208 6.1)")
        return result, reason
    return "neutral", f"{domain}: no mechanism matched"


@functools.lru_cache(maxsize=1024)  # terms come from parse_record's cache
def _show(term: _Term) -> str:
    if term.network is not None:
        return f"{term.name}:{term.network}"
    return term.name + (f":{term.domain}" if term.domain else "")


async def _matches(check: _Check, term: _Term, domain: str) -> bool:
    name = term.name
    if name == "all":
        return True
    if name in ("ip4", "ip6"):
        assert term.network is not None
        return check.ip.version == term.network.version and check.ip in term.network
    check.count_dns_term()
    target = await _expand_domain(check, term.domain, domain) if term.domain else domain
    if name == "include":
        result, _reason = await _evaluate(check, target)
        if result == "none":
            raise _PermError(f"include:{target}, which has no SPF record (RFC 7208 5.2)")
        if result in ("temperror", "permerror"):  # pragma: no cover - raised, not returned
            raise _PermError(result)
        return result == "pass"
    if name == "exists":
        found = await _records(check, target, "A")  # RFC 7208 5.7: A, whatever the client
        if found is None:
            check.count_void()
        return found is not None
    if name == "a":
        return await _address_matches(check, target, term, count_void=True)
    if name == "mx":
        exchanges = await _records(check, target, "MX")
        if exchanges is None:
            check.count_void()
            return False
        if len(exchanges) > MAX_MX_NAMES:
            raise _PermError(f"{target} has more than {MAX_MX_NAMES} MX records "
                             "(RFC 7208 4.6.4)")
        for mx in exchanges:
            host = mx.exchange.to_text(omit_final_dot=True)
            if host and host != "." and await _address_matches(check, host, term):
                return True
        return False
    # ptr (RFC 7208 5.5): DNS errors here only mean no match
    names = await _validated_names(check)
    target = target.lower()
    return any(n == target or n.endswith("." + target) for n in names)


async def _address_matches(check: _Check, host: str, term: _Term, *,
                           count_void: bool = False) -> bool:
    rdtype = "A" if check.ip.version == 4 else "AAAA"
    found = await _records(check, host, rdtype)
    if found is None:
        if count_void:
            check.count_void()
        return False
    prefix = term.cidr4 if check.ip.version == 4 else term.cidr6
    network = ipaddress.ip_network(f"{check.ip}/{prefix}", strict=False)
    return any(ip_of(r.address) in network for r in found)


async def _validated_names(check: _Check) -> list[str]:
    """RFC 7208 5.5: the client's PTR names whose A/AAAA records include its IP."""
    if check.validated is not None:
        return check.validated
    check.validated = []
    reverse = _reverse_name(check.ip)
    try:
        ptrs = await dns_resolver.lookup(check.resolver, reverse, "PTR")
    except (dns_resolver.NXDOMAIN, dns_resolver.DNSTrouble):
        return check.validated
    rdtype = "A" if check.ip.version == 4 else "AAAA"
    for ptr in ptrs[:MAX_PTR_NAMES]:
        name = ptr.target.to_text(omit_final_dot=True).lower()
        try:
            addresses = await dns_resolver.lookup(check.resolver, name + ".", rdtype)
        except (dns_resolver.NXDOMAIN, dns_resolver.DNSTrouble):
            continue
        if any(ip_of(r.address) == check.ip for r in addresses):
            check.validated.append(name)
    return check.validated


def _reverse_name(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    return ip.reverse_pointer + "."


async def _expand_domain(check: _Check, spec: str, domain: str) -> str:
    """RFC 7208 7.3: a domain-spec with its macros expanded, cut to 253 octets."""
    expanded = await expand(check, spec, domain)
    expanded = expanded.rstrip(".")
    while len(expanded) > MAX_DOMAIN and "." in expanded:
        expanded = expanded.split(".", 1)[1]
    if not valid_domain(expanded):
        raise _PermError(f"{spec!r} expands to {expanded!r}, not a domain name")
    return expanded


async def expand(check: _Check, spec: str, domain: str) -> str:
    """RFC 7208 7: the macro-string `spec` expanded for the current `domain`."""
    out: list[str] = []
    pos = 0
    for macro in _MACRO.finditer(spec):
        out.append(spec[pos : macro.start()])
        pos = macro.end()
        if macro.group(5):
            out.append("%")
        elif macro.group(6):
            out.append(" ")
        elif macro.group(7):
            out.append("%20")
        else:
            letter = macro.group(1)
            value = await _macro_value(check, letter.lower(), domain)
            parts = re.split("[" + re.escape(macro.group(4) or ".") + "]", value)
            if macro.group(3):
                parts.reverse()
            if macro.group(2):
                parts = parts[-int(macro.group(2)):]
            text = ".".join(parts)
            if letter.isupper():
                text = urllib.parse.quote(text, safe="-._~")  # RFC 7208 7.3: URL escaping
            out.append(text)
    out.append(spec[pos:])
    return "".join(out)


async def _macro_value(check: _Check, letter: str, domain: str) -> str:
    ip = check.ip
    local, _at, sender_domain = check.sender.rpartition("@")
    if letter == "s":
        return check.sender
    if letter == "l":
        return local
    if letter == "o":
        return sender_domain
    if letter == "d":
        return domain
    if letter == "i":
        if ip.version == 4:
            return str(ip)
        return ".".join(ip.exploded.replace(":", ""))  # RFC 7208 7.3: dotted nibbles
    if letter == "v":
        return "in-addr" if ip.version == 4 else "ip6"
    if letter == "h":
        return check.helo or "unknown"
    if letter == "p":
        names = await _validated_names(check)
        for wanted in (lambda n: n == domain, lambda n: n.endswith("." + domain),
                       lambda n: True):
            chosen = [n for n in names if wanted(n)]
            if chosen:
                return chosen[0]
        return "unknown"
    if letter == "t":  # pragma: no cover - explanation text only, never expanded
        return str(int(time.time()))
    raise _PermError(f"macro %{{{letter}}} not allowed here")  # pragma: no cover
