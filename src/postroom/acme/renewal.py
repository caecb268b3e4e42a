"""When the certificate in use is due to be replaced by one from the ACME CA."""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509

# A certificate is renewed when this share of its lifetime is left, if that comes
# before `renew_before` (Let's Encrypt's advice for short-lived certificates:
# renew at two thirds of the lifetime).
RENEW_AT_SHARE_LEFT = 1 / 3


def renewal_due(cert: Path, names: Sequence[str], renew_before: float,
                now: datetime.datetime) -> tuple[datetime.datetime, str]:
    """When the certificate in `cert` should be replaced, and why (for the log).

    Due at once when the file is missing or unreadable, self-signed (the stand-in
    made on first start), or not valid for every one of `names`; otherwise at
    its expiry less `renew_before` seconds or less a third of its lifetime,
    whichever is sooner.
    """
    try:
        pem = cert.read_bytes()
    except OSError as exc:
        return now, f"no usable certificate ({exc})"
    return chain_due(pem, names, renew_before, now)


def chain_due(pem: bytes, names: Sequence[str], renew_before: float,
              now: datetime.datetime) -> tuple[datetime.datetime, str]:
    """`renewal_due` for a chain in memory (PEM, the server's certificate first)."""
    try:
        leaf = x509.load_pem_x509_certificates(pem)[0]
    except ValueError as exc:
        return now, f"no usable certificate ({exc})"
    if leaf.issuer == leaf.subject:
        return now, "the certificate in use is self-signed"
    try:
        sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        covered = {name.lower() for name in sans.get_values_for_type(x509.DNSName)}
    except x509.ExtensionNotFound:
        covered = set()
    missing = [name for name in names if name not in covered]
    if missing:
        return now, f"the certificate in use is not for {', '.join(missing)}"
    start, end = leaf.not_valid_before_utc, leaf.not_valid_after_utc
    early = min(datetime.timedelta(seconds=renew_before), (end - start) * RENEW_AT_SHARE_LEFT)
    return end - early, f"the certificate expires {end:%Y-%m-%d %H:%M:%S} UTC"
