"""Certificates from ACME (RFC 8555) against pebble, the ACME test CA, with HTTP-01.

First issuance; a certificate near its expiry renewed while the CA is down at
first (the old one kept, the attempt retried) and then up; a client connected
before the renewal finishing its session on the old certificate while new
clients get the new one, verified against pebble's root.
"""

from __future__ import annotations

import asyncio
import datetime
import re
import smtplib
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from mailharness import LOOPBACK, Dnsmasq, Postroom, free_ports
from pebbleharness import ListenerCA, Pebble

from postroom.config import load_config
from postroom.server.main import Running, start
from postroom.store.factory import open_store

pytestmark = pytest.mark.interop

NAME = "mail.example.test"
WAIT = 60.0


@pytest.fixture(name="ca")
def ca_fixture(tmp_path: Path) -> ListenerCA:
    return ListenerCA(tmp_path / "ca")


@pytest.fixture(name="dns")
def dns_fixture(tmp_path: Path, require_peer: object) -> Iterator[int]:
    assert callable(require_peer)
    require_peer("dnsmasq")
    server = Dnsmasq(tmp_path / "dns", f"--host-record={NAME},{LOOPBACK}",
                     "--local=/example.test/")
    yield server.start()
    server.stop()


@pytest.fixture(name="pebble")
def pebble_fixture(tmp_path: Path, ca: ListenerCA, dns: int,
                   require_peer: object) -> Iterator[Pebble]:
    """pebble, not started: a test starts it when the CA should be up."""
    assert callable(require_peer)
    require_peer("pebble")
    (challenge_port,) = free_ports(1)
    folder = tmp_path / "pebble"
    folder.mkdir()
    server = Pebble(folder, ca, dns, challenge_port)
    server.challenge_port = challenge_port  # type: ignore[attr-defined]
    yield server
    server.stop()


def write_config(data: Path, pebble: Pebble, ca: ListenerCA) -> None:
    port = pebble.challenge_port  # type: ignore[attr-defined]
    (data / "postroom.toml").write_text(
        f'hostname = "{NAME}"\ndomains = ["example.test"]\n'
        '[listen]\nsubmissions = "127.0.0.1:0"\nsubmission = "127.0.0.1:0"\n'
        f'[tls]\nacme = {{ directory = "{pebble.directory}", contact = "postmaster@example.test",'
        f' names = ["{NAME}"], challenge_listen = "127.0.0.1:{port}",'
        f' ca_bundle = "{ca.bundle}", retry_after = ["200ms", "400ms"] }}\n')


def pebble_trust(pebble: Pebble) -> ssl.SSLContext:
    """A client context that trusts pebble's issuing root only, and checks the name."""
    return ssl.create_default_context(cadata=pebble.issuing_root().decode("ascii"))


def served_certificate(running: Running, listener: str = "submissions") -> x509.Certificate:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP_SSL(*running.address(listener), timeout=10, context=context) as c:
        assert isinstance(c.sock, ssl.SSLSocket)
        der = c.sock.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def test_first_certificate_is_obtained_and_served(tmp_path: Path, pebble: Pebble,
                                                  ca: ListenerCA) -> None:
    write_config(tmp_path, pebble, ca)
    config = load_config(tmp_path)
    pebble.start()

    async def scenario() -> None:
        running = await start(config)
        try:
            keeper = running.acme
            assert keeper is not None
            await asyncio.wait_for(keeper.wait_for(lambda: keeper.issued == 1), WAIT)
            assert keeper.attempts == 1 and keeper.failures == 0
            served = await asyncio.to_thread(served_certificate, running)
            names = served.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            assert names.value.get_values_for_type(x509.DNSName) == [NAME]
            assert served.issuer != served.subject  # pebble's, no longer the stand-in
            # Verified as a mail client would: pebble's root, the host name.
            trust = await asyncio.to_thread(pebble_trust, pebble)
            await asyncio.to_thread(_verified_ehlo, trust, running.address("submissions")[1])
            assert (tmp_path / "acme" / "account-key.pem").stat().st_mode & 0o777 == 0o600
            assert config.tls.key.stat().st_mode & 0o777 == 0o600
        finally:
            await running.stop(grace=2)

    asyncio.run(scenario())


def _verified_ehlo(trust: ssl.SSLContext, port: int) -> None:
    """A client that checks the certificate against pebble's root and the name NAME."""
    raw = socket.create_connection((LOOPBACK, port), timeout=10)
    with trust.wrap_socket(raw, server_hostname=NAME) as tls:
        assert tls.recv(1024).startswith(b"220 ")
        tls.sendall(b"QUIT\r\n")
        assert tls.recv(1024).startswith(b"221 ")


def test_renewal_near_expiry_survives_the_ca_being_down_and_keeps_open_sessions(
        tmp_path: Path, pebble: Pebble, ca: ListenerCA) -> None:
    write_config(tmp_path, pebble, ca)
    config = load_config(tmp_path)
    now = datetime.datetime.now(datetime.UTC)
    # A 90-day certificate with one day left: within renew_before (30 days).
    ca.install(config.tls.cert, config.tls.key, [NAME], now - datetime.timedelta(days=89),
               now + datetime.timedelta(days=1))
    old_serial = x509.load_pem_x509_certificates(config.tls.cert.read_bytes())[0].serial_number
    open_store(config.store).users.add_user("smith@example.test", "smith-secret")

    async def scenario() -> None:
        running = await start(config)
        try:
            keeper = running.acme
            assert keeper is not None
            # The CA is down: attempts fail, are retried, and the old certificate stays.
            await asyncio.wait_for(keeper.wait_for(lambda: keeper.failures >= 2), WAIT)
            assert keeper.issued == 0
            served = await asyncio.to_thread(served_certificate, running)
            assert served.serial_number == old_serial
            # A client that connected before the renewal, mid-session when it lands.
            unverified = ssl.create_default_context()
            unverified.check_hostname = False
            unverified.verify_mode = ssl.CERT_NONE

            def connect_early() -> smtplib.SMTP:
                c = smtplib.SMTP(*running.address("submission"), timeout=10)
                c.starttls(context=unverified)
                c.login("smith@example.test", "smith-secret")
                c.mail("smith@example.test")
                assert c.rcpt("smith@example.test")[0] == 250
                return c

            early = await asyncio.to_thread(connect_early)
            await asyncio.to_thread(pebble.start)
            await asyncio.wait_for(keeper.wait_for(lambda: keeper.issued == 1), WAIT)
            served = await asyncio.to_thread(served_certificate, running)
            assert served.serial_number != old_serial and served.issuer != ca.cert.subject
            trust = await asyncio.to_thread(pebble_trust, pebble)
            await asyncio.to_thread(_verified_ehlo, trust, running.address("submissions")[1])

            def finish_early() -> None:
                assert isinstance(early.sock, ssl.SSLSocket)
                der = early.sock.getpeercert(binary_form=True)
                assert der is not None
                assert x509.load_der_x509_certificate(der).serial_number == old_serial
                code, _ = early.data(b"From: smith@example.test\r\nSubject: x\r\n\r\nbody\r\n")
                assert code == 250
                early.quit()

            await asyncio.to_thread(finish_early)
            assert keeper.failures == 0 and keeper.attempts >= 3
        finally:
            await running.stop(grace=2)

    asyncio.run(scenario())


def test_every_server_process_takes_the_new_certificate(tmp_path: Path, pebble: Pebble,
                                                         ca: ListenerCA) -> None:
    """`postroom serve` with two processes: the primary obtains the certificate, the
    worker sees the new files at a handshake; new clients get it from either."""
    port = pebble.challenge_port  # type: ignore[attr-defined]
    server = Postroom(
        tmp_path / "postroom", hostname=NAME, domains=["example.test"], listeners=(
            "smtp", "submissions"), workers=2,
        extra_toml=(f'[tls.acme]\ndirectory = "{pebble.directory}"\nnames = ["{NAME}"]\n'
                    f'challenge_listen = "127.0.0.1:{port}"\nca_bundle = "{ca.bundle}"\n'
                    'retry_after = ["200ms"]\n'))
    pebble.start()
    server.start()
    try:
        trust = pebble_trust(pebble)
        submissions = server.ports["submissions"]
        deadline = time.monotonic() + WAIT
        in_a_row = 0
        while in_a_row < 20:  # twenty new clients in a row verify it, whichever process
            assert time.monotonic() < deadline, server.output()
            try:
                _verified_ehlo(trust, submissions)
                in_a_row += 1
            except ssl.SSLCertVerificationError:
                in_a_row = 0
                time.sleep(0.1)
    finally:
        server.stop()
    loaded = re.findall(r"\[(\d+)\]: certificate loaded from", server.output())
    assert len(set(loaded)) == 2  # the primary, told; the worker, from the files
