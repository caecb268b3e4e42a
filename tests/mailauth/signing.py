"""Test keys and signatures made with dkimpy, and their DNS records (test helper)."""

from __future__ import annotations

import base64
import subprocess
from dataclasses import dataclass

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa


@dataclass(frozen=True)
class Key:
    domain: str
    selector: str
    private: bytes  # what dkimpy's sign() takes
    record: str  # the TXT record at selector._domainkey.domain
    algorithm: bytes  # a= of its signatures
    pem: bytes = b""  # PKCS#1 PEM (RSA), for other signers

    @property
    def name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"


def rsa_key(domain: str, selector: str, bits: int = 2048) -> Key:
    if bits < 1024:  # cryptography refuses to make one; openssl still does
        made = subprocess.run(["openssl", "genrsa", str(bits)], capture_output=True, check=True)
        loaded = serialization.load_pem_private_key(made.stdout, None)
        assert isinstance(loaded, rsa.RSAPrivateKey)
        private = loaded
    else:
        private = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = private.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    public = private.public_key().public_bytes(serialization.Encoding.DER,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    record = f"v=DKIM1; k=rsa; p={base64.b64encode(public).decode()}"
    return Key(domain, selector, pem, record, b"rsa-sha256", pem)


def ed25519_key(domain: str, selector: str) -> Key:
    private = ed25519.Ed25519PrivateKey.generate()
    seed = private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                 serialization.NoEncryption())
    public = private.public_key().public_bytes(serialization.Encoding.Raw,
                                               serialization.PublicFormat.Raw)
    record = f"v=DKIM1; k=ed25519; p={base64.b64encode(public).decode()}"
    return Key(domain, selector, base64.b64encode(seed), record, b"ed25519-sha256")


SIGNED_HEADERS = [b"from", b"to", b"subject", b"date", b"message-id"]


class _Signer(dkim.DKIM):
    """dkimpy's signer, with extra tags (x=) put in before b=."""

    extra: list[tuple[bytes, bytes]] = []

    def gen_header(self, fields, include_headers, canon_policy, header_name, pk,  # type: ignore[no-untyped-def]
                   standardize=False):
        fields[-1:-1] = self.extra
        return super().gen_header(fields, include_headers, canon_policy, header_name, pk,
                                  standardize)


def sign(message: bytes, key: Key, *, canon: bytes = b"relaxed/relaxed",
         length: bool = False, expires: int | None = None) -> bytes:
    """`message` with a DKIM-Signature by `key` on top (x=`expires` when given)."""
    signer = _Signer(message)
    signer.extra = [(b"x", str(expires).encode())] if expires is not None else []
    header = signer.sign(key.selector.encode(), key.domain.encode(), key.private,
                         include_headers=SIGNED_HEADERS, canonicalize=tuple(canon.split(b"/")),
                         length=length, signature_algorithm=key.algorithm)
    return header + message
