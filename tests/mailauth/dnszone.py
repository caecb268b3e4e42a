"""A test DNS server on loopback (UDP and TCP, one port) serving a dict the test may change.

`records[(name, TYPE)] = [value, ...]`, names in lower case without the final
dot (`set` writes them so), looked up on every query, so a test changes answers
while it runs. Types: A, AAAA, MX ("10 host"), TXT, PTR, CNAME (followed for
other types). A name that owns no records and has none below it is NXDOMAIN;
a known name without the type answers NOERROR with no records. The values
SERVFAIL and TIMEOUT (alone in the list) answer SERVFAIL, or nothing at all;
so does every name at or below one in `silent`, for any type. TXT values
longer than 255 octets are split into strings of 255, as zone files do.

Tests outside tests/mailauth put this folder on sys.path to import it, as
bench/smtp_bench.py does.
"""

from __future__ import annotations

import socket
import socketserver
import struct
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from dnslib import AAAA, CNAME, MX, PTR, QTYPE, RCODE, RR, TXT, A, DNSRecord

SERVFAIL = "SERVFAIL"
TIMEOUT = "TIMEOUT"
TTL = 60

Records = dict[tuple[str, str], list[str]]


def _name(name: str) -> str:
    return name.rstrip(".").lower()


def _rdata(rtype: str, value: str) -> object:
    if rtype == "A":
        return A(value)
    if rtype == "AAAA":
        return AAAA(value)
    if rtype == "MX":
        preference, host = value.split()
        return MX(host, int(preference))
    if rtype == "PTR":
        return PTR(value)
    if rtype == "CNAME":
        return CNAME(value)
    if rtype == "TXT":
        raw = value.encode()
        return TXT([raw[i : i + 255] for i in range(0, len(raw), 255)] or [b""])
    raise ValueError(rtype)


class TestDNS:
    """Call `answer` from the socket threads; `queries` lists (name, type) asked."""

    __test__ = False

    def __init__(self, records: Records | None = None, silent: Iterable[str] = ()) -> None:
        self.records: Records = records if records is not None else {}
        self.silent: set[str] = {_name(s) for s in silent}
        self.queries: list[tuple[str, str]] = []
        self.port = 0

    def set(self, name: str, rtype: str, values: list[str] | None) -> None:
        """Publish `values` for (name, rtype); None removes them."""
        key = (_name(name), rtype)
        if values is None:
            self.records.pop(key, None)
        else:
            self.records[key] = values

    def answer(self, data: bytes) -> bytes | None:
        request = DNSRecord.parse(data)
        q = request.q
        name = _name(str(q.qname))
        rtype = QTYPE[q.qtype]
        self.queries.append((name, rtype))
        if any(name == zone or name.endswith("." + zone) for zone in list(self.silent)):
            return None
        reply = request.reply()
        table = self.records
        values = table.get((name, rtype))
        if values == [TIMEOUT]:
            return None
        if values == [SERVFAIL]:
            reply.header.rcode = RCODE.SERVFAIL
            return reply.pack()
        if values is None and (name, "CNAME") in table:
            target = table[(name, "CNAME")][0]
            reply.add_answer(RR(name, QTYPE.CNAME, rdata=_rdata("CNAME", target), ttl=TTL))
            values = table.get((_name(target), rtype))
            name = target
        if values:
            for value in values:
                reply.add_answer(RR(name, getattr(QTYPE, rtype), rdata=_rdata(rtype, value),
                                    ttl=TTL))
        elif not any(n == name or n.endswith("." + name) for n, _t in list(table)):
            reply.header.rcode = RCODE.NXDOMAIN
        return reply.pack()


class _UDP(socketserver.ThreadingUDPServer):
    allow_reuse_address = True
    daemon_threads = True


class _TCP(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


@contextmanager
def serve_dns(records: Records | None = None, port: int = 0,
              silent: Iterable[str] = ()) -> Iterator[TestDNS]:
    """A running server on 127.0.0.1:`.port` (UDP and TCP; `port` 0: a free one)."""
    zone = TestDNS(records, silent)

    class UDPHandler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            data, sock = self.request
            out = zone.answer(data)
            if out is not None:
                sock.sendto(out, self.client_address)

    class TCPHandler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            conn: socket.socket = self.request
            head = conn.recv(2)
            if len(head) < 2:
                return
            (length,) = struct.unpack("!H", head)
            data = b""
            while len(data) < length:
                more = conn.recv(length - len(data))
                if not more:
                    return
                data += more
            out = zone.answer(data)
            if out is not None:
                conn.sendall(struct.pack("!H", len(out)) + out)

    for _attempt in range(50):  # a free UDP port may be taken on TCP: draw another
        udp = _UDP(("127.0.0.1", port), UDPHandler)
        zone.port = udp.server_address[1]
        try:
            tcp = _TCP(("127.0.0.1", zone.port), TCPHandler)
            break
        except OSError:
            udp.server_close()
            if port:
                raise
    else:  # pragma: no cover - 50 clashes in a row
        raise OSError("no port free for both UDP and TCP")
    threads = [threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.05},
                                daemon=True) for s in (udp, tcp)]
    for t in threads:
        t.start()
    try:
        yield zone
    finally:
        for s in (udp, tcp):
            s.shutdown()
            s.server_close()
