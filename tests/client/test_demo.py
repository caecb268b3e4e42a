"""`postroom demo` runs the whole story in-process and leaves nothing behind; its DNS server
answers like an authoritative one; a failure, SIGTERM or Ctrl-C still stops everything."""

from __future__ import annotations

import asyncio
import errno
import io
import logging
import os
import re
import signal
import socket
from pathlib import Path
from typing import Any

import dns.asyncresolver
import dns.flags
import dns.message
import dns.nameserver
import dns.rcode
import dns.resolver
import pytest

from postroom import cli
from postroom.client import demo, send
from postroom.client.dnsdemo import Zone, mail_zone, start_dns


def listening_ports(output: str) -> list[tuple[str, int]]:
    """The (kind, port) pairs the demo said it used, from its setting-up lines."""
    setup = output.split("\n1. ")[0].splitlines()
    return [("udp" if "(UDP)" in line else "tcp", int(port))
            for line in setup for port in re.findall(r"127\.0\.0\.1:(\d+)", line)]


def assert_nothing_left(output: str) -> None:
    ports = listening_ports(output)
    assert {kind for kind, _ in ports} == {"udp", "tcp"}
    assert len(ports) == 4  # DNS, submission, SMTP, POP3
    for kind, port in ports:
        if kind == "tcp":
            with socket.socket() as s:
                assert s.connect_ex(("127.0.0.1", port)) == errno.ECONNREFUSED, port
        else:  # a UDP port nobody holds can be bound again
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind(("127.0.0.1", port))
    folder = re.search(r"Setting up in (\S+)", output)
    assert folder is not None
    assert not Path(folder.group(1)).exists()
    assert not any(isinstance(h, demo.LogTap) for h in logging.getLogger("postroom").handlers)


def test_demo_tells_the_story_and_leaves_nothing_running() -> None:
    out = io.StringIO()
    assert demo.run_demo(out=out) == 0, out.getvalue()
    text = out.getvalue()
    steps = [re.search(rf"^{n}\. ", text, re.MULTILINE) for n in ("1", "2", "3", "4", "5a", "5b")]
    assert all(steps), text
    starts = [m.start() for m in steps if m]
    assert starts == sorted(starts)
    assert re.search(r"corp\.example MX\?\s+->\s+MX 10 mx\.corp\.example\.", text)
    assert "C: STARTTLS" in text and "TLSv1" in text
    assert "C: AUTH" in text and "hidden" in text
    assert "status=queued" in text and "status=sent" in text and "relay=local" in text
    assert "554 5.7.1" in text and "Relay access denied" in text
    for state in ("Authentication state", "Transaction state", "Update state"):
        assert state in text
    assert "maildrop on mx.corp.example: empty" in text
    # Ends with the message as received, its path, and the verdict.
    tail = text[text.index("The message as the boss received it"):]
    assert "  | .signed off by accounting" in tail
    assert "by    mail.isp.example (postroom)" in tail and "with  ESMTPSA (TLS, AUTH)" in tail
    assert "by    mx.corp.example (postroom)" in tail and "with  ESMTPS (TLS)" in tail
    assert text.rstrip().splitlines()[-2].startswith("OK: ")
    assert "\033[" not in text  # no colours when the output is not a terminal
    assert_nothing_left(text)


def test_cli_demo_keep_data_leaves_the_folder(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["demo", "--keep-data"]) == 0
    out = capsys.readouterr().out
    kept = re.search(r"kept the demo's folder: (\S+)", out)
    assert kept is not None
    folder = Path(kept.group(1))
    try:
        assert (folder / "isp" / "postroom.toml").is_file()
        assert (folder / "corp" / "mail" / "corp.example" / "boss").is_dir()
        (download,) = (folder / "boss-laptop" / "new").iterdir()
        assert cli.main(["trace", str(download)]) == 0
        traced = capsys.readouterr().out
        assert "2 hops, oldest first" in traced and "ESMTPSA (TLS, AUTH)" in traced
        assert "queue: " in (folder / "postroom.log").read_text()
    finally:
        import shutil

        shutil.rmtree(folder)


def test_a_failing_step_says_so_and_still_cleans_up(monkeypatch: pytest.MonkeyPatch) -> None:
    async def refused(*args: Any, **kwargs: Any) -> None:
        raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")

    monkeypatch.setattr(send, "submit", refused)
    out = io.StringIO()
    assert demo.run_demo(out=out) == demo.EXIT_FAILED
    assert "FAILED: ConnectionRefusedError" in out.getvalue()
    assert_nothing_left(out.getvalue())


@pytest.mark.parametrize(
    ("signum", "status"),
    [(signal.SIGTERM, demo.EXIT_TERMINATED), (signal.SIGINT, demo.EXIT_INTERRUPTED)],
)
def test_a_signal_mid_story_stops_everything(
    monkeypatch: pytest.MonkeyPatch, signum: int, status: int
) -> None:
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("SIGINT is not Python's default here; asyncio would not turn it into Ctrl-C")

    async def interrupted(*args: Any, **kwargs: Any) -> None:
        os.kill(os.getpid(), signum)
        await asyncio.sleep(30)

    monkeypatch.setattr(send, "submit", interrupted)
    out = io.StringIO()
    assert demo.run_demo(out=out) == status
    assert "stopped the servers it started" in out.getvalue()
    assert_nothing_left(out.getvalue())
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


# -- the POP3 trace split by state ------------------------------------------------------


def test_pop3_states_user_pass() -> None:
    lines = ["S: +OK ready", "C: STLS", "S: +OK go", "TLS: TLSv1.3", "C: USER b", "S: +OK",
             "C: PASS (hidden)", "S: +OK 1 message", "C: STAT", "S: +OK 1 9", "C: QUIT",
             "S: +OK bye"]
    auth, transaction, update = demo._pop3_states(lines)
    assert auth[-2:] == ["C: PASS (hidden)", "S: +OK 1 message"]
    assert transaction == ["C: STAT", "S: +OK 1 9"]
    assert update == ["C: QUIT", "S: +OK bye"]


def test_pop3_states_failed_login_stays_in_authentication() -> None:
    lines = ["S: +OK ready", "C: AUTH PLAIN (credentials hidden)", "S: -ERR no", "C: QUIT",
             "S: +OK bye"]
    auth, transaction, update = demo._pop3_states(lines)
    assert auth == lines and transaction == [] and update == []


# -- the DNS server ---------------------------------------------------------------------


async def resolve(port: int, name: str, rdtype: str) -> dns.resolver.Answer:
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = [dns.nameserver.Do53Nameserver("127.0.0.1", port)]
    resolver.lifetime = 5
    return await resolver.resolve(name, rdtype, raise_on_no_answer=False)


def test_dns_server_answers_mx_a_nodata_nxdomain_refused() -> None:
    async def scenario() -> None:
        server = await start_dns(mail_zone("corp.example", "mx.corp.example", "127.0.0.1"))
        port = server.address[1]
        try:
            mx = await resolve(port, "corp.example", "MX")
            assert mx.response.flags & dns.flags.AA
            assert [(r.preference, r.exchange.to_text()) for r in mx] == [
                (10, "mx.corp.example.")]
            assert [r.address for r in await resolve(port, "mx.corp.example", "A")] == [
                "127.0.0.1"]
            nodata = await resolve(port, "mx.corp.example", "AAAA")
            assert nodata.rrset is None
            assert nodata.response.authority[0].rdtype == dns.rdatatype.SOA  # RFC 2308 3
            with pytest.raises(dns.resolver.NXDOMAIN):
                await resolve(port, "nobody.corp.example", "A")
            with pytest.raises(dns.resolver.NoNameservers):  # REFUSED: not our zone
                await resolve(port, "example.org", "A")
            assert [(q.qname, q.qtype, q.rcode) for q in server.queries] == [
                ("corp.example", "MX", "NOERROR"), ("mx.corp.example", "A", "NOERROR"),
                ("mx.corp.example", "AAAA", "NOERROR"),
                ("nobody.corp.example", "A", "NXDOMAIN"), ("example.org", "A", "REFUSED")]
            assert server.queries[0].records == ("corp.example. 300 IN MX 10 mx.corp.example.",)
        finally:
            server.close()

    asyncio.run(scenario())


def test_dns_server_drops_garbage_and_responses() -> None:
    from postroom.client.dnsdemo import DemoDNS

    server = DemoDNS(mail_zone("corp.example", "mx.corp.example", "127.0.0.1"))
    assert server.answer(b"\x00\x01junk") is None
    query = dns.message.make_query("corp.example", "MX")
    response = dns.message.make_response(query)
    assert server.answer(response.to_wire()) is None
    reply = server.answer(query.to_wire())
    assert reply is not None
    assert dns.message.from_wire(reply).rcode() == dns.rcode.NOERROR


def test_empty_non_terminal_is_nodata_not_nxdomain() -> None:
    zone = Zone("example", {("a.b.example", "A"): ["192.0.2.1"]})
    response, note = zone.respond(dns.message.make_query("b.example", "A"))
    assert response.rcode() == dns.rcode.NOERROR and not response.answer
    assert note is not None and note.rcode == "NOERROR"
    with pytest.raises(ValueError, match="outside the zone"):
        Zone("example", {("corp.test", "A"): ["192.0.2.1"]})
