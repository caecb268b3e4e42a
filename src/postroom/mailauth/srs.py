"""The Sender Rewriting Scheme: a forwarded message's envelope sender in our domain, and back.

A message forwarded with its original MAIL FROM fails SPF at the destination
(RFC 7208 1.2.3: we are not the sender's host). SRS (Shevek's scheme, as
postsrsd and Exim use it) rewrites the sender to an address of ours that
carries the original, a day stamp and an HMAC, so a bounce comes back here and
goes on to the original sender, and nobody else can make us relay with it:

    SRS0=HHHH=TT=orig-domain=orig-local@our-domain
    SRS1=HHHH=first-hop-domain==HHHH=TT=orig-domain=orig-local@our-domain

SRS1 is what a second forwarder makes of an SRS0 address: it keeps the first
forwarder's address, so a bounce skips the hops in between. The secret is
made once (DATA/srs.secret, mode 0600); the HMAC is compared case-insensitively,
since a host may fold the local part's case.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import time
from pathlib import Path

from postroom.store.atomic import atomic_write

SECRET_FILE = "srs.secret"
SECRET_BYTES = 32
HASH_LENGTH = 4  # base64 characters of the HMAC-SHA1 (libsrs2's default)
SEPARATOR = "="
# The day stamp: days since the epoch, modulo 1024, as two base32 characters.
TIME_PRECISION = 24 * 3600
TIME_SLOTS = 1024
BASE32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
MAX_AGE_DAYS = 21  # a bounce may come back this long after the forward (libsrs2's default)


class SRSError(ValueError):
    """An SRS address that is not ours, forged, or too old; str() says which."""


def load_secret(data_dir: Path) -> bytes:
    """The secret, made on first use (two first uses at once: the first link wins)."""
    path = Path(data_dir) / SECRET_FILE
    try:
        return path.read_bytes().strip()
    except FileNotFoundError:
        pass
    temp = path.with_name(f".{SECRET_FILE}.{secrets.token_hex(6)}")
    atomic_write(temp, base64.b64encode(secrets.token_bytes(SECRET_BYTES)) + b"\n", mode=0o600)
    try:
        os.link(temp, path)
    except FileExistsError:
        pass
    finally:
        temp.unlink()
    return path.read_bytes().strip()


def is_srs(local: str) -> bool:
    return local[:5].upper() in ("SRS0=", "SRS1=", "SRS0+", "SRS1+", "SRS0-", "SRS1-")


class SRS:
    """Forward and reverse rewriting with one secret, for addresses in `domain`s of ours."""

    def __init__(self, secret: bytes, clock: object = time.time) -> None:
        self._secret = secret
        self._clock = clock

    def _hash(self, *parts: str) -> str:
        mac = hmac.new(self._secret, "".join(parts).lower().encode(), hashlib.sha1).digest()
        return base64.b64encode(mac).decode()[:HASH_LENGTH]

    def _check_hash(self, given: str, *parts: str) -> None:
        if not hmac.compare_digest(given.lower(), self._hash(*parts).lower()):
            raise SRSError("the SRS address's hash does not match: not made here")

    def _today(self) -> int:
        return int(self._clock() // TIME_PRECISION)  # type: ignore[operator]

    def _stamp(self) -> str:
        day = self._today() % TIME_SLOTS
        return BASE32[day >> 5] + BASE32[day & 31]

    def _check_stamp(self, stamp: str) -> None:
        if len(stamp) != 2 or any(c not in BASE32 for c in stamp.upper()):
            raise SRSError("the SRS address's time stamp is malformed")
        then = BASE32.index(stamp[0].upper()) << 5 | BASE32.index(stamp[1].upper())
        age = (self._today() - then) % TIME_SLOTS
        if age > MAX_AGE_DAYS:
            raise SRSError(f"the SRS address is {age} days old (at most {MAX_AGE_DAYS})")

    def forward(self, sender: str, domain: str) -> str:
        """The envelope sender to use when `domain` (ours) forwards mail from `sender`.
        The null sender stays null (RFC 5321 4.5.5: a bounce is never bounced)."""
        if not sender:
            return sender
        local, _, sender_domain = sender.rpartition("@")
        if not local or not sender_domain:
            return sender
        if sender_domain.lower() == domain.lower():
            return sender  # ours already: SPF passes as it is
        kind = local[:4].upper() if is_srs(local) else ""
        if kind == "SRS0":
            # SRS0=HHHH=TT=orig-domain=orig-local@first-hop: keep the first hop.
            rest = local[5:]
            h = self._hash(sender_domain, rest)
            return f"SRS1={h}={sender_domain}=={rest}@{domain}"
        if kind == "SRS1":
            # SRS1=HHHH=first-hop==rest: rehash for us, first hop unchanged.
            parts = local[5:].split(SEPARATOR, 2)
            if len(parts) == 3 and parts[2].startswith(SEPARATOR):
                first_hop, rest = parts[1], parts[2][1:]
                return f"SRS1={self._hash(first_hop, rest)}={first_hop}=={rest}@{domain}"
        stamp = self._stamp()
        return f"SRS0={self._hash(stamp, sender_domain, local)}={stamp}={sender_domain}" \
               f"={local}@{domain}"

    def reverse(self, address: str) -> str:
        """Where a message to an SRS address of ours goes: the original sender (SRS0),
        or the first forwarder's SRS0 address (SRS1). SRSError when it is not valid."""
        local = address.rpartition("@")[0]
        if not is_srs(local):
            raise SRSError("not an SRS address")
        kind, rest = local[:4].upper(), local[5:]
        if kind == "SRS0":
            parts = rest.split(SEPARATOR, 3)
            if len(parts) != 4 or not all(parts):
                raise SRSError("malformed SRS0 address")
            given, stamp, orig_domain, orig_local = parts
            self._check_hash(given, stamp, orig_domain, orig_local)
            self._check_stamp(stamp)
            return f"{orig_local}@{orig_domain}"
        parts = rest.split(SEPARATOR, 2)
        if len(parts) != 3 or not parts[2].startswith(SEPARATOR) or not parts[1]:
            raise SRSError("malformed SRS1 address")
        given, first_hop, inner = parts[0], parts[1], parts[2][1:]
        self._check_hash(given, first_hop, inner)
        return f"SRS0={inner}@{first_hop}"
