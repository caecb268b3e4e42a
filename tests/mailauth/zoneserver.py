"""A DNS server on loopback for the mail-authentication tests: records from a dict read on
every query (so a test may change them), over UDP and TCP, on one free port.

NXDOMAIN for a name with no records under a served zone, NOERROR with no answer
for a name that has records of other types; `silent` names get no answer at all
(a timeout).
"""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Iterable

from dnslib import AAAA, MX, QTYPE, RCODE, RR, TXT, A, DNSLabel, DNSRecord
from dnslib.dns import DNSError
from dnslib.server import DNSHandler, DNSLogger

Records = dict[tuple[str, str], list[str]]


def _txt(value: str) -> TXT:
    data = value.encode()
    return TXT([data[i : i + 255] for i in range(0, len(data), 255)] or [b""])


def _rdata(rtype: str, value: str) -> object:
    if rtype == "TXT":
        return _txt(value)
    if rtype == "A":
        return A(value)
    if rtype == "AAAA":
        return AAAA(value)
    if rtype == "MX":
        pref, host = value.split()
        return MX(host, int(pref))
    raise ValueError(rtype)


class _Resolver:
    def __init__(self, server: ZoneServer) -> None:
        self.server = server

    def resolve(self, request: DNSRecord, handler: object) -> DNSRecord:
        reply = request.reply()
        qname = str(request.q.qname).rstrip(".").lower()
        qtype = QTYPE[request.q.qtype]
        if qname in self.server.silent:
            raise DNSError("no answer")
        records = self.server.records
        names = {n.lower().rstrip(".") for n, _t in records}
        values = records.get((qname, qtype))
        if values:
            for value in values:
                reply.add_answer(RR(DNSLabel(qname + "."), getattr(QTYPE, qtype),
                                    rdata=_rdata(qtype, value), ttl=1))
        elif qname not in names and not any(n.endswith("." + qname) for n in names):
            reply.header.rcode = RCODE.NXDOMAIN
        return reply


class _UDP(socketserver.ThreadingUDPServer):
    allow_reuse_address = True
    daemon_threads = True


class _TCP(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


class ZoneServer:
    """Start with `start()`, stop with `stop()`; `port` is where it answers."""

    def __init__(self, records: Records | None = None, silent: Iterable[str] = ()) -> None:
        self.records: Records = {(n.lower().rstrip("."), t): v for (n, t), v in
                                 (records or {}).items()}
        self.silent = {s.lower().rstrip(".") for s in silent}
        self.port = 0
        self._servers: list[socketserver.BaseServer] = []

    def set(self, name: str, rtype: str, values: list[str] | None) -> None:
        key = (name.lower().rstrip("."), rtype)
        if values is None:
            self.records.pop(key, None)
        else:
            self.records[key] = values

    def start(self) -> int:
        resolver = _Resolver(self)
        logger = DNSLogger("-request,-reply,-truncated,-error,-recv,-send,-data")

        def bind(cls: type[socketserver.BaseServer], port: int) -> socketserver.BaseServer:
            server = cls(("127.0.0.1", port), DNSHandler)
            server.resolver = resolver  # type: ignore[attr-defined]
            server.logger = logger  # type: ignore[attr-defined]
            return server

        while True:  # one free port for both protocols
            udp = bind(_UDP, 0)
            port = udp.server_address[1]  # type: ignore[attr-defined]
            try:
                tcp = bind(_TCP, port)
            except OSError:
                udp.server_close()
                continue
            break
        self._servers = [udp, tcp]
        for server in self._servers:
            threading.Thread(target=server.serve_forever, daemon=True).start()
        self.port = port
        return port

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        self._servers = []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
