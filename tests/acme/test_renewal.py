"""When the certificate in use is due for replacement by one from the ACME CA."""

from __future__ import annotations

import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from postroom.acme.renewal import chain_due, renewal_due
from postroom.tlscert import make_self_signed

NOW = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
DAY = datetime.timedelta(days=1)
MONTH = 30 * 86400.0


def issued(path: Path, names: list[str], start: datetime.datetime,
           end: datetime.datetime) -> Path:
    """A certificate for `names` from an issuer that is not its subject."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Some CA")]))
        .public_key(key.public_key()).serial_number(1)
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]),
                       critical=False)
        .sign(key, hashes.SHA256()))
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def test_ninety_days_renews_thirty_days_before_expiry(tmp_path: Path) -> None:
    cert = issued(tmp_path / "c.pem", ["mx.example"], NOW, NOW + 90 * DAY)
    due, why = renewal_due(cert, ["mx.example"], MONTH, NOW)
    assert due == NOW + 60 * DAY and "expires" in why


def test_short_lived_renews_at_two_thirds(tmp_path: Path) -> None:
    cert = issued(tmp_path / "c.pem", ["mx.example"], NOW, NOW + 6 * DAY)
    assert renewal_due(cert, ["mx.example"], MONTH, NOW)[0] == NOW + 4 * DAY


def test_near_expiry_is_due_now(tmp_path: Path) -> None:
    cert = issued(tmp_path / "c.pem", ["mx.example"], NOW - 89 * DAY, NOW + DAY)
    assert renewal_due(cert, ["mx.example"], MONTH, NOW)[0] <= NOW


def test_missing_self_signed_or_other_names_are_due_at_once(tmp_path: Path) -> None:
    assert renewal_due(tmp_path / "none.pem", ["mx.example"], MONTH, NOW)[0] == NOW
    stand_in = tmp_path / "self.pem"
    stand_in.write_bytes(make_self_signed("mx.example")[0])
    assert renewal_due(stand_in, ["mx.example"], MONTH, NOW) == (
        NOW, "the certificate in use is self-signed")
    cert = issued(tmp_path / "c.pem", ["mx.example"], NOW, NOW + 90 * DAY)
    due, why = renewal_due(cert, ["mx.example", "smtp.example"], MONTH, NOW)
    assert due == NOW and "smtp.example" in why


def test_a_chain_in_memory_is_judged_alike(tmp_path: Path) -> None:
    cert = issued(tmp_path / "c.pem", ["mx.example"], NOW, NOW + 90 * DAY)
    assert chain_due(cert.read_bytes(), ["mx.example"], MONTH, NOW) == renewal_due(
        cert, ["mx.example"], MONTH, NOW)
    assert chain_due(b"junk", ["mx.example"], MONTH, NOW)[0] == NOW
