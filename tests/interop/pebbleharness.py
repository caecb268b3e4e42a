"""pebble, the ACME test CA, on loopback: its own listener CA, a test DNS, start and stop.

Debian's pebble ships no certificate for its HTTPS listener, so `ListenerCA`
makes a small CA and a 127.0.0.1/localhost certificate (PEERS.md); clients
trust that CA for the ACME API. pebble checks HTTP-01 challenges on
`http_port` of each name, found through the test DNS (dnsmasq). Its issuing
root is new at every start: `issuing_root()` fetches it from the management
listener, so tests can verify what it issued.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import socket
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from mailharness import LOOPBACK, HarnessError, free_ports

from postroom.store.atomic import atomic_write

START_SECONDS = 20.0


def _name(text: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class ListenerCA:
    """A CA of the test's own: pebble's HTTPS listener certificate, and any certificate a
    test wants to stand in as an old one (`issue`)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder().subject_name(_name("postroom test CA"))
            .issuer_name(_name("postroom test CA")).public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256()))
        self.bundle = folder / "test-ca.pem"
        self.bundle.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, names: list[str], not_before: datetime.datetime,
              not_after: datetime.datetime) -> tuple[bytes, bytes]:
        """A leaf certificate for `names` (DNS names or IP addresses): (cert PEM, key PEM)."""
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = []
        for name in names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                sans.append(x509.DNSName(name))
        cert = (
            x509.CertificateBuilder().subject_name(_name(names[0]))
            .issuer_name(self.cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before).not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .sign(self.key, hashes.SHA256()))
        return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)

    def install(self, cert: Path, key: Path, names: list[str],
                not_before: datetime.datetime, not_after: datetime.datetime) -> None:
        cert_pem, key_pem = self.issue(names, not_before, not_after)
        cert.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(key, key_pem, mode=0o600)
        atomic_write(cert, cert_pem + self.cert.public_bytes(serialization.Encoding.PEM))


class Pebble:
    """pebble on 127.0.0.1 (ACME API on `port`, management on `management_port`)."""

    def __init__(self, folder: Path, ca: ListenerCA, dns_port: int, http_port: int) -> None:
        self.folder = folder
        self.port, self.management_port, tls_port = free_ports(3)
        cert, key = ca.issue(["localhost", LOOPBACK], datetime.datetime.now(datetime.UTC)
                             - datetime.timedelta(days=1),
                             datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=30))
        (folder / "pebble-cert.pem").write_bytes(cert)
        (folder / "pebble-key.pem").write_bytes(key)
        self.config = folder / "pebble.json"
        self.config.write_text(json.dumps({"pebble": {
            "listenAddress": f"{LOOPBACK}:{self.port}",
            "managementListenAddress": f"{LOOPBACK}:{self.management_port}",
            "certificate": str(folder / "pebble-cert.pem"),
            "privateKey": str(folder / "pebble-key.pem"),
            "httpPort": http_port, "tlsPort": tls_port,
            "ocspResponderURL": "", "externalAccountBindingRequired": False}}))
        self.dns_port = dns_port
        self.trust = ssl.create_default_context(cafile=str(ca.bundle))
        self.process: subprocess.Popen[bytes] | None = None
        self.log = folder / "pebble.log"

    @property
    def directory(self) -> str:
        return f"https://{LOOPBACK}:{self.port}/dir"

    def start(self) -> None:
        env = {**os.environ, "PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0"}
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                ["pebble", "-config", str(self.config), "-dnsserver",
                 f"{LOOPBACK}:{self.dns_port}"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                with urllib.request.urlopen(self.directory, context=self.trust, timeout=2):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise HarnessError(f"pebble did not start:\n{self.log.read_text()[-2000:]}")

    def issuing_root(self) -> bytes:
        """The root pebble signs with since its last start (PEM)."""
        url = f"https://{LOOPBACK}:{self.management_port}/roots/0"
        with urllib.request.urlopen(url, context=self.trust, timeout=10) as answer:
            return bytes(answer.read())

    def stop(self) -> None:
        """Stop pebble and wait until its port takes no connections."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


def refused(port: int) -> bool:
    """Nothing listens on 127.0.0.1:`port`."""
    try:
        socket.create_connection((LOOPBACK, port), timeout=1).close()
    except OSError:
        return True
    return False
