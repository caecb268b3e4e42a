"""rspamd's DMARC verdicts on the same messages, from the same client, agree with ours.

rspamd 3.4 runs as in PEERS.md (no Redis, test DNS only), asked with `rspamc`
for each message with the client IP, HELO and MAIL FROM; postroom's checks
run on the same message against the same DNS server. The domains are RFC 2606
names under real top-level domains: rspamd finds no organizational domain
under a suffix its list lacks (.test), so it would skip sp= and relaxed
alignment there (all names are answered by the test DNS server alone).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator

import pytest
from dnszone import TestDNS, serve_dns
from signing import rsa_key, sign

from postroom.config.values import Endpoint
from postroom.mailauth.checks import MailChecks
from postroom.resolver import make_resolver

pytestmark = [pytest.mark.interop, pytest.mark.slow]

KEY = rsa_key("example.net", "k1")
ZONE = {
    ("example.net", "TXT"): ["v=spf1 ip4:192.0.2.1 -all"],
    ("_dmarc.example.net", "TXT"): ["v=DMARC1; p=reject; sp=quarantine"],
    (KEY.name, "TXT"): [KEY.record],
    ("esp.example.com", "TXT"): ["v=spf1 ip4:203.0.113.0/24 -all"],
    ("example.org", "TXT"): ["v=spf1 ip4:192.0.2.1 -all"],
    ("_dmarc.example.org", "TXT"): ["v=DMARC1; p=quarantine"],
    ("bounce.example.net", "TXT"): ["v=spf1 ip4:192.0.2.1 -all"],
    ("norecord.example.com", "TXT"): ["v=spf1 ip4:192.0.2.1 -all"],
}
# Modules that need Redis or the Internet (PEERS.md).
DISABLED = ("fuzzy_check", "rbl", "asn", "greylist", "ratelimit", "replies", "neural",
            "history_redis", "url_redirector", "reputation", "metadata_exporter", "phishing",
            "emails", "surbl", "dkim_signing", "arc", "mx_check", "external_services")
READY_SECONDS = 180  # the first start compiles hyperscan databases


def message(sender: str, subject: str) -> bytes:
    return (f"From: {sender}\r\nTo: boss@corp.example\r\nSubject: {subject}\r\n"
            f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}\r\n"
            f"Message-ID: <{subject.replace(' ', '-')}@x>\r\n\r\nThe text.\r\n").encode()


# (name, client IP, MAIL FROM, message)
CASES = [
    ("forged, p=reject", "198.51.100.7", "ceo@example.net",
     message("ceo@example.net", "forged")),
    ("aligned via SPF only", "192.0.2.1", "alice@example.net",
     message("alice@example.net", "spf only")),
    ("aligned via SPF of a subdomain", "192.0.2.1", "b@bounce.example.net",
     message("alice@example.net", "relaxed spf")),
    ("aligned via DKIM only", "203.0.113.9", "bounce@esp.example.com",
     sign(message("news@example.net", "dkim only"), KEY)),
    ("DKIM broken, SPF unaligned", "203.0.113.9", "bounce@esp.example.com",
     sign(message("news@example.net", "broken"), KEY).replace(b"The text.", b"Changed.")),
    ("p=quarantine, neither", "198.51.100.7", "x@example.org", message("x@example.org", "q")),
    ("subdomain policy", "198.51.100.7", "x@news.example.net",
     message("x@news.example.net", "sub")),
    ("no DMARC record", "198.51.100.7", "x@norecord.example.com",
     message("x@norecord.example.com", "n")),
]

RSPAMD_VERDICT = {
    "DMARC_POLICY_ALLOW": "pass", "DMARC_POLICY_ALLOW_WITH_FAILURES": "pass",
    "DMARC_POLICY_REJECT": "fail", "DMARC_POLICY_QUARANTINE": "fail",
    "DMARC_POLICY_SOFTFAIL": "fail", "DMARC_NA": "none", "DMARC_DNSFAIL": "temperror",
    "DMARC_BAD_POLICY": "permerror",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def dns_server() -> Iterator[TestDNS]:
    with serve_dns(ZONE) as server:
        yield server


@pytest.fixture(scope="module")
def rspamd(require_peer: Callable[..., str], dns_server: TestDNS,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The address of a running rspamd's normal worker."""
    program = require_peer("rspamd")
    require_peer("rspamc")
    w = tmp_path_factory.mktemp("rspamd")
    local = w / "local"
    for sub in ("override.d", "local.d"):
        (local / sub).mkdir(parents=True)
    for sub in ("db", "run", "log"):
        (w / sub).mkdir()
    normal, controller, proxy = free_port(), free_port(), free_port()
    (local / "override.d" / "worker-normal.inc").write_text(
        f'bind_socket = "127.0.0.1:{normal}";\n')
    (local / "override.d" / "worker-controller.inc").write_text(
        f'bind_socket = "127.0.0.1:{controller}";\n')
    (local / "override.d" / "worker-proxy.inc").write_text(
        f'bind_socket = "127.0.0.1:{proxy}";\nmilter = yes;\n'
        f'upstream "local" {{ default = yes; hosts = "127.0.0.1:{normal}"; }}\n')
    (local / "local.d" / "options.inc").write_text(
        f'dns {{ nameserver = ["127.0.0.1:{dns_server.port}"]; }}\n')
    for module in DISABLED:
        (local / "local.d" / f"{module}.conf").write_text("enabled = false;\n")
    log = open(w / "rspamd.out", "wb")  # noqa: SIM115 - closed in the finalizer
    process = subprocess.Popen(
        [program, "-f", "-i", "-u", "root", "-g", "root", "-c", "/etc/rspamd/rspamd.conf",
         f"--var=LOCAL_CONFDIR={local}", f"--var=DBDIR={w / 'db'}",
         f"--var=RUNDIR={w / 'run'}", f"--var=LOGDIR={w / 'log'}"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + READY_SECONDS
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{normal}/ping", timeout=2) as r:
                    if r.read().strip() == b"pong":
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail("rspamd did not start: " + (w / "rspamd.out").read_text()[-2000:])
            time.sleep(0.2)  # polling a readiness URL; no event to wait on
        yield f"127.0.0.1:{normal}"
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


def rspamd_dmarc(address: str, ip: str, mail_from: str, data: bytes) -> str:
    out = subprocess.run(
        ["rspamc", "-h", address, "-i", ip, "-F", mail_from, "--helo", "mx.stranger.test",
         "-r", "boss@corp.example"], input=data, capture_output=True, check=True, timeout=60,
    ).stdout.decode()
    found = [RSPAMD_VERDICT[s] for s in re.findall(r"Symbol: (DMARC_\w+)", out)
             if s in RSPAMD_VERDICT]
    assert len(found) == 1, out
    return found[0]


def our_dmarc(server: TestDNS, ip: str, mail_from: str, data: bytes) -> str:
    async def go() -> str:
        checks = MailChecks(make_resolver([Endpoint("127.0.0.1", server.port)], lifetime=5.0),
                            "mx.corp.example")
        one = checks.start(ip, "mx.stranger.test", mail_from)
        assert one is not None
        one.feed(data)
        verdict = await one.finish(["corp.example"])
        [result] = verdict.dmarc or [None]
        return result.result if result is not None else "none"
    return asyncio.run(go())


@pytest.mark.parametrize(("ip", "mail_from", "data"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_rspamd_agrees_on_dmarc(rspamd: str, dns_server: TestDNS, ip: str, mail_from: str,
                                data: bytes) -> None:
    assert our_dmarc(dns_server, ip, mail_from, data) == rspamd_dmarc(rspamd, ip, mail_from,
                                                                       data)

