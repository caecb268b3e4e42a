"""DKIM verification (RFC 6376) of every signature, and ARC chain validation (RFC 8617).

A message is never held whole for this: `BodyHashes` canonicalizes the body
and hashes it as it streams to disk (RFC 6376 3.4.3, 3.4.4; one hash per
distinct canonicalization, algorithm and l= among the signatures, which are
known once the header section is in), and dkimpy is given the header section
alone, with its body-hash step answered from those hashes. The public keys are
fetched first, concurrently, through postroom.resolver (never blocking the
event loop); dkimpy then reads them from that table (its `dnsfunc`) and only
does what it does well: header canonicalization and the signature check.

Results (RFC 8601 2.7.1): "pass"; "fail" when the signature or the body hash
does not match (the message was changed); "temperror" when the key could not
be fetched; "permerror" for everything that cannot verify whatever happens
later: a malformed signature, no key or a revoked one (empty p=), a key that is
not base64 or too small, an expired signature (x=), an l= longer than the body.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import dkim
from dkim.util import InvalidTagValueList, parse_tag_value

from postroom import resolver as dns_resolver

log = logging.getLogger("postroom.mailauth")

# Signatures verified on one message, the topmost first; the rest are "policy"
# (RFC 8601 2.7.1). OpenDKIM's MaximumSignaturesToVerify defaults to 3; a list,
# an ESP and the author may each have signed, so a few more are worth the cost.
MAX_SIGNATURES = 5
MIN_RSA_BITS = 1024  # RFC 8301 3.2: keys under 1024 bits MUST NOT be accepted
HASHES = {b"rsa-sha256": "sha256", b"rsa-sha1": "sha1", b"ed25519-sha256": "sha256"}
DKIM_HEADER = b"dkim-signature"
AMS_HEADER = b"arc-message-signature"
ARC_HEADERS = (b"arc-seal", AMS_HEADER, b"arc-authentication-results")

BodyKey = tuple[bool, str, int | None]  # (relaxed, hash name, l= or None)


@dataclass(frozen=True)
class DKIMResult:
    """One signature's verdict (RFC 8601 2.7.1) and what AR reports of it."""

    result: str  # pass, fail, policy, temperror, permerror
    domain: str  # d=, lower-case ("" when unreadable)
    selector: str
    identity: str  # i= ("" when absent)
    b: str  # the start of b=, to tell signatures apart (RFC 6008)
    algorithm: str
    reason: str


@dataclass(frozen=True)
class ARCResult:
    """The chain's verdict: pass, fail or none (RFC 8617 4.4)."""

    result: str
    reason: str
    instances: int = 0
    # The sealers (d= of each ARC-Seal, oldest first) when the chain validates.
    sealers: tuple[str, ...] = ()


# A line longer than this is hashed as it comes, not held whole (RFC 5321 4.5.3.1.6
# allows 1000 octets, but nothing stops a client sending a 50 MB one).
MAX_PARTIAL_LINE = 64 * 1024
_WSP = re.compile(rb"[ \t]+")  # linear: each run is matched once, never backtracked


class _Canon:
    """One body canonicalization (RFC 6376 3.4.3 simple, 3.4.4 relaxed), streamed: whole
    lines pass at once, trailing empty lines are held back until a line follows, and
    a very long line is passed on in pieces (`midline`)."""

    __slots__ = ("relaxed", "partial", "blank", "emitted", "midline")

    def __init__(self, relaxed: bool) -> None:
        self.relaxed = relaxed
        self.partial = bytearray()  # grown in place: no copy per piece of a long line
        self.blank = 0  # empty lines held back (dropped if nothing follows)
        self.emitted = False
        self.midline = False  # part of the current line, not empty, is passed on

    def feed(self, data: bytes) -> bytes:
        end = data.rfind(b"\n")
        if end < 0:
            self.partial += data
            return self._drain() if len(self.partial) > MAX_PARTIAL_LINE else b""
        block = bytes(self.partial) + data[: end + 1]
        self.partial = bytearray(data[end + 1 :])
        head = b""
        if self.midline:  # the first line ends a line already begun: never empty
            cut = block.find(b"\n") + 1
            head, block = self._relax(block[:cut]), block[cut:]
            self.midline = False
        block = self._relax(block)
        i = len(block)
        while i >= 2 and block[i - 2 : i] == b"\r\n":
            i -= 2
        trailing = (len(block) - i) // 2
        if i == 0:
            self.blank += trailing
            return head
        out = head + b"\r\n" * self.blank + block[:i] + b"\r\n"
        self.blank = trailing - 1
        self.emitted = True
        return out

    def _relax(self, block: bytes) -> bytes:
        """RFC 6376 3.4.4: WSP runs to one SP, none at a line's end (in linear time: a
        look-ahead after a WSP run would backtrack through every long run)."""
        if not self.relaxed:
            return block
        return _WSP.sub(b" ", block).replace(b" \r\n", b"\r\n")

    def _drain(self) -> bytes:
        """Pass on the start of a long line, keeping what its end may still change."""
        data = bytes(self.partial)
        cr = data.endswith(b"\r")  # may be the start of the line's CRLF
        cut = len(data) - cr
        if self.relaxed:  # a WSP run at the end may be the line's trailing WSP
            cut = len(data[:cut].rstrip(b" \t"))
        piece, keep = data[:cut], data[cut:]
        if self.relaxed:
            piece = _WSP.sub(b" ", piece)
            keep = (b" " if keep.strip(b"\r") else b"") + (b"\r" if cr else b"")
        self.partial = bytearray(keep)
        if not piece:
            return b""
        out = b"\r\n" * self.blank + piece
        self.blank = 0
        self.emitted = self.midline = True
        return out

    def end(self) -> bytes:
        out = self.feed(b"\r\n") if self.partial or self.midline else b""
        if not out and not self.emitted and not self.relaxed:
            return b"\r\n"  # RFC 6376 3.4.3: an empty body is one CRLF
        return out


class BodyHashes:
    """The body hashes the signatures of one message need, fed as the body streams."""

    def __init__(self, keys: Iterable[BodyKey]) -> None:
        self._canons = {relaxed: _Canon(relaxed) for relaxed, _h, _l in keys}
        self._hashes: dict[BodyKey, Any] = {key: hashlib.new(key[1]) for key in keys}
        self._left: dict[BodyKey, int | None] = {key: key[2] for key in self._hashes}
        self._length = dict.fromkeys(self._canons, 0)  # canonical octets so far
        self._done: dict[BodyKey, bytes] = {}

    def feed(self, data: bytes) -> None:
        for relaxed, canon in self._canons.items():
            self._hash(relaxed, canon.feed(data))

    def _hash(self, relaxed: bool, piece: bytes) -> None:
        if not piece:
            return
        self._length[relaxed] += len(piece)
        for key, h in self._hashes.items():
            if key[0] != relaxed:
                continue
            left = self._left[key]
            if left is None:
                h.update(piece)
            elif left > 0:
                h.update(piece[:left])
                self._left[key] = max(0, left - len(piece))

    def end(self) -> None:
        for relaxed, canon in self._canons.items():
            self._hash(relaxed, canon.end())
        for key, h in self._hashes.items():
            self._done[key] = h.digest()

    def digest(self, key: BodyKey) -> bytes | None:
        """The hash, or None when l= asks for more than the canonical body has."""
        if key[2] is not None and key[2] > self._length[key[0]]:
            return None
        return self._done[key]


def body_key(tags: dict[bytes, bytes]) -> BodyKey | None:
    """What body hash a signature's tags ask for; None when they are unusable."""
    hash_name = HASHES.get(tags.get(b"a", b"").strip().lower())
    if hash_name is None:
        return None
    c = tags.get(b"c", b"simple/simple").strip().lower()
    body = c.partition(b"/")[2] or b"simple"
    if body not in (b"simple", b"relaxed"):
        return None
    length: int | None = None
    if b"l" in tags:
        try:
            length = int(tags[b"l"])
        except ValueError:
            return None
        if length < 0:
            return None
    return (body == b"relaxed", hash_name, length)


def signature_tags(value: bytes) -> dict[bytes, bytes] | None:
    """A DKIM-Signature or ARC header's tags (unfolded); None when it is no tag list."""
    try:
        tags = parse_tag_value(re.sub(rb"\r?\n", b"", value))
    except (InvalidTagValueList, ValueError, IndexError):
        return None
    return dict(tags)


def key_name(tags: dict[bytes, bytes]) -> str | None:
    """s._domainkey.d of a signature (RFC 6376 3.6.2.1), or None."""
    try:
        name = (tags[b"s"] + b"._domainkey." + tags[b"d"]).decode("ascii").strip().lower()
    except (KeyError, UnicodeDecodeError):
        return None
    return name if re.fullmatch(r"[a-z0-9_.-]+", name) and ".." not in name else None


@dataclass
class KeyTable:
    """The TXT records fetched for the keys: name -> text, None (no key), or DNSTrouble."""

    found: dict[str, str | None | dns_resolver.DNSTrouble]

    def dnsfunc(self, name: bytes, timeout: float = 5) -> bytes | None:
        """dkimpy's DNS callback, answered from the table (never asks DNS)."""
        entry = self.found.get(name.decode("ascii", "replace").rstrip(".").lower())
        if isinstance(entry, str):
            return entry.encode("ascii", "replace")
        if isinstance(entry, dns_resolver.DNSTrouble):
            raise dkim.DnsTimeoutError(str(entry))
        return None


async def fetch_keys(resolver: dns_resolver.Resolver, names: Iterable[str]) -> KeyTable:
    """Every key record in `names`, fetched at once. The first TXT record of a name
    that has several is taken (RFC 6376 3.6.2.2 leaves it to the verifier)."""
    wanted = list(dict.fromkeys(names))

    async def one(name: str) -> str | None | dns_resolver.DNSTrouble:
        try:
            records = await dns_resolver.lookup(resolver, name + ".", "TXT")
        except dns_resolver.NXDOMAIN:
            return None
        except dns_resolver.DNSTrouble as e:
            return e
        for rdata in records:
            return b"".join(rdata.strings).decode("ascii", "replace")
        return None

    answers = await asyncio.gather(*(one(n) for n in wanted))
    return KeyTable(dict(zip(wanted, answers, strict=True)))


class _BodyHashed:
    """dkimpy's verifier with its body-hash step answered from `BodyHashes`."""

    body_hashes: BodyHashes

    def verify_sig_process(self, sig: dict[bytes, bytes], include_headers: list[bytes],
                           sig_header: tuple[bytes, bytes], dnsfunc: Callable[..., Any]) -> Any:
        if b"bh" in sig:
            key = body_key(sig)
            if key is None:
                raise dkim.MessageFormatError("unusable a=, c= or l= tag")
            digest = self.body_hashes.digest(key)
            if digest is None:
                raise dkim.MessageFormatError("l= is longer than the body")
            try:
                wanted = base64.b64decode(re.sub(rb"\s+", b"", sig[b"bh"]), validate=True)
            except binascii.Error:
                raise dkim.MessageFormatError("bh= is not base64") from None
            if digest != wanted:
                raise dkim.ValidationError("body hash mismatch")
            sig = {k: v for k, v in sig.items() if k != b"bh"}
        return super().verify_sig_process(  # type: ignore[misc]
            sig, include_headers, sig_header, dnsfunc)


class _DKIM(_BodyHashed, dkim.DKIM):  # type: ignore[misc]
    pass


class _ARC(_BodyHashed, dkim.ARC):  # type: ignore[misc]
    pass


def _quiet_logger() -> logging.Logger:
    # dkimpy logs every failed key at ERROR; our own line says what happened.
    logger = logging.getLogger("postroom.mailauth.dkimpy")
    logger.setLevel(logging.CRITICAL)
    return logger


def verify_signature(header_section: bytes, index: int, tags: dict[bytes, bytes] | None,
                     hashes: BodyHashes, keys: KeyTable) -> DKIMResult:
    """The verdict on the `index`th DKIM-Signature (0: topmost) of a message whose
    header section (ending in its empty line) is `header_section`."""
    tags = tags or {}
    domain = tags.get(b"d", b"").decode("ascii", "replace").strip().lower()
    selector = tags.get(b"s", b"").decode("ascii", "replace").strip()
    identity = tags.get(b"i", b"").decode("utf-8", "replace").strip()
    b_start = re.sub(r"\s+", "", tags.get(b"b", b"").decode("ascii", "replace"))[:8]
    algorithm = tags.get(b"a", b"").decode("ascii", "replace").strip().lower()

    def result(verdict: str, reason: str) -> DKIMResult:
        return DKIMResult(verdict, domain, selector, identity, b_start, algorithm, reason)

    if not tags:
        return result("permerror", "malformed signature (not a tag list)")
    try:
        dkim.validate_signature_fields(tags)
    except dkim.ValidationError as e:
        return result("permerror", f"malformed signature: {e}")
    if body_key(tags) is None:
        return result("permerror", "unusable a=, c= or l= tag")
    name = key_name(tags)
    entry = keys.found.get(name) if name else None
    if isinstance(entry, dns_resolver.DNSTrouble):
        return result("temperror", f"key {name}: {entry}")
    if entry is None:
        return result("permerror", f"no key at {name}")
    try:
        key_tags = dict(parse_tag_value(entry.encode("ascii", "replace")))
    except (InvalidTagValueList, ValueError, IndexError):
        return result("permerror", f"key {name} is not a tag list")
    if not key_tags.get(b"p", b"").strip():
        return result("permerror", f"key {name} is revoked (empty p=)")
    try:
        dkim.evaluate_pk(name, entry)
    except (dkim.KeyFormatError, binascii.Error, ValueError) as e:
        return result("permerror", f"key {name} unusable: {e}")
    verifier = _DKIM(header_section, logger=_quiet_logger(), minkey=MIN_RSA_BITS)
    verifier.body_hashes = hashes
    try:
        ok = verifier.verify(idx=index, dnsfunc=keys.dnsfunc)
    except dkim.ValidationError as e:
        if "body hash" in str(e):
            return result("fail", "body hash did not verify (the body was changed)")
        return result("permerror", str(e))
    except dkim.DKIMException as e:
        return result("permerror", str(e))
    if ok:
        if b"l" in tags:
            return result("pass", f"body covered up to l={int(tags[b'l'])} octets only")
        return result("pass", "signature verified")
    return result("fail", "signature did not verify (a signed header was changed)")


def verify_arc(header_section: bytes, hashes: BodyHashes, keys: KeyTable) -> ARCResult:
    """RFC 8617 5.2: the chain of ARC sets, validated with the keys fetched."""
    verifier = _ARC(header_section, logger=_quiet_logger(), minkey=MIN_RSA_BITS)
    verifier.body_hashes = hashes
    try:
        cv, results, reason = verifier.verify(dnsfunc=keys.dnsfunc)
    except (dkim.DKIMException, KeyError, ValueError, IndexError) as e:
        return ARCResult("fail", f"malformed ARC set: {e}")
    verdict = (cv or b"fail").decode() if isinstance(cv, bytes) else str(cv or "fail")
    instances = len(results)
    if verdict == "none":
        return ARCResult("none", "no ARC sets")
    if verdict != "pass":
        return ARCResult("fail", str(reason), instances)
    sealers = tuple(bytes(r.get("as-domain", b"")).decode("ascii", "replace").lower()
                    for r in sorted(results, key=lambda r: r["instance"]))
    return ARCResult("pass", "chain validated", instances, sealers)


def parse_header_fields(header_section: bytes) -> list[tuple[bytes, bytes]] | None:
    """The (name, value) fields of a header section as dkimpy reads them; None when
    dkimpy cannot read it (every signature is then a permerror)."""
    try:
        return [(name, value) for name, value in dkim.rfc822_parse(header_section)[0]]
    except dkim.MessageFormatError:
        return None


_SIGNED = re.compile(rb"^(?:dkim-signature|arc-)", re.IGNORECASE | re.MULTILINE)

# The header section kept for verification and DMARC's From; a longer one is not
# verified. As server.headers.MAX_HEADER_CAPTURE: far past any real header section.
MAX_HEADER_SECTION = 256 * 1024


class MessageVerifier:
    """One message as it streams in: the header section kept, the body hashed for its
    signatures; the keys fetched as soon as the header section is complete."""

    def __init__(self, resolver: dns_resolver.Resolver) -> None:
        self._resolver = resolver
        self._buffer = bytearray()
        self.header_section: bytes | None = None  # ending in its empty line
        self.fields: list[tuple[bytes, bytes]] | None = None
        self.too_large = False
        self._signatures: list[dict[bytes, bytes] | None] = []
        self._arc = False
        self._hashes = BodyHashes(())
        self._keys: asyncio.Task[KeyTable] | None = None

    def feed(self, data: bytes) -> None:
        if self.header_section is not None:
            self._hashes.feed(data)
            return
        start = max(0, len(self._buffer) - 3)
        self._buffer += data
        if self._buffer.startswith(b"\r\n"):
            end = -2  # no header fields at all
        else:
            end = self._buffer.find(b"\r\n\r\n", start)
        if end >= 0 or end == -2:
            body = bytes(self._buffer[end + 4 :])
            self._headers_done(bytes(self._buffer[: end + 4]))
            self._hashes.feed(body)
        elif len(self._buffer) > MAX_HEADER_SECTION:
            self.too_large = True
            self._headers_done(b"")

    def _headers_done(self, section: bytes) -> None:
        self._buffer = bytearray()
        self.header_section = section
        self.fields = parse_header_fields(section) if section else None
        if self.fields is None or not _SIGNED.search(section):
            self._hashes = BodyHashes(())
            return
        names: list[str] = []
        keys: list[BodyKey] = []
        for name, value in self.fields or []:
            lower = name.lower()
            if lower == DKIM_HEADER or lower in ARC_HEADERS:
                tags = signature_tags(value)
                if lower == DKIM_HEADER:
                    self._signatures.append(tags)
                    if len(self._signatures) > MAX_SIGNATURES:
                        continue
                else:
                    self._arc = True
                if tags is None:
                    continue
                key = key_name(tags)
                if key is not None and lower != b"arc-authentication-results":
                    names.append(key)
                if lower in (DKIM_HEADER, AMS_HEADER) and (bk := body_key(tags)) is not None:
                    keys.append(bk)
        self._hashes = BodyHashes(keys)
        if names:
            self._keys = asyncio.get_running_loop().create_task(
                fetch_keys(self._resolver, names))

    async def finish(self) -> tuple[list[DKIMResult], ARCResult]:
        """Every signature's verdict (topmost first) and the ARC chain's."""
        if self.header_section is None:  # no empty line: a message of header fields only
            self._headers_done(bytes(self._buffer) + b"\r\n")
        self._hashes.end()
        keys = await self._keys if self._keys is not None else KeyTable({})
        section = self.header_section or b""
        results = []
        for index, tags in enumerate(self._signatures):
            if index >= MAX_SIGNATURES:
                results.append(DKIMResult("policy", _tag(tags, b"d").lower(), _tag(tags, b"s"),
                                          "", "", "", f"only {MAX_SIGNATURES} signatures are "
                                          "verified"))
            elif self.fields is None:
                results.append(DKIMResult("permerror", _tag(tags, b"d").lower(), _tag(tags, b"s"),
                                          "", "", "", "unreadable header section"))
            else:
                results.append(verify_signature(section, index, tags, self._hashes, keys))
        if self.too_large:
            arc = ARCResult("none", "header section too large to check")
        elif not self._arc or self.fields is None:
            arc = ARCResult("none", "no ARC sets")
        else:
            arc = verify_arc(section, self._hashes, keys)
        return results, arc

    def cancel(self) -> None:
        """The message was dropped: stop fetching its keys."""
        if self._keys is not None:
            self._keys.cancel()


def _tag(tags: dict[bytes, bytes] | None, name: bytes) -> str:
    return (tags or {}).get(name, b"").decode("ascii", "replace").strip()
