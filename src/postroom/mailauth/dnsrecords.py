"""The DNS records a mail domain needs here, as a zone-file snippet, and a check of what DNS says.

`needed()` lists them (MX, the host's address, SPF, each DKIM selector, DMARC,
and the optional TLS-RPT and MTA-STS); `check()` asks the configured resolver
for each and says, one `Finding` per record, whether it is right, missing or
wrong, and what to publish instead.
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from postroom.mailauth.keys import DKIMKey
from postroom.resolver import NXDOMAIN, DNSTrouble, Resolver, lookup

TXT_STRING = 255  # RFC 1035 3.3.14: one character-string holds at most 255 octets
MX_PREFERENCE = 10
# A safe start (RFC 7489 6.3, 10.2): no mail is refused or junked for a fault in
# the set-up, and aggregate reports show what passes before tightening.
DMARC_START = "v=DMARC1; p=none; adkim=r; aspf=r; rua=mailto:{rua}"
TLSRPT = "v=TLSRPTv1; rua=mailto:{rua}"  # RFC 8460 3

ANY_ADDRESS = "<address>"  # placeholder: the host's address is not known here

Status = Literal["ok", "missing", "wrong", "unknown", "optional"]


@dataclass(frozen=True)
class Record:
    """One record to publish."""

    name: str  # owner name, without the final dot
    rtype: str
    value: str  # presentation form of the data: TXT text unquoted and unsplit
    comment: str = ""
    optional: bool = False  # the domain is ready without it
    disabled: bool = False  # printed commented out: needs something postroom does not serve

    def zone_line(self) -> str:
        if self.value == ANY_ADDRESS:
            return f"; {self.name}.\tIN\tA\t{ANY_ADDRESS} (or AAAA)"
        data = _txt_strings(self.value) if self.rtype == "TXT" else self.value
        line = f"{self.name}.\tIN\t{self.rtype}\t{data}"
        return f"; {line}" if self.disabled else line


@dataclass(frozen=True)
class Finding:
    """What DNS holds for one record, compared with what it should."""

    status: Status
    record: Record
    found: str = ""  # what DNS answered, or why it could not be asked

    def line(self) -> str:
        what = f"{self.record.rtype} {self.record.name}"
        if self.status == "ok":
            return f"ok       {what}: {self.found}"
        if self.status == "optional":
            return f"optional {what}: not published ({self.record.comment}); " \
                   f"to use it publish: {self.record.zone_line()}"
        if self.status == "missing":
            return f"MISSING  {what}: publish: {self.record.zone_line()}"
        if self.status == "unknown":
            return f"UNKNOWN  {what}: {self.found}; try again later"
        return f"WRONG    {what}: found {self.found}; publish instead: " \
               f"{self.record.zone_line()}"


def _txt_strings(text: str) -> str:
    """TXT data as quoted 255-octet strings (a DKIM key is longer than one)."""
    data = text.encode()
    parts = [data[i : i + TXT_STRING].decode() for i in range(0, len(data), TXT_STRING)] or [""]
    quoted = " ".join('"' + p.replace("\\", "\\\\").replace('"', '\\"') + '"' for p in parts)
    return f"( {quoted} )" if len(parts) > 1 else quoted


def public_addresses(hosts: Sequence[str]) -> list[str]:
    """The concrete addresses among listener hosts (a wildcard names no address)."""
    out = []
    for host in hosts:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            continue
        if not ip.is_unspecified and str(ip) not in out:
            out.append(str(ip))
    return out


def spf_value(addresses: Sequence[str]) -> str:
    """"mx" authorizes the hosts the MX names (RFC 7208 5.4); the addresses are named
    too, so a change of MX cannot silently unauthorize this host; -all refuses the rest."""
    terms = ["v=spf1", "mx"]
    for address in addresses:
        terms.append(("ip6:" if ":" in address else "ip4:") + address)
    return " ".join([*terms, "-all"])


def needed(domain: str, hostname: str, addresses: Sequence[str], keys: Sequence[DKIMKey],
           postmaster: str) -> list[Record]:
    """Every record `domain` needs for mail through this host (`hostname`)."""
    records = [Record(domain, "MX", f"{MX_PREFERENCE} {hostname}.",
                      "mail for the domain comes to this host")]
    for address in addresses:
        records.append(Record(hostname, "AAAA" if ":" in address else "A", address,
                              "this host's address (the MX target)"))
    if not addresses:  # a wildcard listener: any address will do, and SPF's "mx" covers it
        records.append(Record(hostname, "A", ANY_ADDRESS,
                              "this host's public address (the MX target); name it with "
                              "--address to have it checked and put in SPF"))
    records.append(Record(domain, "TXT", spf_value(addresses),
                          "SPF (RFC 7208): the hosts that send the domain's mail"))
    for key in keys:
        if key.retired:
            continue
        records.append(Record(key.record_name, "TXT", key.txt(),
                              f"DKIM (RFC 6376) key {key.selector}, {key.algorithm}"))
    records.append(Record(
        f"_dmarc.{domain}", "TXT", DMARC_START.format(rua=postmaster),
        "DMARC (RFC 7489): a safe start; once the reports show all your mail passing, "
        "tighten p=none to p=quarantine, then p=reject"))
    records.append(Record(f"_smtp._tls.{domain}", "TXT", TLSRPT.format(rua=postmaster),
                          "TLS-RPT (RFC 8460): reports of TLS failures", optional=True))
    records.append(Record(f"_mta-sts.{domain}", "TXT", "v=STSv1; id=1",
                          "MTA-STS (RFC 8461): needs a policy served at "
                          f"https://mta-sts.{domain}/.well-known/mta-sts.txt, which postroom "
                          "does not serve yet", optional=True, disabled=True))
    return records


def zone_snippet(domain: str, records: Sequence[Record], retired: Sequence[DKIMKey] = ()
                 ) -> str:
    lines = [f"; DNS records for mail to and from {domain} (zone-file form)"]
    for record in records:
        note = "optional: " if record.optional else ""
        lines += ["", f"; {note}{record.comment}", record.zone_line()]
    for key in retired:
        lines += ["", f"; DKIM key {key.selector} is retired: leave its record published for "
                      "a few days so mail signed with it still verifies, then remove it"]
    return "\n".join(lines) + "\n"


def _txt_text(rdata: object) -> str:
    strings = getattr(rdata, "strings", ())
    return b"".join(strings).decode("utf-8", "replace")


def _tags(text: str) -> dict[str, str]:
    """tag=value; pairs (RFC 6376 3.2), whitespace removed from values."""
    tags = {}
    for part in text.split(";"):
        name, eq, value = part.partition("=")
        if eq:
            tags[name.strip().lower()] = "".join(value.split())
    return tags


async def _texts(resolver: Resolver, name: str) -> list[str] | None:
    """The TXT texts at `name`; None when the name does not exist."""
    try:
        return [_txt_text(r) for r in await lookup(resolver, name, "TXT")]
    except NXDOMAIN:
        return None


async def check_one(resolver: Resolver, record: Record, addresses: Sequence[str]) -> Finding:
    try:
        return await _check(resolver, record, addresses)
    except DNSTrouble as e:
        return Finding("unknown", record, str(e))


async def _check(resolver: Resolver, record: Record, addresses: Sequence[str]) -> Finding:
    name, rtype = record.name, record.rtype
    if rtype == "MX":
        try:
            mxs = await lookup(resolver, name, "MX")
        except NXDOMAIN:
            mxs = []
        if not mxs:
            return Finding("missing", record)
        want = record.value.split()[1].rstrip(".").lower()
        names = [str(mx.exchange).rstrip(".").lower() for mx in mxs]
        shown = ", ".join(f"{mx.preference} {mx.exchange}" for mx in mxs)
        return Finding("ok" if want in names else "wrong", record, shown)
    if rtype in ("A", "AAAA"):
        try:
            found = [str(r) for r in await lookup(resolver, name, rtype)]
        except NXDOMAIN:
            found = []
        if record.value == ANY_ADDRESS:
            with contextlib.suppress(NXDOMAIN):
                found += [str(r) for r in await lookup(resolver, name, "AAAA")]
            return Finding("ok" if found else "missing", record, ", ".join(found))
        if not found:
            return Finding("missing", record)
        ok = ipaddress.ip_address(record.value) in {ipaddress.ip_address(a) for a in found}
        return Finding("ok" if ok else "wrong", record, ", ".join(found))
    texts = await _texts(resolver, name)
    if name.startswith("_dmarc."):
        return _one_kind(record, texts, "v=dmarc1", _dmarc_ok)
    if name.startswith("_smtp._tls."):
        return _one_kind(record, texts, "v=tlsrptv1", lambda t: (True, t))
    if name.startswith("_mta-sts."):
        return _one_kind(record, texts, "v=stsv1", lambda t: (True, t))
    if "._domainkey." in name:
        return _dkim(record, texts)
    return _one_kind(record, texts, "v=spf1", lambda t: _spf_ok(t, addresses))


def _one_kind(record: Record, texts: list[str] | None, prefix: str,
              judge: object) -> Finding:
    """The record that starts with `prefix` (one only: RFC 7208 4.5, RFC 7489 6.6.3)."""
    mine = [t for t in texts or [] if t.lower().replace(" ", "").startswith(prefix)]
    if not mine:
        return Finding("optional" if record.optional else "missing", record)
    if len(mine) > 1:
        return Finding("wrong", record, f"{len(mine)} records where one is allowed: "
                                        + " | ".join(mine))
    ok, text = judge(mine[0])  # type: ignore[operator]
    return Finding("ok" if ok else "wrong", record, text)


def _dmarc_ok(text: str) -> tuple[bool, str]:
    policy = _tags(text).get("p")
    if policy not in ("none", "quarantine", "reject"):
        return False, f"{text} (p= must be none, quarantine or reject)"
    return True, text


def _spf_ok(text: str, addresses: Sequence[str]) -> tuple[bool, str]:
    """Does the record authorize this host? By the terms we suggest ("mx", "a", our
    ip4:/ip6:); a record built otherwise (include:, redirect=) is reported as it
    is, since judging it needs an SPF evaluation."""
    terms = text.lower().split()[1:]
    if any(t in ("+all", "all") for t in terms):
        return False, f"{text} (allows every host to send as the domain)"
    if any(t.lstrip("+") in ("mx", "a") for t in terms):
        return True, text
    ours = {ipaddress.ip_address(a) for a in addresses}
    for term in terms:
        kind, _, value = term.lstrip("+").partition(":")
        if kind in ("ip4", "ip6") and value:
            try:
                net = ipaddress.ip_network(value, strict=False)
            except ValueError:
                continue
            if any(a in net for a in ours if a.version == net.version):
                return True, text
    if any(t.lstrip("+").startswith(("include:", "redirect=")) for t in terms):
        return True, f"{text} (through include or redirect: check it authorizes this host)"
    return False, f"{text} (does not authorize this host)"


def _dkim(record: Record, texts: list[str] | None) -> Finding:
    if not texts:
        return Finding("missing", record)
    want = _tags(record.value)
    found = [_tags(t) for t in texts]
    for tags in found:
        if tags.get("p") == want["p"] and tags.get("k", "rsa") == want["k"]:
            return Finding("ok", record, f"key {want['k']} matches")
    return Finding("wrong", record, " | ".join(texts)[:120] + "... (another key)")


async def check(resolver: Resolver, records: Sequence[Record], addresses: Sequence[str]
                ) -> list[Finding]:
    """One finding per record (the commented-out ones are not asked)."""
    return [await check_one(resolver, r, addresses) for r in records if not r.disabled]


def ready(findings: Sequence[Finding]) -> bool:
    """The domain can send and receive: every record that is not optional is right."""
    return all(f.status == "ok" for f in findings if not f.record.optional)
