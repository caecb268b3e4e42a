"""DMARC (RFC 7489): the From domain's policy, and whether SPF or DKIM aligned with it.

Policy discovery (6.6.3) asks _dmarc.FROM-DOMAIN, then _dmarc.ORG-DOMAIN; the
organizational domain (3.2) comes from the Public Suffix List as the
publicsuffixlist package ships it, never fetched at run time (a stale list
errs on few, rarely used suffixes; a fetch would make every check depend on a
web server). The verdict is "pass" when an SPF pass or a DKIM pass is aligned
(3.1, relaxed or strict as adkim/aspf say), else "fail" with the policy to
apply: p, or sp for a subdomain whose record was found at the organizational
domain, sampled by pct (6.6.4: mail outside the sample gets the next policy
down). "none": no usable record. "temperror": the record could not be fetched.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

from publicsuffixlist import PublicSuffixList

from postroom import resolver as dns_resolver
from postroom.mailauth.dkimverify import DKIMResult
from postroom.mailauth.spf import SPFResult

POLICIES = ("none", "quarantine", "reject")
NEXT_DOWN = {"reject": "quarantine", "quarantine": "none", "none": "none"}  # RFC 7489 6.6.4


@dataclass(frozen=True)
class Record:
    """A DMARC record's tags that decide a verdict (RFC 7489 6.3)."""

    p: str
    sp: str
    pct: int = 100
    adkim: str = "r"
    aspf: str = "r"


@dataclass(frozen=True)
class DMARCResult:
    """The verdict for one From domain."""

    result: str  # pass, fail, none, temperror, permerror
    from_domain: str
    policy: str = "none"  # what to do with it: none, quarantine, reject (after sp and pct)
    published: str = ""  # the p= (or sp=) that applied, for the AR comment
    reason: str = ""
    # A DNS failure in SPF or DKIM may have hidden an aligned pass.
    uncertain: bool = False

    @property
    def failed(self) -> bool:
        return self.result == "fail"


@functools.cache
def _suffixes() -> PublicSuffixList:
    return PublicSuffixList()  # the packaged copy; no network access


@functools.lru_cache(maxsize=4096)
def organizational_domain(domain: str) -> str:
    """RFC 7489 3.2: the registered domain (a public suffix stands for itself)."""
    domain = domain.rstrip(".").lower()
    return _suffixes().privatesuffix(domain) or domain


def aligned(domain: str, from_domain: str, mode: str) -> bool:
    """RFC 7489 3.1.1, 3.1.2: strict, the same name; relaxed, the same organization."""
    a, b = domain.rstrip(".").lower(), from_domain.rstrip(".").lower()
    if mode == "s":
        return a == b
    return a == b or organizational_domain(a) == organizational_domain(b)


@functools.lru_cache(maxsize=1024)
def parse_record(text: str) -> Record | None:
    """RFC 7489 6.3: the record, or None when it is not one. A missing or unknown p=
    counts as "none" when rua= is there (6.6.3 step 6); unknown tags are ignored."""
    tags: dict[str, str] = {}
    for i, part in enumerate(text.split(";")):
        name, eq, value = part.partition("=")
        name, value = name.strip(), value.strip()
        if i == 0:
            if name != "v" or value != "DMARC1":
                return None
            continue
        if eq and name:
            tags.setdefault(name.lower(), value)
    p = tags.get("p", "").lower()
    if p not in POLICIES:
        if "rua" not in tags:
            return None
        p = "none"
    sp = tags.get("sp", "").lower()
    if sp not in POLICIES:
        sp = p
    try:
        pct = int(tags.get("pct", "100"))
    except ValueError:
        pct = 100
    pct = min(100, max(0, pct))
    adkim = "s" if tags.get("adkim", "r").lower() == "s" else "r"
    aspf = "s" if tags.get("aspf", "r").lower() == "s" else "r"
    return Record(p, sp, pct, adkim, aspf)


async def _lookup(resolver: dns_resolver.Resolver, domain: str) -> Record | None:
    """The one DMARC record at _dmarc.`domain`; None for none or several (6.6.3)."""
    try:
        answers = await dns_resolver.lookup(resolver, f"_dmarc.{domain}.", "TXT")
    except dns_resolver.NXDOMAIN:
        return None
    records = []
    for rdata in answers:
        text = b"".join(rdata.strings).decode("utf-8", "replace")
        if text.startswith("v=DMARC1"):
            records.append(parse_record(text))
    if len(records) != 1:
        return None
    return records[0]


async def discover(resolver: dns_resolver.Resolver, from_domain: str,
                   ) -> tuple[Record | None, bool]:
    """RFC 7489 6.6.3: the record for `from_domain` and whether it came from the
    organizational domain (so sp= applies). DNSTrouble when a lookup failed."""
    record = await _lookup(resolver, from_domain)
    if record is not None:
        return record, False
    org = organizational_domain(from_domain)
    if org != from_domain:
        record = await _lookup(resolver, org)
        if record is not None:
            return record, True
    return None, False


async def evaluate(resolver: dns_resolver.Resolver, from_domain: str, spf: SPFResult | None,
                   dkim: list[DKIMResult], *, sample: random.Random | None = None,
                   ) -> DMARCResult:
    """The DMARC verdict for mail whose From domain is `from_domain`."""
    try:
        record, inherited = await discover(resolver, from_domain)
    except dns_resolver.DNSTrouble as e:
        return DMARCResult("temperror", from_domain, reason=f"policy lookup failed: {e}",
                           uncertain=True)
    if record is None:
        return DMARCResult("none", from_domain, reason="no DMARC record")
    published = record.sp if inherited else record.p
    passes = []
    if spf is not None and spf.result == "pass" and aligned(spf.domain, from_domain,
                                                            record.aspf):
        passes.append(f"spf aligned ({spf.domain})")
    for sig in dkim:
        if sig.result == "pass" and aligned(sig.domain, from_domain, record.adkim):
            passes.append(f"dkim aligned ({sig.domain})")
    if passes:
        return DMARCResult("pass", from_domain, "none", published, ", ".join(passes))
    uncertain = (spf is not None and spf.result == "temperror") or any(
        s.result == "temperror" for s in dkim)
    policy = published
    sampled_out = record.pct < 100 and (sample or random).random() * 100 >= record.pct
    if sampled_out:
        policy = NEXT_DOWN[published]
    reason = "neither SPF nor DKIM aligned with the From domain"
    if sampled_out:
        reason += f" (outside pct={record.pct}: {policy} instead of {published})"
    return DMARCResult("fail", from_domain, policy, published, reason, uncertain)
