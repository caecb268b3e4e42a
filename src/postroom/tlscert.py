"""TLS material: the self-signed certificate made on first start, and server SSL contexts."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from postroom.config import ConfigError
from postroom.store.atomic import atomic_write

VALID_DAYS = 3650  # a development default: ten years, so a test setup never expires


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
    dns_names = [hostname] if hostname != "localhost" else []
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in [*dns_names, "localhost"]]
    sans += [
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
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
    nothing is overwritten: ConfigError says which one is missing.
    """
    cert, key = Path(cert), Path(key)
    have_cert, have_key = cert.exists(), key.exists()
    if have_cert and have_key:
        return False
    if have_cert or have_key:
        present, absent = (cert, key) if have_cert else (key, cert)
        raise ConfigError(
            f"tls: {absent} is missing but {present} exists; restore it, "
            f"or remove {present} to have a new self-signed pair made"
        )
    cert_pem, key_pem = make_self_signed(hostname)
    for path in (key, cert):
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    atomic_write(key, key_pem, mode=0o600)
    atomic_write(cert, cert_pem, mode=0o644)
    return True


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server-side SSLContext with TLS 1.2 or newer (RFC 8996, RFC 9325 3.1.1).

    ConfigError, naming the files, when the certificate or key cannot be loaded.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION  # CRIME (RFC 9325 3.3)
    try:
        context.load_cert_chain(cert, key)
    except FileNotFoundError as e:
        raise ConfigError(f"tls: {e.filename or cert}: no such file") from None
    except (ssl.SSLError, OSError) as e:
        reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or str(e)
        raise ConfigError(f"tls: cannot load {cert} with {key}: {reason}") from None
    return context
