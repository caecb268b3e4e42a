"""DKIM signatures (RFC 6376, RFC 8463) for mail leaving from a local domain, made as it streams.

A message is fed to a `StreamSigner` piece by piece while it is written to its
spool: the header section is kept (it is small and bounded), the body only
passes through the body hash (relaxed canonicalization computed line by line,
RFC 6376 3.4.4), so a 50 MB message is signed without being held. At the end,
`finish()` signs the header fields with every active key of the From domain
(rsa-sha256, and ed25519-sha256 beside it when the domain has both: RFC 8463's
dual signing) and returns the DKIM-Signature fields to put at the top of the
copy that leaves. Header-field selection and canonicalization are dkimpy's.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from email.utils import getaddresses
from typing import Any

import dkim
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, utils
from dkim.canonicalization import CanonicalizationPolicy

from postroom.canonical import canonical_domain
from postroom.mailauth.keys import KeyRing, SigningKey

log = logging.getLogger("postroom.dkim")

CANONICALIZATION = b"relaxed/relaxed"  # RFC 6376 3.4: survives refolding and re-spacing
# The fields whose change would change what the reader sees or how the message
# threads (RFC 6376 5.4.1's list, with MIME, threading and List-* fields).
SIGNED_FIELDS = (
    "from", "sender", "reply-to", "subject", "date", "message-id", "to", "cc",
    "mime-version", "content-type", "content-transfer-encoding", "content-id",
    "content-description", "in-reply-to", "references", "list-id", "list-help",
    "list-unsubscribe", "list-subscribe", "list-post", "list-owner", "list-archive",
    "list-unsubscribe-post", "resent-date", "resent-from", "resent-sender", "resent-to",
    "resent-cc", "resent-message-id",
)
# Named once more than they occur, so that an added one breaks the signature
# (RFC 6376 8.15: a second From would otherwise be shown to the reader unsigned).
OVERSIGNED = ("from",)
# A header section longer than this is not signed (the message still goes); it
# is kept in memory until the body starts. Postfix's header_size_limit is 100 KiB.
MAX_HEADER_SECTION = 256 * 1024
SPOOL_IN_MEMORY = 512 * 1024  # signed_stream: a larger message waits in a temporary file
READ_BACK = 64 * 1024
FOLD_AT = 72  # characters of base64 per line of b= (RFC 5322 2.1.1 suggests 78 per line)

_WSP_RUN = re.compile(rb"[\t ]+")
_WSP_AT_EOL = re.compile(rb"[\t ]+\r\n")


class RelaxedBodyHash:
    """SHA-256 of the relaxed-canonical body (RFC 6376 3.4.4), fed in pieces.

    Only whole lines are canonicalized; empty lines are counted rather than
    hashed until a non-empty line follows, since trailing empty lines are ignored.
    """

    __slots__ = ("_hash", "_partial", "_empty", "length")

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._partial = b""
        self._empty = 0  # empty lines seen and not yet hashed
        self.length = 0  # canonical octets hashed

    def update(self, data: bytes) -> None:
        data = self._partial + data if self._partial else data
        cut = data.rfind(b"\r\n")
        if cut < 0:
            self._partial = data
            return
        self._partial = data[cut + 2 :]
        self._lines(data[: cut + 2])

    def _lines(self, block: bytes) -> None:
        """A block of whole lines, each ending in CRLF."""
        block = _WSP_AT_EOL.sub(b"\r\n", _WSP_RUN.sub(b" ", block))
        # Lines that are only whitespace are now empty; "\r\n" pairs at the end are
        # empty lines, held back (a bare CR before them belongs to its line).
        core = block
        trailing = 0
        while core.endswith(b"\r\n\r\n"):
            core = core[:-2]
            trailing += 1
        if core == b"\r\n":  # the block is only empty lines
            self._empty += trailing + 1
            return
        if self._empty:
            core = b"\r\n" * self._empty + core
        self._hash.update(core)
        self.length += len(core)
        self._empty = trailing

    def digest(self) -> bytes:
        if self._partial:
            # RFC 6376 3.4.4: a last line without CRLF gets one.
            tail, self._partial = self._partial, b""
            self._lines(tail + b"\r\n")
        return self._hash.digest()


def _sign_digest(key: SigningKey, digest: bytes) -> bytes:
    private = key.private
    if isinstance(private, ed25519.Ed25519PrivateKey):
        return private.sign(digest)  # RFC 8463 3: Ed25519 over the SHA-256 of the fields
    return private.sign(digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))


def _fold_list(names: list[bytes]) -> bytes:
    """h= value folded between names (FWS is allowed around ":", RFC 6376 3.5)."""
    lines: list[bytes] = []
    line = b""
    for name in names:
        piece = name if not line else b":" + name
        if line and len(line) + len(piece) > FOLD_AT:
            lines.append(line + b":")
            line = name
        else:
            line += piece
    lines.append(line)
    return b"\r\n\t ".join(lines)


def _fold_b64(value: bytes) -> bytes:
    return b"\r\n\t ".join(value[i : i + FOLD_AT] for i in range(0, len(value), FOLD_AT))


def parse_fields(section: bytes) -> list[list[bytes]] | None:
    """The header fields as dkimpy lists them (name, value with CRLF), or None when
    the section is not a header section."""
    try:
        headers, _body = dkim.rfc822_parse(section + b"\r\n")
    except dkim.MessageFormatError:
        return None
    return [list(h) for h in headers]


def signature_fields(fields: list[list[bytes]], bodyhash: bytes, keys: list[SigningKey],
                     now: float | None = None) -> bytes:
    """DKIM-Signature fields (CRLF-terminated) for `fields` and a body hash, one per key."""
    present = [name.lower() for name, _v in fields]
    include = [n.encode() for n in SIGNED_FIELDS for _ in range(present.count(n.encode()))]
    include += [n.encode() for n in OVERSIGNED]
    policy = CanonicalizationPolicy.from_c_value(CANONICALIZATION)
    canonical = policy.canonicalize_headers(fields)
    stamp = str(int(time.time() if now is None else now)).encode()
    bh = base64.b64encode(bodyhash)
    out = []
    for key in keys:
        k = key.key
        value = (
            b" v=1; a=" + k.signing_algorithm + b"; c=" + CANONICALIZATION
            + b"; d=" + k.domain.encode() + b"; s=" + k.selector.encode()
            + b";\r\n\tt=" + stamp + b"; h=" + _fold_list(include)
            + b";\r\n\tbh=" + bh + b";\r\n\tb="
        )
        hasher: Any = hashlib.sha256()
        dkim.hash_headers(hasher, policy, canonical, include, (b"DKIM-Signature", value), {})
        signature = base64.b64encode(_sign_digest(key, hasher.digest()))
        out.append(b"DKIM-Signature:" + value + _fold_b64(signature) + b"\r\n")
    return b"".join(out)


def from_domain(fields: list[list[bytes]]) -> str | None:
    """The domain of the single author in From (RFC 5322 3.6.2), or None."""
    values = [v for n, v in fields if n.lower() == b"from"]
    if len(values) != 1:
        return None
    text = values[0].decode("utf-8", "replace").replace("\r\n", "")
    addresses = [a for _name, a in getaddresses([text]) if a]
    if len(addresses) != 1 or "@" not in addresses[0]:
        return None
    try:  # keys are filed under the A-label form (RFC 6376 3.5: d= is A-labels)
        return canonical_domain(addresses[0].rpartition("@")[2].strip())
    except ValueError:
        return None


class StreamSigner:
    """One message, fed as it is written; `finish()` gives its DKIM-Signature fields."""

    __slots__ = ("_keys", "_head", "_body", "_in_body", "_extra", "_too_large", "_clock",
                 "_unsigned")

    def __init__(self, keys: Callable[[str], list[SigningKey]],
                 clock: Callable[[], float] = time.time) -> None:
        self._keys = keys  # the keys of a From domain (KeyRing.keys_for)
        self._head = bytearray()
        self._body = RelaxedBodyHash()
        self._in_body = False
        self._extra = b""
        self._too_large = False
        self._clock = clock
        # The From domain has no key: the body is not hashed (most mail a host sends
        # may be for domains without keys; hashing costs as much as the rest of intake).
        self._unsigned = False

    def feed(self, data: bytes) -> None:
        if self._in_body:
            if not self._unsigned:
                self._body.update(data)
            return
        start = max(0, len(self._head) - 3)
        self._head += data
        if self._head.startswith(b"\r\n"):
            end = 0  # no header section
        else:
            end = self._head.find(b"\r\n\r\n", start)
            if end < 0:
                if len(self._head) > MAX_HEADER_SECTION:
                    self._too_large = True
                    self._in_body = self._unsigned = True  # the message goes unsigned
                    self._head.clear()
                return
            end += 2
            if end > MAX_HEADER_SECTION:
                self._too_large = True
        rest = bytes(self._head[end + 2 :])
        del self._head[end:]
        self._in_body = True
        self._unsigned = not self._has_key()
        if rest and not self._unsigned:
            self._body.update(rest)

    def _has_key(self) -> bool:
        """Whether the header section's From domain has a key to sign with (a header
        section that cannot be signed is left for `finish` to log)."""
        fields = parse_fields(bytes(self._head))
        if fields is None:
            return True
        domain = from_domain(fields)
        return domain is None or bool(self._keys(domain))

    def add_fields(self, lines: bytes) -> None:
        """Header fields we added to the message (Date, Message-ID, RFC 6409 8)."""
        self._extra += lines

    def finish(self, where: str = "") -> bytes:
        """The DKIM-Signature fields for the message (b"" when there is no key for its
        From domain, or it cannot be signed: logged)."""
        if self._too_large:
            log.warning("%snot signed: header section over %d octets", where,
                        MAX_HEADER_SECTION)
            return b""
        if self._unsigned:  # no key for the From domain when the body began
            return b""
        fields = parse_fields(bytes(self._extra) + bytes(self._head))
        if fields is None:
            log.warning("%snot signed: malformed header section", where)
            return b""
        domain = from_domain(fields)
        if domain is None:
            log.info("%snot signed: no single From address", where)
            return b""
        keys = self._keys(domain)
        if not keys:
            return b""
        sigs = signature_fields(fields, self._body.digest(), keys, self._clock())
        log.info("%sDKIM-signed for %s: %s", where, keys[0].key.domain,
                 ", ".join(f"s={k.key.selector} a={k.key.signing_algorithm.decode()}"
                           for k in keys))
        return sigs


class Signer:
    """The server's (or sendmail's) signing: a key ring, and messages to sign."""

    def __init__(self, keyring: KeyRing, clock: Callable[[], float] = time.time) -> None:
        self.keyring = keyring
        self._clock = clock

    def start(self) -> StreamSigner:
        return StreamSigner(self.keyring.keys_for, self._clock)

    def sign(self, message: bytes, where: str = "") -> bytes:
        """A whole message (a delivery report we made) with its signatures on top."""
        signer = self.start()
        signer.feed(message)
        return signer.finish(where) + message


def signed_stream(chunks: Iterable[bytes], signer: StreamSigner, where: str = "",
                  *, spill_at: int = SPOOL_IN_MEMORY) -> Iterator[bytes]:
    """`chunks` with the signatures on top, for a writer that cannot go back to the
    top (postroom sendmail's queue file): the message waits in a temporary file
    (in memory up to `spill_at`) until its last chunk is hashed."""
    with tempfile.SpooledTemporaryFile(max_size=spill_at) as spool:
        for chunk in chunks:
            signer.feed(chunk)
            spool.write(chunk)
        yield signer.finish(where)
        spool.seek(0)
        while piece := spool.read(READ_BACK):
            yield piece
