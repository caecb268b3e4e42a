"""DNS servers on loopback for routing tests: dnsmasq (a real peer) and a scriptable fake.

dnsmasq serves MX and address records from its command line but cannot serve
a null MX (RFC 7505) or misbehave on purpose, so `fake_dns` is a small
authoritative server built on dnspython's message API: it answers from a table
and can answer NXDOMAIN, SERVFAIL, or nothing at all (a timeout) for chosen
names. Both run on 127.0.0.1 at a free port and stop at teardown.
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest

NEGATIVE_TTL = 60  # the SOA minimum of the fake zone: how long "no such record" is cached


@dataclass
class FakeDNS:
    """An authoritative DNS server for every name, answering from `records`.

    A name that has records of any type (or is listed in `names`) exists; a
    query for a type it lacks gets an empty NOERROR answer. Other names are
    NXDOMAIN. Names (or (name, type) pairs) in `servfail` get SERVFAIL; those
    in `drop` get no answer at all.
    """

    port: int = 0
    ttl: int = 60
    records: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    ttls: dict[tuple[str, str], int] = field(default_factory=dict)
    names: set[str] = field(default_factory=set)
    # A name (every type) or a (name, type) pair: answer SERVFAIL / do not answer.
    servfail: set[str | tuple[str, str]] = field(default_factory=set)
    drop: set[str | tuple[str, str]] = field(default_factory=set)
    queries: list[tuple[str, str]] = field(default_factory=list)

    def add(self, name: str, rdtype: str, *values: str, ttl: int | None = None) -> None:
        key = (name.lower().rstrip("."), rdtype.upper())
        self.records.setdefault(key, []).extend(values)
        if ttl is not None:
            self.ttls[key] = ttl

    def answer(self, request: dns.message.Message) -> dns.message.Message | None:
        question = request.question[0]
        name = question.name.to_text(omit_final_dot=True).lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        self.queries.append((name, rdtype))
        if name in self.drop or (name, rdtype) in self.drop:
            return None
        response = dns.message.make_response(request)
        response.flags |= dns.flags.AA
        if name in self.servfail or (name, rdtype) in self.servfail:
            response.set_rcode(dns.rcode.SERVFAIL)
            return response
        values = self.records.get((name, rdtype))
        if values:
            ttl = self.ttls.get((name, rdtype), self.ttl)
            response.answer.append(
                dns.rrset.from_text_list(question.name, ttl, "IN", rdtype, values)
            )
            return response
        exists = name in self.names or any(n == name for n, _ in self.records)
        if not exists:
            response.set_rcode(dns.rcode.NXDOMAIN)
        # RFC 2308 3: a negative answer carries the zone's SOA; its minimum is the
        # negative TTL.
        soa = f"ns.test. hostmaster.test. 1 3600 600 86400 {NEGATIVE_TTL}"
        response.authority.append(
            dns.rrset.from_text(dns.name.root, NEGATIVE_TTL, "IN", "SOA", soa)
        )
        return response


def _serve(server: FakeDNS, sock: socket.socket, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            wire, client = sock.recvfrom(65535)
        except TimeoutError:
            continue
        except OSError:
            return
        try:
            request = dns.message.from_wire(wire)
        except Exception:  # a malformed packet gets no answer, as from a real server
            continue
        response = server.answer(request)
        if response is not None:
            sock.sendto(response.to_wire(), client)


@pytest.fixture
def fake_dns() -> Iterator[FakeDNS]:
    """A FakeDNS answering on 127.0.0.1:<fake_dns.port> (UDP) in a thread."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.1)
    server = FakeDNS(port=sock.getsockname()[1])
    stop = threading.Event()
    thread = threading.Thread(target=_serve, args=(server, sock, stop), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        stop.set()
        thread.join(timeout=5)
        sock.close()


def _free_port() -> int:
    # dnsmasq listens on UDP and TCP at the same port; a port free for both is wanted.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
        tcp.bind(("127.0.0.1", 0))
        port = int(tcp.getsockname()[1])
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", port))
    return port


def _answers(port: int) -> bool:
    query = dns.message.make_query("ready.invalid", "A")
    try:
        dns.query.udp(query, "127.0.0.1", port=port, timeout=0.2)
    except (dns.exception.Timeout, OSError):
        return False
    return True


@pytest.fixture
def dnsmasq(
    require_peer: Callable[..., str], tmp_path: Path
) -> Iterator[Callable[..., int]]:
    """Start dnsmasq with extra options (--mx-host=..., --host-record=...); returns its port.

    It serves only what the options say: no upstream, no /etc/hosts, no config file.
    """
    program = require_peer("dnsmasq")
    processes: list[subprocess.Popen[bytes]] = []
    log = tmp_path / "dnsmasq.log"

    def start(*options: str) -> int:
        for _ in range(5):
            port = _free_port()
            with open(log, "ab") as err:
                process = subprocess.Popen(
                    [
                        program, "--keep-in-foreground", "--no-resolv", "--no-hosts",
                        "--conf-file=/dev/null", "--pid-file=", f"--port={port}",
                        "--listen-address=127.0.0.1", "--bind-interfaces",
                        "--log-facility=-", *options,
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                )
            processes.append(process)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and process.poll() is None:
                if _answers(port):
                    return port
                time.sleep(0.05)
            if process.poll() is None:
                break  # running but silent: something else is wrong
            # Exited: most likely another process took the port in between; try another.
        raise RuntimeError(f"dnsmasq did not start: {log.read_text(errors='replace')}")

    try:
        yield start
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
