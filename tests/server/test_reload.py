"""Reload without downtime (server/reload.py): under a load of SMTP and POP3 sessions, SIGHUP and
`postroom reload` put a new user, domain, certificate and listener in force at once, no session
fails, sessions in progress keep their config, and a broken config changes nothing."""

from __future__ import annotations

import hashlib
import signal
import smtplib
import ssl
import sys
from pathlib import Path

import pytest
from serving import (
    Load,
    Server,
    client_context,
    message,
    message_ids,
    peer_certificate,
    postroom,
    running,
)

from inprocess import free_port
from postroom.tlscert import make_self_signed

pytestmark = [pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork, pidfd"),
              pytest.mark.slow]


def write_pair(folder: Path, name: str) -> tuple[Path, Path]:
    cert, key = make_self_signed("mx.corp.example")
    (folder / f"{name}.pem").write_bytes(cert)
    (folder / f"{name}.key").write_bytes(key)
    return folder / f"{name}.pem", folder / f"{name}.key"


def config_text(listen: dict[str, int], domains: list[str], cert: Path, key: Path,
                extra: str = "") -> str:
    lines = ['hostname = "mx.corp.example"', f"domains = {domains!r}".replace("'", '"'),
             "workers = 3", extra, "[listen]"]
    lines += [f'{name} = "127.0.0.1:{port}"' for name, port in listen.items()]
    lines += ["[tls]", f'cert = "{cert}"', f'key = "{key}"']
    return "\n".join(lines) + "\n"


def fingerprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def stls_certificate(port: int) -> bytes:
    import poplib

    client = poplib.POP3("127.0.0.1", port, timeout=10)
    try:
        client.stls(client_context())
        der = client.sock.getpeercert(binary_form=True)  # type: ignore[attr-defined]
        assert der is not None
        return der
    finally:
        client.quit()


def test_reload_under_load_brings_new_user_domain_certificate_and_listener(
        tmp_path: Path) -> None:
    data = tmp_path / "var"
    data.mkdir()
    old_cert, old_key = write_pair(tmp_path, "old")
    new_cert, new_key = write_pair(tmp_path, "new")
    smtp, pop3, pop3s = free_port(), free_port(), free_port()
    config = data / "postroom.toml"
    config.write_text(config_text({"smtp": smtp, "pop3": pop3}, ["corp.example"], old_cert,
                                  old_key))
    for user in ("boss@corp.example", "pat@corp.example"):
        postroom("user", "add", user, "--password-stdin", data=data, stdin=b"pw\n")
    with running(Server(data).ready()) as server:
        primary = server.proc.pid
        load = Load(smtp, pop3).start(senders=3, readers=2)
        try:
            load.wait_for(acknowledged=10, pop3=2)
            # A session that began under the old config: EHLO done before the reload.
            early = smtplib.SMTP("127.0.0.1", smtp, timeout=30)
            early.ehlo("early.example")
            # The new config: a domain, a certificate, a listener; then a user in it.
            config.write_text(config_text({"smtp": smtp, "pop3": pop3, "pop3s": pop3s},
                                          ["corp.example", "new.example"], new_cert, new_key))
            postroom("user", "add", "carol@new.example", "--password-stdin", data=data,
                     stdin=b"carol-pw\n")
            answer = postroom("reload", data=data)
            assert b"reloaded" in answer.stdout
            # At once: the new listener, with the new certificate; the kept one too.
            assert fingerprint(peer_certificate(pop3s)) == fingerprint(new_cert_der(new_cert))
            assert fingerprint(stls_certificate(pop3)) == fingerprint(new_cert_der(new_cert))
            # At once: the new domain and its user, on a fresh connection.
            mid, data_bytes = message(1, "carol")
            with smtplib.SMTP("127.0.0.1", smtp, timeout=30) as fresh:
                fresh.sendmail("someone@client.example", ["carol@new.example"], data_bytes)
            import poplib

            reader = poplib.POP3_SSL("127.0.0.1", pop3s, timeout=30, context=client_context())
            reader.user("carol@new.example")
            reader.pass_("carol-pw")
            assert reader.stat()[0] == 1
            reader.quit()
            # The early session keeps the config it started with: new.example is not
            # local there, so its RCPT is refused (relay denied), while its mail to
            # boss goes through.
            assert early.mail("a@client.example")[0] == 250
            code, _ = early.rcpt("carol@new.example")
            assert code in (550, 554), code
            early.rset()
            early_mid, early_bytes = message(1, "early")
            early.sendmail("a@client.example", ["boss@corp.example"], early_bytes)
            early.quit()
            load.acknowledged.append(early_mid)
            before = len(load.acknowledged)
            load.wait_for(acknowledged=before + 10, pop3=load.pop3_sessions + 2)
            # SIGHUP does the same as `postroom reload` (here with nothing new).
            server.proc.send_signal(signal.SIGHUP)
            server.wait_for(r"configuration 3 in force")
            load.wait_for(acknowledged=len(load.acknowledged) + 5)
        finally:
            load.stop()
        assert load.errors == []
        assert server.proc.pid == primary and server.proc.poll() is None
        server.wait_for(r"worker \d+ of the previous configuration exited with status 0",
                        count=2)
    boss = data / "mail" / "corp.example" / "boss"
    assert set(load.acknowledged) <= message_ids(boss)
    assert mid in message_ids(data / "mail" / "new.example" / "carol")


def new_cert_der(path: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(path.read_text())


def test_a_broken_config_is_refused_with_the_start_error_and_changes_nothing(
        tmp_path: Path) -> None:
    data = tmp_path / "var"
    data.mkdir()
    cert, key = write_pair(tmp_path, "cert")
    smtp, pop3 = free_port(), free_port()
    config = data / "postroom.toml"
    good = config_text({"smtp": smtp, "pop3": pop3}, ["corp.example"], cert, key)
    config.write_text(good)
    postroom("user", "add", "boss@corp.example", "--password-stdin", data=data, stdin=b"pw\n")
    with running(Server(data).ready()) as server:
        workers = server.wait_for(r"started \d+ worker process")
        broken = good.replace('[listen]', '[listen]\nsubmision = "127.0.0.1:1"')
        config.write_text(broken)
        # What a start says about this file (the lock is taken later than the config
        # is read, so a second `serve` shows the start's error).
        start = postroom("serve", data=data, check=False)
        assert start.returncode == 2
        start_error = start.stderr.decode().strip().removeprefix("postroom: error: ")
        assert "listen.submision: unknown key" in start_error
        refused = postroom("reload", data=data, check=False)
        assert refused.returncode == 2
        assert refused.stderr.decode().strip() == (
            f"postroom: error: reload refused, the configuration in force stays: {start_error}")
        server.proc.send_signal(signal.SIGHUP)
        server.wait_for(r"reload refused", count=2)
        # A port taken by another program: refused as a start is, and nothing changes.
        import socket

        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            busy = taken.getsockname()[1]
            config.write_text(good.replace("[listen]", f'[listen]\npop3s = "127.0.0.1:{busy}"'))
            refused = postroom("reload", data=data, check=False)
            assert b"listen.pop3s: cannot listen on 127.0.0.1:%d: address already in use" % busy \
                in refused.stderr
        # Nothing changed: the same workers, the same listeners, mail flows.
        assert "reload: started worker" not in server.log()
        mid, body = message(1, "after")
        with smtplib.SMTP("127.0.0.1", smtp, timeout=30) as client:
            client.sendmail("a@client.example", ["boss@corp.example"], body)
        assert workers
    assert mid in message_ids(data / "mail" / "corp.example" / "boss")
