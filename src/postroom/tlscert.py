"""TLS material: the self-signed certificate made on first start, and server SSL contexts.

It gets file paths and a host name, never the config: a file that cannot be
used raises TLSFileError, naming which of the pair (`setting`, "cert" or
"key"), the file and the fault; the caller words it as a config error.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from postroom.store.atomic import atomic_write

VALID_DAYS = 3650  # a development default: ten years, so a test setup never expires

Setting = Literal["cert", "key"]


class TLSFileError(ValueError):
    """A certificate or key file that cannot be used; str() names the file and the fault."""

    def __init__(self, setting: Setting, text: str) -> None:
        super().__init__(text)
        self.setting = setting  # which of the pair is at fault


def make_self_signed(hostname: str) -> tuple[bytes, bytes]:
    """A new EC P-256 key and a self-signed certificate for `hostname`, both PEM.

    The subject alternative names cover `hostname`, localhost, 127.0.0.1 and
    ::1, so clients on loopback can verify it by name once they trust it.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, hostname[:64]),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "postroom self-signed"),
        ]
    )
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dict.fromkeys([hostname, "localhost"])]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ("127.0.0.1", "::1")]
    now = datetime.datetime.now(datetime.UTC)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))  # tolerate clock skew
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def ensure_certificate(cert: Path, key: Path, hostname: str) -> bool:
    """Make a self-signed pair at `cert` and `key` unless both exist; True when made.

    The key is written first, mode 0600, each file atomically, so a crash never
    leaves a certificate without its key. When only one of the two exists,
    nothing is overwritten: TLSFileError says which one is missing.
    """
    cert, key = Path(cert), Path(key)
    have_cert, have_key = cert.exists(), key.exists()
    if have_cert and have_key:
        return False
    if have_cert or have_key:
        present, absent = (cert, key) if have_cert else (key, cert)
        raise TLSFileError(
            "key" if absent == key else "cert",
            f"{absent} is missing but {present} exists; restore it, "
            f"or remove {present} to have a new self-signed pair made",
        )
    cert_pem, key_pem = make_self_signed(hostname)
    for path in (key, cert):
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    atomic_write(key, key_pem, mode=0o600)
    atomic_write(cert, cert_pem, mode=0o644)
    return True


def _read(path: Path, setting: Setting) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise TLSFileError(setting, f"{path}: no such file") from None
    except OSError as e:
        raise TLSFileError(setting, f"{path}: cannot read: {e.strerror or e}") from None


def check_pair(cert: Path, key: Path) -> None:
    """TLSFileError unless `cert` holds a PEM certificate chain and `key` its private key.

    The error names the file and the fault, where OpenSSL would only say "PEM
    lib" or "key values mismatch".
    """
    cert_pem = _read(cert, "cert")
    if b"-----BEGIN CERTIFICATE-----" not in cert_pem:
        raise TLSFileError("cert", f"{cert}: not a PEM certificate (no "
                                   "-----BEGIN CERTIFICATE----- line)")
    try:
        leaf = x509.load_pem_x509_certificates(cert_pem)[0]  # the server's own comes first
        leaf_public = leaf.public_key()
    except ValueError as e:
        raise TLSFileError("cert", f"{cert}: not a valid PEM certificate ({e})") from None
    key_pem = _read(key, "key")
    try:
        private = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:  # cryptography's way of saying "encrypted, and no password given"
        raise TLSFileError("key", f"{key}: the private key is encrypted; give postroom an "
                                  "unencrypted copy (mode 0600)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise TLSFileError("key", f"{key}: not a PEM private key") from None
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if private.public_key().public_bytes(*spki) != leaf_public.public_bytes(*spki):
        raise TLSFileError("key", f"{key}: does not match the certificate in {cert}")


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server-side SSLContext with TLS 1.2 or newer (RFC 8996, RFC 9325 3.1.1).

    TLSFileError, naming the file and the fault, when the certificate or key
    cannot be used (see `check_pair`).
    """
    check_pair(cert, key)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION  # CRIME (RFC 9325 3.3)
    try:
        context.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as e:  # what check_pair could not foresee
        reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or str(e)
        raise TLSFileError("cert", f"cannot use {cert} with its key {key}: {reason}") from None
    return context
