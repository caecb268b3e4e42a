"""The self-signed certificate and server contexts: made once, private key, verifiable by name."""

from __future__ import annotations

import ipaddress
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from postroom.tlscert import TLSFileError, ensure_certificate, server_context


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "tls" / "cert.pem", tmp_path / "tls" / "key.pem"
    assert ensure_certificate(cert, key, "mx.corp.example") is True
    return cert, key


def test_made_once_with_a_private_key(pair: tuple[Path, Path]) -> None:
    cert, key = pair
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    before = cert.read_bytes()
    assert ensure_certificate(cert, key, "mx.corp.example") is False
    assert cert.read_bytes() == before
    assert sorted(p.name for p in cert.parent.iterdir()) == ["cert.pem", "key.pem"]


def test_names_and_lifetime(pair: tuple[Path, Path]) -> None:
    cert = x509.load_pem_x509_certificate(pair[0].read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mx.corp.example", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")
    ]
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime.days >= 3650


def test_half_a_pair_is_not_overwritten(pair: tuple[Path, Path]) -> None:
    cert, key = pair
    key.unlink()
    with pytest.raises(TLSFileError, match="key.pem is missing") as caught:
        ensure_certificate(cert, key, "mx.corp.example")
    assert caught.value.setting == "key"
    assert cert.exists()


def _handshake(server: ssl.SSLContext, client: ssl.SSLContext, name: str) -> str:
    """Run a TLS handshake through memory buffers; return the negotiated version."""
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    s = server.wrap_bio(s_in, s_out, server_side=True)
    c = client.wrap_bio(c_in, c_out, server_hostname=name)
    done = {"s": False, "c": False}
    for _ in range(20):
        for key, end in (("c", c), ("s", s)):
            if not done[key]:
                try:
                    end.do_handshake()
                    done[key] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return str(c.version())
    raise AssertionError("handshake did not finish")


@pytest.mark.parametrize("name", ["mx.corp.example", "localhost", "127.0.0.1"])
def test_clients_that_trust_it_verify_it_by_name(pair: tuple[Path, Path], name: str) -> None:
    client = ssl.create_default_context(cafile=str(pair[0]))
    version = _handshake(server_context(*pair), client, name)
    assert version in ("TLSv1.2", "TLSv1.3")


def test_wrong_name_is_refused(pair: tuple[Path, Path]) -> None:
    client = ssl.create_default_context(cafile=str(pair[0]))
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(server_context(*pair), client, "other.example")


def test_old_protocols_are_refused(pair: tuple[Path, Path]) -> None:
    assert server_context(*pair).minimum_version == ssl.TLSVersion.TLSv1_2


def test_unloadable_files(pair: tuple[Path, Path], tmp_path: Path) -> None:
    cert, key = pair
    with pytest.raises(TLSFileError, match="no such file") as caught:
        server_context(tmp_path / "none.pem", key)
    assert caught.value.setting == "cert"
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    with pytest.raises(TLSFileError, match=f"^{junk}: not a PEM certificate") as caught:
        server_context(junk, key)
    assert caught.value.setting == "cert"
    with pytest.raises(TLSFileError, match=f"^{junk}: not a PEM private key$") as caught:
        server_context(cert, junk)
    assert caught.value.setting == "key"
    broken = tmp_path / "broken.pem"
    broken.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(TLSFileError, match="broken.pem: not a valid PEM certificate"):
        server_context(broken, key)
    other_cert, other_key = tmp_path / "o" / "c.pem", tmp_path / "o" / "k.pem"
    ensure_certificate(other_cert, other_key, "localhost")
    with pytest.raises(TLSFileError, match=f"{other_key}: does not match the "
                                           f"certificate in {cert}") as caught:
        server_context(cert, other_key)
    assert caught.value.setting == "key"


def test_an_encrypted_key_is_named(pair: tuple[Path, Path], tmp_path: Path) -> None:
    cert, key = pair
    private = serialization.load_pem_private_key(key.read_bytes(), password=None)
    locked = tmp_path / "locked.pem"
    locked.write_bytes(private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    with pytest.raises(TLSFileError, match=f"{locked}: the private key is encrypted"):
        server_context(cert, locked)


def test_a_chain_is_checked_against_its_first_certificate(
    pair: tuple[Path, Path], tmp_path: Path
) -> None:
    cert, key = pair
    other_cert, _ = tmp_path / "o" / "c.pem", tmp_path / "o" / "k.pem"
    ensure_certificate(other_cert, tmp_path / "o" / "k.pem", "localhost")
    chain = tmp_path / "chain.pem"
    chain.write_bytes(cert.read_bytes() + other_cert.read_bytes())
    assert server_context(chain, key).minimum_version == ssl.TLSVersion.TLSv1_2
