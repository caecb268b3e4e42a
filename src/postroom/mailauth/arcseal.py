"""ARC sealing (RFC 8617) of mail this host forwards, carrying our Authentication-Results.

A forwarded message's SPF fails at the destination and an edited one loses its
DKIM signature; the ARC set we add (ARC-Authentication-Results copying the
Authentication-Results our checks wrote, ARC-Message-Signature, ARC-Seal) lets
the destination trust what we saw (RFC 8617 1). dkimpy makes the set: it
takes the Authentication-Results fields of our authserv-id (the host name),
the chain validation (cv=) from their arc= result, and signs with the RSA key
of the forwarding domain (RFC 8617 defines rsa-sha256 only).

dkimpy needs the whole message: one larger than ARC_SEAL_LIMIT is forwarded
without a seal (SRS still lets SPF pass), so that forwarding never holds more
than that in memory.
"""

from __future__ import annotations

import logging
import time

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from postroom.mailauth.keys import SigningKey

log = logging.getLogger("postroom.arc")

ARC_SEAL_LIMIT = 10 * 1024 * 1024  # octets; as a large attachment, far above most mail


def seal(message: bytes, keys: list[SigningKey], authserv_id: str,
         now: float | None = None, where: str = "") -> bytes:
    """The ARC set to put on top of `message` (b"" when it cannot be sealed: no RSA key,
    no Authentication-Results of ours, a chain that ended, a malformed message)."""
    key = next((k for k in keys if isinstance(k.private, rsa.RSAPrivateKey)), None)
    if key is None:
        log.info("%snot ARC-sealed: no RSA key for the forwarding domain", where)
        return b""
    pem = key.private.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.TraditionalOpenSSL,
                                    serialization.NoEncryption())
    try:
        fields = dkim.arc_sign(message, key.key.selector.encode(), key.key.domain.encode(),
                               pem, authserv_id.encode(),
                               timestamp=str(int(time.time() if now is None else now)))
    except dkim.DKIMException as e:
        log.warning("%snot ARC-sealed: %s", where, e)
        return b""
    if not fields:
        log.info("%snot ARC-sealed: no Authentication-Results of %s, or an ARC chain "
                 "without a result", where, authserv_id)
        return b""
    log.info("%sARC-sealed as %s (s=%s)", where, key.key.domain, key.key.selector)
    return b"".join(fields)
