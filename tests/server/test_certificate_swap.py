"""The listeners' certificate is replaced while they run: new handshakes get the new one,
sessions already encrypted keep theirs (server.tls.CertificateHolder)."""

from __future__ import annotations

import asyncio
import poplib
import smtplib
import ssl
from pathlib import Path

import pytest
from cryptography import x509

from postroom.config import load_config
from postroom.server.main import start
from postroom.server.tls import CERT_CHECK_SECONDS, CertificateHolder
from postroom.store.atomic import atomic_write
from postroom.tlscert import make_self_signed


def unverified() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def peer_name(sock: object) -> str:
    """The common name of the certificate the server showed on `sock` (an SSLSocket)."""
    assert isinstance(sock, ssl.SSLSocket)
    return common_name(sock.getpeercert(binary_form=True))


def common_name(der: bytes | None) -> str:
    assert der is not None
    names = x509.load_der_x509_certificate(der).subject
    return str(names.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value)


def replace_pair(cert: Path, key: Path, hostname: str) -> None:
    """As the ACME client stores a new pair: the key first, each file renamed in."""
    cert_pem, key_pem = make_self_signed(hostname)
    atomic_write(key, key_pem, mode=0o600)
    atomic_write(cert, cert_pem, mode=0o644)


def handshake(context: ssl.SSLContext) -> str:
    """A client handshake with `context` on memory buffers: the server's common name."""
    client_in, client_out, server_in, server_out = (ssl.MemoryBIO() for _ in range(4))
    client = unverified().wrap_bio(client_in, client_out)
    server = context.wrap_bio(server_in, server_out, server_side=True)
    for _ in range(10):
        for side in (client, server):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                pass
        server_in.write(client_out.read())
        client_in.write(server_out.read())
    return common_name(client.getpeercert(binary_form=True))


def test_every_listener_takes_the_new_certificate_and_open_sessions_keep_theirs(
        tmp_path: Path) -> None:
    (tmp_path / "postroom.toml").write_text(
        'hostname = "old.example"\ndomains = ["isp.example"]\n[listen]\n'
        'submission = "127.0.0.1:0"\nsubmissions = "127.0.0.1:0"\n'
        'pop3 = "127.0.0.1:0"\npop3s = "127.0.0.1:0"\n')
    config = load_config(tmp_path)

    async def scenario() -> None:
        running = await start(config)
        try:
            def before() -> smtplib.SMTP:
                c = smtplib.SMTP_SSL(*running.address("submissions"), timeout=10,
                                     context=unverified())
                c.ehlo("client.example")
                return c

            early = await asyncio.to_thread(before)
            assert peer_name(early.sock) == "old.example"
            replace_pair(config.tls.cert, config.tls.key, "new.example")
            assert running.reload_certificate()

            def after() -> list[str]:
                seen = []
                with smtplib.SMTP_SSL(*running.address("submissions"), timeout=10,
                                      context=unverified()) as c:
                    seen.append(peer_name(c.sock))
                with smtplib.SMTP(*running.address("submission"), timeout=10) as c:
                    c.starttls(context=unverified())
                    seen.append(peer_name(c.sock))
                implicit = poplib.POP3_SSL(*running.address("pop3s"), timeout=10,
                                           context=unverified())
                seen.append(peer_name(implicit.sock))
                implicit.quit()
                stls = poplib.POP3(*running.address("pop3"), timeout=10)
                stls.stls(context=unverified())
                seen.append(peer_name(stls.sock))
                stls.quit()
                # The session begun before the swap goes on, on its own certificate.
                assert early.noop()[0] == 250
                assert peer_name(early.sock) == "old.example"
                early.quit()
                return seen

            assert await asyncio.to_thread(after) == ["new.example"] * 4
        finally:
            await running.stop(grace=2)

    asyncio.run(scenario())


def test_a_changed_file_is_seen_at_a_handshake_without_being_told(tmp_path: Path) -> None:
    """Other processes learn of a new certificate from the files: at the first
    handshake CERT_CHECK_SECONDS after the last look."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    replace_pair(cert, key, "old.example")
    now = [100.0]
    holder = CertificateHolder(cert, key, clock=lambda: now[0])
    assert handshake(holder.context) == "old.example"
    replace_pair(cert, key, "new.example")
    assert handshake(holder.context) == "old.example"  # not looked yet
    now[0] += CERT_CHECK_SECONDS
    assert handshake(holder.context) == "new.example"


def test_a_pair_that_does_not_match_keeps_the_one_in_use(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    replace_pair(cert, key, "old.example")
    holder = CertificateHolder(cert, key)
    _other_cert, other_key = make_self_signed("other.example")
    atomic_write(key, other_key, mode=0o600)  # the key changed, its certificate not yet
    assert not holder.reload_certificate()
    assert handshake(holder.context) == "old.example"


@pytest.mark.parametrize("missing", ["cert", "key"])
def test_a_missing_file_keeps_the_one_in_use(tmp_path: Path, missing: str) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    replace_pair(cert, key, "old.example")
    holder = CertificateHolder(cert, key)
    (cert if missing == "cert" else key).unlink()
    assert not holder.reload_certificate()
    holder.check_files()
    assert handshake(holder.context) == "old.example"
